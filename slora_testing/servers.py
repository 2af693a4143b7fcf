"""Helpers for starting and stopping a real tritonserver from tests and benchmarks.

Only the standard library: benchmarks import this on the GPU host, which has neither pytest
nor requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0
GUARD_READY_TIMEOUT_S = 30.0
POLL_S = 0.5


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (bound together so they cannot repeat)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop_server(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (Triton unloads the model: finalize runs), then SIGKILL the group if stuck.
    The process must have been started with start_new_session=True."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_tritonserver(log: Path, env: dict[str, str] | None = None,
                       repository: Path = REPO / "model_repository",
                       ) -> tuple[subprocess.Popen, dict[str, str]]:
    """scripts/tritonserver.sh on free ports, in a session of its own (stop_server ends it);
    once /v2/health/ready answers: (process, {"http", "grpc": host:port, "metrics": URL})."""
    http, grpc, metrics = free_ports(3)
    cmd = [str(REPO / "scripts" / "tritonserver.sh"), "--model-repository", str(repository),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    urls = {"http": f"localhost:{http}", "grpc": f"localhost:{grpc}",
            "metrics": f"http://localhost:{metrics}/metrics"}
    if _wait_ready(proc, urls["http"], READY_TIMEOUT_S):
        return proc, urls
    stop_server(proc)
    raise RuntimeError(f"tritonserver did not become ready; see {log}")


def start_http_guard(upstream: str, log: Path, *args: str,
                     ) -> tuple[subprocess.Popen, str]:
    """`python -m client.http_guard` (extra CLI `args`) in front of Triton's HTTP endpoint
    `upstream` (host:port), on a free port; once it answers /v2/health/ready through to the
    server: (process, host:port). Stop it with stop_server."""
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "client.http_guard", "--host", "127.0.0.1", "--port",
           str(port), "--upstream", f"http://{upstream}", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    url = f"127.0.0.1:{port}"
    if _wait_ready(proc, url, GUARD_READY_TIMEOUT_S):
        return proc, url
    stop_server(proc)
    raise RuntimeError(f"the HTTP guard did not start:\n{log.read_text()}")


def _wait_ready(proc: subprocess.Popen, http_url: str, timeout: float) -> bool:
    """Whether http://http_url/v2/health/ready answered 200 before `timeout` or proc's end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2):
                return True
        except OSError:  # refused, or 400 while the model loads
            time.sleep(POLL_S)
    return False
