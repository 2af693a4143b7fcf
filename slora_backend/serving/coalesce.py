"""Response coalescing: when the response thread falls behind the engine, the outputs of one
request from several queued steps become one response (vLLM's stream interval, adaptive).

Nothing waits for this: a batch that is alone in the queue goes out as it is, so the first
token is never delayed; only a backlog is merged. Merging keeps the streaming contract: text
deltas are whole UTF-8 characters and stop-string holds were already applied by the engine,
so their concatenation is again a valid delta, and the merged output is final (with its
finish_reason or error) exactly when the last merged one is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any


def coalesce(batches: Iterable[list[Any]]) -> list[Any]:
    """Step batches of RequestOutput, oldest first -> one output per request, in order of
    each request's first appearance."""
    merged: dict[str, Any] = {}
    for batch in batches:
        for out in batch:
            prev = merged.get(out.request_id)
            merged[out.request_id] = out if prev is None else _merge(prev, out)
    return list(merged.values())


def _merge(first: Any, later: Any) -> Any:
    """`first` then `later` of one request as a single output (the later state wins)."""
    logprobs = later.new_logprobs
    if first.new_logprobs is not None:  # a request that asked: one entry per token
        logprobs = first.new_logprobs + (later.new_logprobs or [])
    return dataclasses.replace(later, new_token_ids=first.new_token_ids + later.new_token_ids,
                               new_text=first.new_text + later.new_text,
                               new_logprobs=logprobs)
