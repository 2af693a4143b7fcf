"""The load test's OpenAI transport: POST /v1/chat/completions with `stream: true` to the
OpenAI API (client/openai_api, `make serve` on OPENAI_PORT), read as server-sent events.

Each request is one user message (the scenario's prompt: the chat template adds its tokens to
the input) with `model` = the adapter id or the base id, and `stream_options.include_usage`:
the last event's usage gives the exact token counts. A content event usually carries one token
(the server sends one per engine step; text held back for a stop string or half a UTF-8
character comes with the next), so ITL counts each event as one token.
"""

from __future__ import annotations

import json
import time
from typing import Any

from geventhttpclient import HTTPClient

from loadtest.records import Chunk, ServerError, error_message
from loadtest.scenarios import RequestSpec

PATH = "/v1/chat/completions"
BASE_MODEL_ID = "slora"  # client/openai_api's default --base-model-id
DONE = b"[DONE]"


def chat_body(spec: RequestSpec, base_id: str = BASE_MODEL_ID) -> dict[str, Any]:
    return {"model": spec.adapter_id or base_id,
            "messages": [{"role": "user", "content": spec.prompt}],
            "max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": spec.seed,
            "ignore_eos": spec.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}


def event_chunk(event: dict[str, Any], t: float) -> Chunk | None:
    """The Chunk of one SSE event: a content delta, the finish, or the usage; else None."""
    if "error" in event:
        raise ServerError(str(event["error"].get("message", event["error"])))
    usage = event.get("usage")
    if usage:
        return Chunk(t=t, num_tokens=0, num_input_tokens=usage["prompt_tokens"],
                     num_output_tokens=usage["completion_tokens"])
    choices = event.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") or ""
    if not text and not choice.get("finish_reason"):
        return None  # the role-only first event
    return Chunk(t=t, num_tokens=1 if text else 0,
                 finish_reason=choice.get("finish_reason") or "")


class OpenAITransport:
    """One HTTP connection per user; a dropped stream is a disconnect (the server cancels)."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.client = self._connect()

    def _connect(self) -> HTTPClient:
        return HTTPClient(self.host, self.port, connection_timeout=10.0,
                          network_timeout=self.timeout, concurrency=1)

    def stream(self, spec: RequestSpec, request_id: str, timeout: float,
               chunks: list[Chunk]) -> None:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "X-Request-Id": request_id}
        finished = False
        try:
            response = self.client.post(PATH, body=json.dumps(chat_body(spec)), headers=headers)
            if response.status_code != 200:
                finished = True  # the body is read to its end: the connection is reusable
                body = response.read().decode("utf-8", "replace")
                raise ServerError(f"HTTP {response.status_code}: {error_message(body)}")
            deadline = time.perf_counter() + timeout
            while True:
                line = response.readline(b"\n")
                t = time.perf_counter()
                if not line:
                    break
                if t > deadline:
                    raise TimeoutError(f"no final response within {timeout:g} s")
                line = line.strip()
                if not line.startswith(b"data:") or line[5:].strip() == DONE:
                    continue
                chunk = event_chunk(json.loads(line[5:]), t)
                if chunk is not None:
                    chunks.append(chunk)
            finished = True
        finally:
            if not finished:
                self.client.close()
                self.client = self._connect()

    def close(self) -> None:
        self.client.close()
