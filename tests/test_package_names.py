"""Our import names clash with nothing on PyPI: the kernels' folder kernels/ holds the package
slora_kernels, because `kernels` is Hugging Face's package, which transformers probes by
importing whatever answers to that name (docs/DESIGN.md "Layout")."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
# what an environment without triton and without this repo installed leaves out of the venv's
# site-packages (the editable hook and the dist-info would otherwise answer for the repo)
LEFT_OUT = ("triton", "__editable__", "slora_triton")

PROBE = """
import importlib.util, sys
sys.path.insert(1, {farm!r})
assert importlib.util.find_spec("triton") is None, "triton is still importable"
from transformers.models.llama import LlamaConfig
LlamaConfig()
found = sys.modules.get("kernels")
assert found is None or getattr(found, "__file__", None) is None, found
print("clean")
"""


def _site_packages_without_triton(tmp_path: Path) -> Path:
    """The venv's site-packages as links, minus triton and this repo's install."""
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(LEFT_OUT) and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    return farm


def test_transformers_imports_from_repo_root_without_triton(tmp_path):
    farm = _site_packages_without_triton(tmp_path)
    # -S: no site-packages but the farm; cwd = the repo root, which `python -c` puts first
    out = subprocess.run([sys.executable, "-S", "-c", PROBE.format(farm=str(farm))], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "clean"


def test_kernels_not_shadowed_in_venv(tmp_path):
    code = ("import importlib.util, slora_kernels; "
            "print(importlib.util.find_spec('kernels')); print(slora_kernels.__file__)")
    out = subprocess.run([str(VENV_PYTHON), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    spec, path = out.stdout.split()
    assert spec == "None"  # nothing of ours answers to `kernels`: HF's package can have it
    assert Path(path) == ROOT / "kernels" / "slora_kernels" / "__init__.py"
