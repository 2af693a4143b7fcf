"""The OpenAI-compatible HTTP server (aiohttp): GET /v1/models, POST /v1/completions and
/v1/chat/completions (streaming as SSE ending in `data: [DONE]`, or one JSON body).

Each request is validated here (bounded body, bounded JSON depth, OpenAI parameter rules)
before it reaches Triton. A client that disconnects cancels its handler (aiohttp
handler_cancellation), which closes its gRPC stream, so the server aborts the request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from client.openai_api.formatting import (
    FINISH_REASONS,
    Completion,
    full_response,
    stream_chunk,
    usage_chunk,
)
from client.openai_api.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    GenerationRequest,
    chat_request,
    completion_request,
    parse_body,
)
from client.openai_api.triton import TritonLink

log = logging.getLogger("openai_api")
OWNER = "slora"
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ServerSettings:
    triton_url: str = "localhost:8001"
    base_model_id: str = "slora"  # the id of the base model (no adapter) in `model`
    default_max_tokens: int = 256  # chat requests without max_tokens / max_completion_tokens
    max_in_flight: int = 256  # more concurrent generations are refused with 429

    def __post_init__(self) -> None:
        if self.default_max_tokens < 1 or self.max_in_flight < 1:
            raise ValueError("default_max_tokens and max_in_flight must be >= 1")
        if not self.base_model_id:
            raise ValueError("base_model_id must not be empty")


class OpenAIServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.triton = TritonLink(settings.triton_url)
        self.in_flight = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[self._errors])
        app.add_routes([web.get("/v1/models", self.models),
                        web.get("/v1/models/{model}", self.model),
                        web.post("/v1/chat/completions", self.chat),
                        web.post("/v1/completions", self.completions),
                        web.get("/health", self.health)])
        app.on_cleanup.append(lambda _app: self.triton.close())
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """Every error in OpenAI's shape: ours, and aiohttp's own (404 route, 405, ...)."""
        try:
            return await handler(request)
        except ApiError as err:
            return web.json_response(err.body(), status=err.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            err = ApiError(exc.status, exc.reason or "error", None, None)
            return web.json_response(err.body(), status=exc.status)
        except ConnectionResetError:  # the client went away mid-stream: nobody to answer
            raise
        except Exception as exc:  # a bug: answer it, keep serving the others
            log.exception("request %s failed", request.path)
            err = ApiError(500, f"internal error: {exc!r}", None, "internal", "server_error")
            return web.json_response(err.body(), status=500)

    # ---------------------------------------------------------------- models
    async def _model_ids(self) -> list[str]:
        adapters = await self.triton.list_adapters()
        base = self.settings.base_model_id
        return [base, *(a for a in adapters if a != base)]

    def _model_card(self, model_id: str, created: int) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [self._model_card(m, now) for m in await self._model_ids()]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id not in await self._model_ids():
            raise ApiError(404, f"model '{model_id}' not found", "model", "model_not_found")
        return web.json_response(self._model_card(model_id, int(time.time())))

    async def health(self, request: web.Request) -> web.Response:
        if not await self.triton.ready():
            raise ApiError(503, "Triton model not ready", None, "unavailable", "server_error")
        return web.json_response({"status": "ok"})

    # ---------------------------------------------------------------- generation
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(400, f"request body over {MAX_BODY_BYTES} bytes", None,
                           "body_too_large") from None
        return parse_body(raw)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        req = chat_request(body, self.settings.base_model_id, self.settings.default_max_tokens)
        return await self._generate(request, req)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = completion_request(await self._body(request), self.settings.base_model_id)
        return await self._generate(request, req)

    async def _generate(self, request: web.Request, req: GenerationRequest
                        ) -> web.StreamResponse:
        if self.in_flight >= self.settings.max_in_flight:
            raise ApiError(429, f"{self.in_flight} requests in flight (max "
                                f"{self.settings.max_in_flight}); retry later", None,
                           "rate_limit_exceeded", "rate_limit_error")
        self.in_flight += 1
        try:
            async with contextlib.aclosing(self.triton.generate(req.inputs, req.chat)) as chunks:
                if req.stream:
                    return await self._stream(request, req, chunks)
                return await self._whole(req, chunks)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _check_finish(c: Completion) -> None:
        if c.finish_reason not in FINISH_REASONS:
            raise ApiError(503, f"request ended: {c.finish_reason}", None, "cancelled",
                           "server_error")

    async def _whole(self, req: GenerationRequest, chunks: Any) -> web.Response:
        c = Completion(req)
        async for chunk in chunks:
            c.add(chunk)
        self._check_finish(c)
        return web.json_response(full_response(c))

    async def _stream(self, request: web.Request, req: GenerationRequest,
                      chunks: Any) -> web.StreamResponse:
        c = Completion(req)
        first = await _next(chunks)  # refusals (404, 400) come first: a real status for them
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._stream_events(resp, c, first, chunks)
        except ApiError as err:  # mid-stream: an error event, then the end
            await _sse(resp, err.body())
        await resp.write(DONE)
        return resp

    async def _stream_events(self, resp: web.StreamResponse, c: Completion, chunk: Any,
                             chunks: Any) -> None:
        if c.req.chat:  # OpenAI's first chat chunk carries the role
            await _sse(resp, stream_chunk(c, "", [], None, first=True))
        while True:
            pairs = c.add(chunk)
            if chunk.finish_reason is not None:
                break
            if chunk.text or pairs:
                await _sse(resp, stream_chunk(c, chunk.text, pairs, None))
            chunk = await _next(chunks)
        self._check_finish(c)
        await _sse(resp, stream_chunk(c, chunk.text, pairs, c.finish_reason))
        if c.req.include_usage:
            await _sse(resp, usage_chunk(c))


async def _next(chunks: Any) -> Any:
    chunk = await anext(chunks, None)
    if chunk is None:
        raise ApiError(500, "the model's stream ended without a final response", None,
                       "internal", "server_error")
    return chunk


async def _sse(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")
