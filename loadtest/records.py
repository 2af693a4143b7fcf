"""Request inputs, response parsing and the per-request record (pure: no gevent, no grpc).

Used by loadtest/users.py inside Locust and importable anywhere (tests, notebooks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.scenarios import RequestSpec

# Triton input name -> (datatype, numpy dtype) of the `slora` model's inputs that we send.
INPUTS = {
    "text_input": ("BYTES", np.object_),
    "adapter_id": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "ignore_eos": ("BOOL", np.bool_),
    "stream": ("BOOL", np.bool_),
    "seed": ("UINT64", np.uint64),
}


class ServerError(Exception):
    """The server refused or failed a request; the message is the server's."""


def request_fields(spec: RequestSpec) -> dict[str, Any]:
    """The inputs of one request (the JSON body of generate_stream; gRPC tensors of [1])."""
    return {
        "text_input": spec.prompt,
        "adapter_id": spec.adapter_id,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "ignore_eos": spec.ignore_eos,
        "stream": True,
        "seed": spec.seed,
    }


@dataclass
class Chunk:
    """One streamed response, stamped when it reached the client."""

    t: float  # time.perf_counter()
    num_tokens: int  # tokens in this response (len of output_ids)
    finish_reason: str = ""
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None  # cumulative, as the server counts them


@dataclass
class RequestRecord:
    """One line of requests.jsonl. Times in seconds; t_* relative to the start of the test."""

    index: int
    request_id: str
    protocol: str
    adapter: str  # "" = base model
    t_arrival: float  # scheduled arrival
    t_send: float
    t_end: float
    queue_wait: float  # t_send - t_arrival: waiting for a free user slot
    ttft: float | None  # arrival -> first token
    e2e: float  # arrival -> last response (or the error)
    itl: list[float]  # per token after the first
    input_tokens_target: int
    num_input_tokens: int | None  # as counted by the server
    max_tokens: int
    output_tokens: int
    finish_reason: str
    ok: bool
    error: str = ""
    unfinished: bool = False  # still running when the test stopped (not a failure)

    @property
    def label(self) -> str:
        return self.adapter or "base"


def chunks_to_metrics(chunks: list[Chunk], t_arrival: float) -> tuple[float | None, list[float]]:
    """(time to first token, inter-token latencies) from the stamped responses: one latency
    per token after the first, a response of k tokens splitting its gap k ways (tokens that
    came with the first one count 0)."""
    ttft, itl, prev = None, [], None
    for c in chunks:
        if c.num_tokens <= 0:
            continue
        if prev is None:
            ttft = c.t - t_arrival
            itl += [0.0] * (c.num_tokens - 1)
        else:
            itl += [(c.t - prev) / c.num_tokens] * c.num_tokens
        prev = c.t
    return ttft, itl


def scalar(value: Any) -> Any:
    """First element of a tensor-like value (SSE sends a one-element list as a scalar)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    if isinstance(value, np.ndarray):
        return value.reshape(-1)[0] if value.size else None
    return value


def parse_text(value: Any) -> str:
    value = scalar(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def parse_int(value: Any) -> int | None:
    value = scalar(value)
    return None if value is None else int(value)


def parse_count(ids: Any) -> int:
    if ids is None:
        return 0
    if isinstance(ids, np.ndarray):
        return int(ids.size)
    return len(ids) if isinstance(ids, (list, tuple)) else 1


def error_message(body: str) -> str:
    """The `error` of a JSON (or server-sent event) error body, else the body."""
    text = body.strip()
    text = text[5:].strip() if text.startswith("data:") else text
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return body.strip()


def build_record(spec: RequestSpec, request_id: str, protocol: str, chunks: list[Chunk], *,
                 t0: float, t_arrival: float, t_send: float, t_end: float, error: str = "",
                 unfinished: bool = False) -> RequestRecord:
    """The record of one request from its stamped responses (times: time.perf_counter();
    t0 = the start of the test)."""
    ttft, itl = chunks_to_metrics(chunks, t_arrival)
    counted = [c.num_output_tokens for c in chunks if c.num_output_tokens is not None]
    input_counts = [c.num_input_tokens for c in chunks if c.num_input_tokens is not None]
    return RequestRecord(
        index=spec.index, request_id=request_id, protocol=protocol, adapter=spec.adapter_id,
        t_arrival=t_arrival - t0, t_send=t_send - t0, t_end=t_end - t0,
        queue_wait=max(0.0, t_send - t_arrival), ttft=ttft, e2e=t_end - t_arrival, itl=itl,
        input_tokens_target=spec.input_len,
        num_input_tokens=input_counts[-1] if input_counts else None,
        max_tokens=spec.max_tokens,
        output_tokens=counted[-1] if counted else sum(c.num_tokens for c in chunks),
        finish_reason=next((c.finish_reason for c in reversed(chunks) if c.finish_reason), ""),
        ok=not error, error=error, unfinished=unfinished)
