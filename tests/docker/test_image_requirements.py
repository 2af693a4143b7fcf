"""The image's pip requirements (docker/image_requirements.py): derived from requirements.txt,
and -- with PyPI reachable -- resolvable by pip for the image's Python 3.12 on x86-64 Linux,
taking the CUDA build of torch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from docker_files import DOCKER, REPO, dockerfile_instructions, resolve_from

spec = importlib.util.spec_from_file_location("image_requirements",
                                              DOCKER / "image_requirements.py")
image_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_requirements)

REQUIREMENTS = (REPO / "requirements.txt").read_text()


def _names(lines: list[str]) -> set[str]:
    return {image_requirements.requirement_name(ln) for ln in lines} - {None}


def test_image_requirements_are_requirements_txt_less_the_dropped():
    kept = image_requirements.image_requirements(REQUIREMENTS)
    all_lines = [ln for ln in REQUIREMENTS.splitlines()
                 if image_requirements.requirement_name(ln)]
    dev_only = _names(all_lines) & set(image_requirements.DEV_ONLY)
    assert _names(all_lines) - _names(kept) == set(image_requirements.DROPPED) | dev_only
    # the kept lines are requirements.txt's own (same pins), comments stripped
    assert set(kept) <= {ln.split("#", 1)[0].strip() for ln in all_lines}
    assert any(ln.startswith("torch==") for ln in kept)


def test_a_dropped_project_that_left_requirements_txt_is_an_error():
    text = "\n".join(ln for ln in REQUIREMENTS.splitlines()
                     if image_requirements.requirement_name(ln) != "triton")
    with pytest.raises(ValueError, match="triton"):
        image_requirements.image_requirements(text)


def test_requirement_names_are_normalized():
    name = image_requirements.requirement_name
    assert name("tritonclient[all]==2.73.0  # x") == "tritonclient"
    assert name("Flask_Login==0.6.3") == "flask-login"
    assert name("  # comment") is None and name("-r other.txt") is None and name("") is None


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_image_requirements_resolve_for_the_image_python(tmp_path):
    """pip's resolver, run for the image's platform (Python 3.12, manylinux x86-64, wheels
    only) against PyPI without installing anything: the set must resolve (e.g. no pin that
    conflicts with torch's own CUDA dependencies), with torch the CUDA 13 build."""
    release = re.search(r":(\d+\.\d+)-py3$", resolve_from(dockerfile_instructions())).group(1)
    assert tuple(map(int, release.split("."))) >= (24, 12)  # Ubuntu 24.04 + Python 3.12 images
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    req = tmp_path / "requirements-image.txt"
    req.write_text("\n".join(image_requirements.image_requirements(REQUIREMENTS)) + "\n")
    report = tmp_path / "report.json"
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--quiet", "--report", str(report), "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--target", str(tmp_path / "t"), "-r", str(req)]
    for p in platforms:
        cmd += ["--platform", p]
    # the registry only, as in the image build: no local wheel folders or indexes
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert installed["torch"] == "2.13.0"
    assert "nvidia-pytriton" not in installed
    assert any(n.startswith("nvidia-cudnn-cu13") for n in installed), "not the CUDA torch"
    assert "triton" in installed  # the version torch's wheel pins
    assert installed["numpy"] == re.search(r"^numpy==(\S+)", REQUIREMENTS, re.M).group(1)
