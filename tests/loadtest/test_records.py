"""Per-request metrics from stamped responses, and response parsing (no server, no gevent)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.records import (
    Chunk,
    build_record,
    chunks_to_metrics,
    error_message,
    parse_count,
    parse_int,
    parse_text,
    request_fields,
)
from loadtest.scenarios import RequestSpec

SPEC = RequestSpec(index=7, t_arrival=2.0, adapter_id="pirate", input_len=12, max_tokens=4,
                   prompt="the cat sat", ignore_eos=True, temperature=0.0, seed=5)


def test_ttft_and_itl_from_chunks():
    chunks = [Chunk(10.0, 0), Chunk(10.5, 1), Chunk(10.7, 1), Chunk(11.3, 2), Chunk(11.4, 0)]
    ttft, itl = chunks_to_metrics(chunks, t_arrival=10.1)
    assert ttft == pytest.approx(0.4)
    # one gap per token after the first; a chunk of 2 tokens splits its gap
    assert itl == pytest.approx([0.2, 0.3, 0.3])
    assert chunks_to_metrics([Chunk(1.0, 0)], 0.0) == (None, [])
    assert chunks_to_metrics([Chunk(1.0, 3), Chunk(2.0, 1)], 0.5) == (0.5, [0.0, 0.0, 1.0])


def test_build_record_counts_from_the_server_and_times_from_the_arrival():
    t0 = 100.0
    chunks = [Chunk(103.0, 1, "", 12, 1), Chunk(103.5, 1, "", 12, 2),
              Chunk(104.0, 2, "length", 12, 4)]
    rec = build_record(SPEC, "7-x", "grpc", chunks, t0=t0, t_arrival=102.0, t_send=102.5,
                       t_end=104.0)
    assert (rec.t_arrival, rec.t_send, rec.t_end) == (2.0, 2.5, 4.0)
    assert rec.queue_wait == pytest.approx(0.5)
    assert rec.ttft == pytest.approx(1.0) and rec.e2e == pytest.approx(2.0)
    assert rec.itl == pytest.approx([0.5, 0.25, 0.25])
    assert (rec.output_tokens, rec.num_input_tokens, rec.finish_reason) == (4, 12, "length")
    assert rec.ok and rec.label == "pirate"
    # without server counts the tokens are counted from the chunks
    bare = [Chunk(c.t, c.num_tokens) for c in chunks]
    assert build_record(SPEC, "7-x", "http", bare, t0=t0, t_arrival=102.0, t_send=102.0,
                        t_end=104.0).output_tokens == 4
    failed = build_record(SPEC, "7-x", "http", [], t0=t0, t_arrival=102.0, t_send=102.0,
                          t_end=102.1, error="NOT_FOUND: adapter 'pirate' not found")
    assert not failed.ok and failed.ttft is None and failed.output_tokens == 0


def test_request_fields_name_the_model_inputs():
    assert request_fields(SPEC) == {
        "text_input": "the cat sat", "adapter_id": "pirate", "max_tokens": 4,
        "temperature": 0.0, "ignore_eos": True, "stream": True, "seed": 5}


def test_response_values_from_grpc_arrays_and_sse_json():
    assert parse_count(np.array([1, 2, 3], dtype=np.int32)) == 3
    assert parse_count(np.array([], dtype=np.int32)) == 0
    assert parse_count(42) == 1 and parse_count([4, 5]) == 2 and parse_count(None) == 0
    assert parse_text(np.array([b"length"], dtype=object)) == "length"
    assert parse_text(None) == "" and parse_text("stop") == "stop"
    assert parse_int(np.array([17], dtype=np.uint32)) == 17 and parse_int([3]) == 3
    assert parse_int(None) is None


def test_error_message_of_json_and_sse_bodies():
    assert error_message('{"error":"Request for unknown model"}') == "Request for unknown model"
    assert error_message('data: {"error":"NOT_FOUND: adapter \'x\' not found"}\n\n') == \
        "NOT_FOUND: adapter 'x' not found"
    assert error_message("plain failure") == "plain failure"
