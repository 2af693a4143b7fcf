"""A dead engine core (its own process, slora_backend/serving) through the real server: the
request in flight ends with an INTERNAL error instead of hanging, and Triton's readiness
endpoint stops answering ready (the model stops the server, docs/DESIGN.md "Serving path")."""

from __future__ import annotations

import os
import queue
import re
import signal
import time
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient

from client import grpc_inputs
from slora_testing.synthetic_adapters import make_tiny_model

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
LONG = {"text_input": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True,
        "temperature": 0.0}
CORE_PID = re.compile(r"engine core pid (\d+)")
TOKENS_BEFORE_KILL = 3
FIRST_TOKENS_TIMEOUT_S = 120.0
ERROR_TIMEOUT_S = 30.0  # the error must arrive promptly: a hang fails here
NOT_READY_TIMEOUT_S = 30.0


def _ready(http_url: str) -> bool:
    try:
        return requests.get(f"http://{http_url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:  # refused once the server has exited
        return False


def test_killed_engine_core_fails_requests_and_readiness(triton_server_factory,
                                                         tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny", TOKENIZER)
    with triton_server_factory(env={"SLORA_MODEL": str(model)}) as server:
        pids = CORE_PID.findall(server.log.read_text())
        assert len(pids) == 1, "the model logs its engine core's pid once"
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
            os.kill(int(pids[0]), signal.SIGKILL)
            deadline = time.monotonic() + ERROR_TIMEOUT_S
            while True:  # tokens already on their way may come first
                result, error = events.get(timeout=max(0.0, deadline - time.monotonic()))
                if error is not None:
                    break
            assert error.message().startswith("INTERNAL: engine core process exited"), \
                error.message()
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        deadline = time.monotonic() + NOT_READY_TIMEOUT_S
        while _ready(server.http_url):
            assert time.monotonic() < deadline, "/v2/health/ready still 200 after the death"
            time.sleep(0.2)
        assert "stopping tritonserver: the engine core is gone" in server.log.read_text()
