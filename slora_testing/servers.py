"""Helpers for starting and stopping a real tritonserver from tests and benchmarks.

Only the standard library: benchmarks import this on the GPU host, which has neither pytest
nor requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

STOP_TIMEOUT_S = 60.0


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
