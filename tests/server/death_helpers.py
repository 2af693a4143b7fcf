"""A process of the serving path killed under a streaming request (the engine core, a
tensor-parallel worker): the request must end with an error promptly, and the server must
stop answering ready (docs/DESIGN.md "Engine core death")."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
import requests
import tritonclient.grpc as grpcclient

from client import grpc_inputs

LONG = {"text_input": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True,
        "temperature": 0.0}
TOKENS_BEFORE_KILL = 3
FIRST_TOKENS_TIMEOUT_S = 120.0
ERROR_TIMEOUT_S = 30.0  # the error must arrive promptly: a hang fails here
NOT_READY_TIMEOUT_S = 30.0
LOG_LINE_TIMEOUT_S = 30.0


def ready(http_url: str) -> bool:
    try:
        return requests.get(f"http://{http_url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:  # refused once the server has exited
        return False


def kill_under_stream(server, pid: int) -> str:  # noqa: ANN001 (tests/conftest.py TritonServer)
    """Stream a long request, SIGKILL `pid` after a few tokens; the error message it ends
    with."""
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer("slora", grpc_inputs(LONG))
        for _ in range(TOKENS_BEFORE_KILL):
            try:
                result, error = events.get(timeout=FIRST_TOKENS_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"no tokens before the kill:\n{server.log_tail()}")
            assert error is None, error
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + ERROR_TIMEOUT_S
        while True:  # tokens already on their way may come first
            result, error = events.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:
                return error.message()
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def wait_not_ready(server) -> None:  # noqa: ANN001
    deadline = time.monotonic() + NOT_READY_TIMEOUT_S
    while ready(server.http_url):
        assert time.monotonic() < deadline, "/v2/health/ready still 200 after the death"
        time.sleep(0.2)


def wait_for_log_line(server, line: str) -> None:  # noqa: ANN001
    """A Python model's log lines reach the server's log through the stub's queue and thread,
    after the call returns: one logged just before the model's SIGTERM can land after
    readiness is already gone (seen on the 2-core CI machine)."""
    deadline = time.monotonic() + LOG_LINE_TIMEOUT_S
    while line not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{line!r} not logged:\n{server.log_tail()}"
        time.sleep(0.2)
