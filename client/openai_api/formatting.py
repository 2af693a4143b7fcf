"""The `slora` model's responses (client.Chunk) -> OpenAI response objects and stream chunks.

Logprobs come from the model's `logprobs` output (vllm_backend's format: per token
{token_id: {logprob, rank, decoded_token}}); the chosen token is the one in `output_ids`, and
the alternatives are the entries of rank 1..k.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from client import Chunk
from client.openai_api.protocol import GenerationRequest

# the engine's finish reasons that OpenAI defines; "cancelled" is answered as an error
FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One request's state while its responses arrive."""

    req: GenerationRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[int, dict[str, dict[str, Any]]]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, chunk: Chunk) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """Record a response; returns its (token id, logprob entry) pairs."""
        self.text.append(chunk.text)
        self.prompt_tokens = chunk.num_input_tokens or self.prompt_tokens
        self.completion_tokens = chunk.num_output_tokens or self.completion_tokens
        new = list(zip(chunk.token_ids, chunk.logprobs or []))
        self.logprobs += new
        self.finish_reason = chunk.finish_reason or self.finish_reason
        return new

    @property
    def prefix(self) -> str:
        return "chatcmpl-" if self.req.chat else "cmpl-"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.prefix + self.id, "object": obj, "created": self.created,
                "model": self.req.model, "choices": choices}


def _top(entry: dict[str, dict[str, Any]], k: int) -> list[dict[str, Any]]:
    ranked = sorted(entry.values(), key=lambda d: d["rank"])
    return [d for d in ranked if d["rank"] <= k]


def chat_logprobs(pairs: list[tuple[int, dict[str, dict[str, Any]]]], k: int
                  ) -> dict[str, Any]:
    def item(d: dict[str, Any]) -> dict[str, Any]:
        token = d["decoded_token"]
        return {"token": token, "logprob": d["logprob"], "bytes": list(token.encode())}

    content = [{**item(entry[str(tok)]), "top_logprobs": [item(d) for d in _top(entry, k)]}
               for tok, entry in pairs]
    return {"content": content}


def completion_logprobs(pairs: list[tuple[int, dict[str, dict[str, Any]]]], k: int,
                        offset: int = 0) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for tok, entry in pairs:
        chosen = entry[str(tok)]
        tokens.append(chosen["decoded_token"])
        values.append(chosen["logprob"])
        tops.append({d["decoded_token"]: d["logprob"] for d in _top(entry, k)})
        offsets.append(offset)
        offset += len(chosen["decoded_token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def _logprobs(c: Completion, pairs: list[tuple[int, dict[str, dict[str, Any]]]],
              offset: int = 0) -> dict[str, Any] | None:
    k = c.req.top_logprobs
    if k is None:
        return None
    return chat_logprobs(pairs, k) if c.req.chat else completion_logprobs(pairs, k, offset)


def full_response(c: Completion) -> dict[str, Any]:
    """The non-streaming response body."""
    text = "".join(c.text)
    logprobs = _logprobs(c, c.logprobs)
    if c.req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": logprobs, "finish_reason": c.finish_reason}
        body = c.envelope("chat.completion", [choice])
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": c.finish_reason}
        body = c.envelope("text_completion", [choice])
    return {**body, "usage": c.usage()}


def stream_chunk(c: Completion, text: str, pairs: list[tuple[int, dict[str, dict[str, Any]]]],
                 finish_reason: str | None, first: bool = False) -> dict[str, Any]:
    """One SSE chunk: a delta of text (and its tokens' logprobs)."""
    offset = sum(len(t) for t in c.text) - len(text)
    logprobs = _logprobs(c, pairs, offset) if pairs else None
    if c.req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first \
            else {"content": text}
        choice = {"index": 0, "delta": delta if text or first else {}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        body = c.envelope("chat.completion.chunk", [choice])
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        body = c.envelope("text_completion", [choice])
    if c.req.include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk(c: Completion) -> dict[str, Any]:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if c.req.chat else "text_completion"
    return {**c.envelope(obj, []), "usage": c.usage()}
