"""Cancellation returns pool pages (read from the metrics endpoint); metrics are exported; the
cancellation watcher never touches a finished request's sender."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import tritonclient.grpc as grpcclient

from client import ClientError, GenerateRequest, grpc_inputs

pytestmark = pytest.mark.server

LONG = {"text_input": "Tell me a very long story about the sea.", "max_tokens": 1000,
        "ignore_eos": True, "temperature": 0.0}
TOKENS_BEFORE_CANCEL = 3
FIRST_TOKENS_TIMEOUT_S = 120.0
FREED_TIMEOUT_S = 20.0  # generous: the engine frees pages at its next step
IDLE_TIMEOUT_S = 120.0
KV_PAGES = {"kind": "kv"}
METRIC_NAMES = (
    "slora_requests_total", "slora_time_to_first_token_seconds_count",
    "slora_inter_token_latency_seconds_count", "slora_generated_tokens_total",
    "slora_requests", "slora_pool_pages", "slora_adapters_resident",
    "slora_adapter_cache_events_total", "slora_adapter_load_seconds_total",
    "slora_adapter_load_seconds_max",
)


def wait_idle(srv) -> float:
    """Wait until nothing runs or waits; the idle KV page count (the baseline)."""
    srv.wait_for(lambda: srv.metric("slora_requests", state="running") == 0
                 and srv.metric("slora_requests", state="waiting") == 0,
                 IDLE_TIMEOUT_S, "an idle engine")
    return srv.metric("slora_pool_pages", **KV_PAGES)


def test_grpc_cancel_frees_pool_pages(srv) -> None:
    baseline = wait_idle(srv)
    cancelled_before = srv.metric("slora_requests_total", outcome="cancelled")
    got_tokens = threading.Event()
    count = [0]

    def on_response(result, error) -> None:
        count[0] += 1
        if count[0] >= TOKENS_BEFORE_CANCEL:
            got_tokens.set()

    client = grpcclient.InferenceServerClient(srv.info.grpc_url)
    client.start_stream(callback=on_response)
    try:
        client.async_stream_infer("slora", grpc_inputs(LONG))
        assert got_tokens.wait(FIRST_TOKENS_TIMEOUT_S), "the long request produced no tokens"
        srv.wait_for(lambda: srv.metric("slora_pool_pages", **KV_PAGES) > baseline,
                     FREED_TIMEOUT_S, "KV pages in use")
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    srv.wait_for(lambda: srv.metric("slora_pool_pages", **KV_PAGES) == baseline,
                 FREED_TIMEOUT_S, "KV pages back to the baseline after cancel")
    srv.wait_for(lambda: srv.metric("slora_requests_total", outcome="cancelled")
                 == cancelled_before + 1, FREED_TIMEOUT_S, "the cancelled counter")


def test_http_disconnect_frees_pool_pages(srv) -> None:
    baseline = wait_idle(srv)
    url = f"http://{srv.info.http_url}/v2/models/slora/generate_stream"
    with requests.post(url, json={**LONG, "stream": True}, stream=True,
                       timeout=FIRST_TOKENS_TIMEOUT_S) as resp:
        events = 0
        for line in resp.iter_lines():
            events += line.startswith(b"data:")
            if events >= TOKENS_BEFORE_CANCEL:
                break
        assert srv.metric("slora_pool_pages", **KV_PAGES) > baseline
    # leaving the block closes the connection mid-stream
    srv.wait_for(lambda: srv.metric("slora_pool_pages", **KV_PAGES) == baseline,
                 FREED_TIMEOUT_S, "KV pages back to the baseline after the HTTP disconnect")


def test_metrics_exported(srv) -> None:
    before = srv.metric("slora_generated_tokens_total")
    errors_before = srv.metric("slora_requests_total", outcome="error")
    chunks = srv.stream(GenerateRequest("Hi", adapter_id="pirate", max_tokens=5, temperature=0.0))
    with pytest.raises(ClientError):
        srv.stream(GenerateRequest("Hi", max_tokens=5, temperature=-1.0))
    names = {name for name, _ in srv.metrics()}
    assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names
    assert srv.metric("slora_generated_tokens_total") >= before + chunks[-1].num_output_tokens
    assert srv.metric("slora_requests_total", outcome="success") >= 1
    assert srv.metric("slora_requests_total", outcome="error") == errors_before + 1
    assert srv.metric("slora_time_to_first_token_seconds_count") >= 1
    assert srv.metric("slora_pool_pages", kind="total") > 0
    srv.wait_for(lambda: srv.metric("slora_adapters_resident") >= 1, FREED_TIMEOUT_S,
                 "a resident adapter")
    assert srv.metric("slora_adapter_cache_events_total", event="loads") >= 1
    srv.wait_for(lambda: srv.metric("slora_adapter_load_seconds_total") > 0
                 and srv.metric("slora_adapter_load_seconds_max") > 0, FREED_TIMEOUT_S,
                 "adapter load time metrics")


SHORT_REQUESTS = 160
SHORT_STREAMS = 32


def test_many_short_streams_while_polling_cancellation(srv) -> None:
    """Requests that end while the watcher polls their cancellation: Triton frees a sender's
    response factory after its final response, and a poll after that crashed the server
    (segfault in TRITONBACKEND_ResponseFactoryIsCancelled). Every request gets its final
    response and the server keeps serving."""
    reqs = [GenerateRequest(f"Say {i}.", max_tokens=1 + i % 2, temperature=0.0)
            for i in range(SHORT_REQUESTS)]
    with ThreadPoolExecutor(SHORT_STREAMS) as pool:
        finals = [chunks[-1] for chunks in pool.map(srv.stream, reqs)]
    assert all(f.finish_reason in ("length", "stop") for f in finals)
    assert srv.generate(GenerateRequest("Hi", max_tokens=2, temperature=0.0)).finish_reason
