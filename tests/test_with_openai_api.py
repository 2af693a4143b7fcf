"""scripts/with_openai_api.sh (make serve): the OpenAI API server runs next to the server
command on OPENAI_PORT and stops with it; OPENAI_PORT=0 runs the command alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "scripts" / "with_openai_api.sh"
# a stand-in for tritonserver that runs until SIGTERM
FAKE_SERVER = ["python3", "-c", "import signal, time; "
               "signal.signal(signal.SIGTERM, lambda *a: exit(3)); time.sleep(120)"]
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> int | None:
    try:
        return requests.get(f"http://localhost:{port}/health", timeout=2).status_code
    except requests.RequestException:
        return None


def test_api_runs_next_to_the_server_and_stops_with_it() -> None:
    port, grpc = _free_port(), _free_port()
    proc = subprocess.Popen([str(WRAPPER), *FAKE_SERVER, "--grpc-port", str(grpc)],
                            env={**os.environ, "OPENAI_PORT": str(port)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _health(port) is None:  # up; 503 since nothing serves gRPC on `grpc`
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert _health(port) == 503
        r = requests.post(f"http://localhost:{port}/v1/completions", timeout=30,
                          json={"model": "slora", "prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert f"localhost:{grpc}" in r.json()["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3  # the server command's own exit status
        assert _health(port) is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_openai_port_zero_runs_the_command_alone() -> None:
    res = subprocess.run([str(WRAPPER), "/bin/echo", "hello"], capture_output=True, text=True,
                         env={**os.environ, "OPENAI_PORT": "0"}, timeout=30)
    assert res.returncode == 0 and res.stdout == "hello\n" and res.stderr == ""
