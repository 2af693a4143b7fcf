"""The guard's HTTP service (aiohttp): every request goes to Triton's HTTP port unchanged, except
that a request body is first read (up to a bound) and checked (checks.py); a refused one gets
HTTP 400 (413 too big, 415 compressed) with `{"error": "INVALID_ARG: ..."}`, Triton's own
error shape, and never reaches Triton. Responses, generate_stream's server-sent events
included, are streamed back as they arrive. A client that disconnects cancels its handler,
which closes the upstream connection, so Triton cancels the request.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from client.http_guard.checks import GuardError, check_generate, check_infer, parse_body

log = logging.getLogger("http_guard")
MIB = 1 << 20
DEFAULT_MAX_BODY_BYTES = 16 * MIB  # nginx's client_max_body_size in docker/lb; 2^20 ids fit
CHUNK_BYTES = 1 << 16
# headers of one connection (RFC 9110 7.6.1), and the ones aiohttp sets itself
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length"})
MODEL_ACTION = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                          r"/(?P<action>infer|generate|generate_stream)")
# KServe binary tensor extension: the JSON header's length; the bytes after it are raw tensors
INFER_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class GuardSettings:
    upstream: str  # Triton's HTTP endpoint, e.g. http://server:8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metadata_ttl_s: float = 60.0  # how long a model's input datatypes are reused
    max_connections: int = 1024  # to the upstream (each open stream holds one)
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"https?://[^/]+", self.upstream):
            raise ValueError(f"upstream must be http(s)://host:port, got {self.upstream!r}")
        if self.max_body_bytes < 1 or self.max_connections < 1 or self.metadata_ttl_s < 0:
            raise ValueError("max_body_bytes and max_connections must be >= 1, "
                             "metadata_ttl_s >= 0")


class HttpGuard:
    """One upstream session, a cache of the models' input datatypes, one catch-all route."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._datatypes: dict[tuple[str, str | None], tuple[float, dict[str, str]]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,  # Triton's compressed responses pass through as they are
            connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
            timeout=aiohttp.ClientTimeout(total=None,
                                          sock_connect=self.settings.connect_timeout_s))

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
            if body:
                await self._check(request, body)
        except GuardError as exc:
            log.info("refused %s %s: %s", request.method, request.path, exc)
            return web.json_response({"error": str(exc)}, status=exc.status)
        return await self._forward(request, body)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, read in chunks, refused as soon as it passes the bound."""
        if not request.body_exists:
            return b""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise GuardError(f"compressed request bodies ({encoding}) are not accepted: the "
                             "guard must read the JSON", 415)
        limit = self.settings.max_body_bytes
        if (request.content_length or 0) > limit:
            raise GuardError(f"request body over {limit} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise GuardError(f"request body over {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _check(self, request: web.Request, body: bytes) -> None:
        """Every body is bounded JSON; generate / infer bodies also fit the inputs' types."""
        match = MODEL_ACTION.fullmatch(request.path)
        json_part = body
        if match and match["action"] == "infer" and INFER_HEADER_LENGTH in request.headers:
            json_part = body[:_header_length(request.headers[INFER_HEADER_LENGTH], len(body))]
        parsed = parse_body(json_part, self.settings.max_body_bytes)
        if match is None:
            return
        if match["action"] == "infer":
            check_infer(parsed)
            return
        datatypes = await self._input_datatypes(match["model"], match["version"])
        if datatypes is not None:  # None: no such model; Triton answers that itself
            check_generate(parsed, datatypes)

    async def _input_datatypes(self, model: str, version: str | None) -> dict[str, str] | None:
        """{input name: datatype} from Triton's model metadata, cached for metadata_ttl_s."""
        key = (model, version)
        cached = self._datatypes.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.settings.metadata_ttl_s:
            return cached[1]
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        try:
            async with self._session.get(self.settings.upstream + path) as resp:
                if resp.status != web.HTTPOk.status_code:
                    return None
                metadata = await resp.json()
        except (aiohttp.ClientError, ValueError):
            return None  # the forward reports an unreachable upstream
        datatypes = {i["name"]: i["datatype"] for i in metadata.get("inputs", [])}
        self._datatypes[key] = (time.monotonic(), datatypes)
        return datatypes

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """The request to Triton; its response streamed back chunk by chunk (SSE events)."""
        url = self.settings.upstream + str(request.rel_url)
        try:
            upstream = await self._session.request(
                request.method, url, headers=_end_to_end(request.headers), data=body or None,
                allow_redirects=False)
        except aiohttp.ClientError as exc:
            message = f"UNAVAILABLE: Triton's HTTP endpoint {self.settings.upstream}: {exc}"
            return web.json_response({"error": message}, status=502)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=_end_to_end(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response


def _header_length(value: str, body_length: int) -> int:
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not 0 <= length <= body_length:
        raise GuardError(f"invalid {INFER_HEADER_LENGTH} {value!r}: not an integer in "
                         f"[0, {body_length}]")
    return length


def _end_to_end(headers: Any) -> CIMultiDict:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)
