"""Helpers for starting and stopping a real tritonserver from tests and benchmarks.

Only the standard library: benchmarks import this on the GPU host, which has neither pytest
nor requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0
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
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{urls['http']}/v2/health/ready", timeout=2):
                return proc, urls
        except OSError:  # refused, or 400 while the model loads
            time.sleep(POLL_S)
    stop_server(proc)
    raise RuntimeError(f"tritonserver did not become ready; see {log}")
