"""Refusals from two threads of the model at once must not take the server down (issue 17:
found by the soak's hostile mix, tritonserver 2.51 died of SIGSEGV within seconds).

A request the stub refuses (a bad `top_p`) is counted as an error by the thread that runs
`execute`; one the engine core refuses (an unknown adapter) by the response thread. Both
increment the same pb_utils Metric, whose calls are not thread-safe in the Python backend
(slora_backend/serving/metrics.py says why): the parent process then freed shared memory twice
and crashed in its allocator. The model serializes its metric calls."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from client import ClientError, stream_grpc_values

pytestmark = [pytest.mark.server, pytest.mark.slow]

THREADS = 8  # half of each kind
DURATION_S = 45.0  # the unserialized model crashed after ~5-60 s of this here
STUB_REFUSAL = {"text_input": "Hi", "max_tokens": 1, "top_p": 7.0}
CORE_REFUSAL = {"text_input": "Hi", "max_tokens": 1, "adapter_id": "no-such-adapter"}
GOOD = {"text_input": "Hi", "max_tokens": 2, "temperature": 0.0}


def _refuse(grpc_url: str, values: dict, stop: threading.Event, seen: dict) -> None:
    while not stop.is_set():
        try:
            list(stream_grpc_values(grpc_url, values, timeout=30))
            seen["served"] = seen.get("served", 0) + 1
        except ClientError as exc:
            key = str(exc).split(":", 1)[0]
            seen[key] = seen.get(key, 0) + 1
            if key not in ("INVALID_ARG", "NOT_FOUND"):  # the server is gone
                stop.set()


def test_concurrent_refusals_keep_the_server_up(triton_server_factory, wrap_server) -> None:
    with triton_server_factory() as server:
        helper = wrap_server(server)
        errors_before = helper.metric("slora_requests_total", outcome="error")
        stop, seen = threading.Event(), {}
        threads = [threading.Thread(target=_refuse, daemon=True, args=(
            server.grpc_url, STUB_REFUSAL if i % 2 else CORE_REFUSAL, stop, seen))
            for i in range(THREADS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + DURATION_S
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert set(seen) == {"INVALID_ARG", "NOT_FOUND"}, f"outcomes {seen}:\n{server.log_tail()}"
        ready = requests.get(f"http://{server.http_url}/v2/health/ready", timeout=10)
        assert ready.status_code == 200
        assert list(stream_grpc_values(server.grpc_url, GOOD))[-1].finish_reason == "length"
        # every refusal was counted once
        refused = seen["INVALID_ARG"] + seen["NOT_FOUND"]
        helper.wait_for(lambda: helper.metric("slora_requests_total", outcome="error")
                        - errors_before == refused, 10, "the error counter")
