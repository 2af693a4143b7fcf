"""Stopping the real server under load (issue 17, item 6): SIGTERM while requests stream must
end the process in a few seconds, every time, not after Triton's exit timeout."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from tqdm import tqdm

from client import ClientError, stream_grpc_values

pytestmark = [pytest.mark.server, pytest.mark.slow]

STOPS = 20
LOAD_THREADS = 3
# long enough that they are still running when SIGTERM comes, short enough for 2 cores
LOAD_REQUEST = {"text_input": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
SERVER_ENV = {"SLORA_MAX_NUM_SEQS": "2"}
STOP_BOUND_S = 5.0  # tests/conftest.py starts servers with --exit-timeout-secs 10
RUNNING_TIMEOUT_S = 60.0
LOAD_RESPONSE_TIMEOUT_S = 30.0


def _load(server: Any, stop: threading.Event) -> None:
    """Stream requests one after another until told to stop (errors once the server goes)."""
    while not stop.is_set():
        try:
            for _ in stream_grpc_values(server.grpc_url, LOAD_REQUEST,
                                        timeout=LOAD_RESPONSE_TIMEOUT_S):
                if stop.is_set():
                    break
        except (ClientError, Exception):  # the server went away mid-stream: expected
            time.sleep(0.1)


def _stop_under_load(factory: Any, wrap_server: Any) -> tuple[float, str]:
    """Start a server, load it, SIGTERM it: (seconds until it exited, its log tail)."""
    context = factory(env=SERVER_ENV)
    server = context.__enter__()
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(server, stop), daemon=True)
               for _ in range(LOAD_THREADS)]
    try:
        for thread in threads:
            thread.start()
        helper = wrap_server(server)
        helper.wait_for(lambda: helper.metric("slora_requests", state="running") > 0,
                        RUNNING_TIMEOUT_S, "running requests")
    finally:
        start = time.monotonic()
        context.__exit__(None, None, None)
        seconds = time.monotonic() - start
        stop.set()
        for thread in threads:
            thread.join(LOAD_RESPONSE_TIMEOUT_S)
    return seconds, server.log_tail()


@pytest.mark.xfail(strict=True, reason=(
    "needs model.py (issue 16) to call SignalWatcher(self._loop.shutdown) in initialize; even "
    "then about half of the stops (5 of 11 here) wait out the exit timeout on Triton 2.51's "
    "gRPC frontend (a stream cancelled right after its final response stays "
    "CANCELLATION_ISSUED and holds the model)"))
def test_sigterm_under_load_stops_promptly(triton_server_factory, wrap_server) -> None:
    times: list[float] = []
    for _ in tqdm(range(STOPS), desc="stops under load"):
        seconds, log = _stop_under_load(triton_server_factory, wrap_server)
        times.append(round(seconds, 2))
        assert seconds < STOP_BOUND_S, f"stop times {times} s; the slow stop's log:\n{log}"
    print(f"stop times under load: {times} s")
