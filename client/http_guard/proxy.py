"""The guard's HTTP service (aiohttp): every request goes to Triton's HTTP port unchanged, except
that a request body is first read (up to a bound) and checked (checks.py); a refused one gets
HTTP 400 (413 too big, 415 compressed; 503 UNAVAILABLE when busy, below) with
`{"error": "INVALID_ARG: ..."}`, Triton's own error shape, and never reaches Triton.
Responses, generate_stream's server-sent events included, are streamed back as they arrive.
A client that disconnects cancels its handler, which closes the upstream connection, so Triton
cancels the request.

Checking a body is pure CPU that holds the GIL (2^20 input_ids, 8 MB of JSON: ~0.3 s), and on
the event loop it would stall every other request meanwhile. So the model's datatypes are
fetched first (async), then one function, `checks.check_body`, checks the JSON part: inline
when it is at most `inline_check_bytes` (256 KiB: ~15 ms at worst, while the hop to a worker
would add ~0.6 ms to every small request), else in a process pool of `check_workers`
(threads would not help: the parse holds the GIL).

Big checks admitted at once (running or queued for a worker) are bounded by
`max_pool_checks`; one more is refused at once with 503 UNAVAILABLE rather than made to wait:
a waiting request keeps its body (up to max_body_bytes) in memory, so a line without a bound
would let a flood of big bodies grow the guard's memory without limit, while a refusal frees
the body and tells the client to come back. A client that leaves while its check still waits
in the pool's queue cancels it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from client.http_guard.checks import GuardError, check_body

log = logging.getLogger("http_guard")
KIB, MIB = 1 << 10, 1 << 20
DEFAULT_MAX_BODY_BYTES = 16 * MIB  # nginx's client_max_body_size in docker/lb; 2^20 ids fit
# inline: 256 KiB of ids take ~15 ms to check; a worker's round trip alone is ~0.6 ms
DEFAULT_INLINE_CHECK_BYTES = 256 * KIB
DEFAULT_CHECK_WORKERS = 2
# big checks admitted per worker: the last in line waits ~4 checks (~1-2 s for 2^20 ids), and
# 2 workers hold at most 8 bodies (128 MiB at max_body_bytes) waiting
POOL_CHECKS_PER_WORKER = 4
CHUNK_BYTES = 1 << 16
# headers of one connection (RFC 9110 7.6.1), and the ones aiohttp sets itself
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length"})
MODEL_ACTION = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                          r"/(?P<action>infer|generate|generate_stream)")
# check_body's arguments: JSON part, max bytes, action, the model's input datatypes, whether
# the model streams by default
CheckArgs = tuple[bytes, int, str | None, dict[str, str] | None, bool]
# the smallest check: run once per worker at startup, to start it
WARM_UP: CheckArgs = (b"{}", 2, None, None, False)
# KServe binary tensor extension: the JSON header's length; the bytes after it are raw tensors
INFER_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class GuardSettings:
    upstream: str  # Triton's HTTP endpoint, e.g. http://server:8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metadata_ttl_s: float = 60.0  # how long a model's input datatypes are reused
    max_connections: int = 1024  # to the upstream (each open stream holds one)
    connect_timeout_s: float = 10.0
    inline_check_bytes: int = DEFAULT_INLINE_CHECK_BYTES  # larger JSON is checked in the pool
    check_workers: int = DEFAULT_CHECK_WORKERS  # processes of the check pool
    # big checks admitted at once (running or queued); one more gets 503
    max_pool_checks: int = POOL_CHECKS_PER_WORKER * DEFAULT_CHECK_WORKERS
    # models that stream unless told `"stream": false` (ours): their /generate must say so
    stream_by_default: frozenset[str] = frozenset({"slora"})

    def __post_init__(self) -> None:
        if not re.fullmatch(r"https?://[^/]+", self.upstream):
            raise ValueError(f"upstream must be http(s)://host:port, got {self.upstream!r}")
        counts = (self.max_body_bytes, self.max_connections, self.check_workers,
                  self.max_pool_checks)
        if min(counts) < 1 or self.metadata_ttl_s < 0 or self.inline_check_bytes < 0:
            raise ValueError("max_body_bytes, max_connections, check_workers and "
                             "max_pool_checks must be >= 1, metadata_ttl_s and "
                             "inline_check_bytes >= 0")


class HttpGuard:
    """One upstream session, a cache of the models' input datatypes, a process pool for big
    checks, one catch-all route."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._pool_slots = asyncio.Semaphore(settings.max_pool_checks)
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
        self._pool = self._new_pool()
        # start every worker now (one per concurrent call), not on the first big request
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, check_body, *WARM_UP)
                               for _ in range(self.settings.check_workers)))

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: a worker starts clean, without a copy of this process's event loop, sockets
        # and threads (fork would copy them)
        return ProcessPoolExecutor(self.settings.check_workers,
                                   mp_context=multiprocessing.get_context("spawn"))

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        if self._pool is not None:  # blocks until a running check ends: fine when stopping
            self._pool.shutdown(cancel_futures=True)

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
        action = match["action"] if match else None
        json_part = body
        if action == "infer" and INFER_HEADER_LENGTH in request.headers:
            json_part = body[:_header_length(request.headers[INFER_HEADER_LENGTH], len(body))]
        datatypes = None  # also when there is no such model: Triton answers that itself
        if action in ("generate", "generate_stream"):
            datatypes = await self._input_datatypes(match["model"], match["version"])
        args = (json_part, self.settings.max_body_bytes, action, datatypes,
                bool(match) and match["model"] in self.settings.stream_by_default)
        if len(json_part) <= self.settings.inline_check_bytes:
            check_body(*args)
        else:
            await self._check_in_pool(args)

    async def _check_in_pool(self, args: CheckArgs) -> None:
        """check_body in a worker process, if one of max_pool_checks slots is free (else 503).
        A dead worker breaks the whole pool: it is replaced, and the checks it lost get 503."""
        if self._pool_slots.locked():
            raise GuardError(f"the guard is checking {self.settings.max_pool_checks} large "
                             "request bodies already; retry later", 503, "UNAVAILABLE")
        async with self._pool_slots:
            pool = self._pool
            try:
                await asyncio.get_running_loop().run_in_executor(pool, check_body, *args)
            except BrokenProcessPool:
                if self._pool is pool:  # the first of its checks to notice replaces it
                    log.warning("a check worker died; starting a new pool")
                    self._pool = self._new_pool()
                    pool.shutdown(wait=False)
                raise GuardError("a check worker died while checking this body; retry",
                                 503, "UNAVAILABLE") from None

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
