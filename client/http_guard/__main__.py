"""python -m client.http_guard: serve the guard in front of Triton's HTTP port until SIGINT /
SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging

from client.http_guard.proxy import (
    DEFAULT_CHECK_WORKERS,
    DEFAULT_INLINE_CHECK_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    POOL_CHECKS_PER_WORKER,
    GuardSettings,
    HttpGuard,
)
from client.web_service import serve_until_signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.http_guard", description=__doc__)
    p.add_argument("--upstream", required=True,
                   help="Triton's HTTP endpoint, http://HOST:PORT (e.g. http://server:8000)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413")
    p.add_argument("--check-workers", type=int, default=DEFAULT_CHECK_WORKERS,
                   help="processes that check large request bodies off the event loop")
    p.add_argument("--inline-check-bytes", type=int, default=DEFAULT_INLINE_CHECK_BYTES,
                   help="bodies up to this size are checked on the event loop, larger ones "
                        "by the check workers")
    p.add_argument("--stream-by-default", default="slora",
                   help="comma-separated models that stream unless a request says "
                        "\"stream\": false; their /generate requests must say it")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    settings = GuardSettings(args.upstream, args.max_body_bytes,
                             inline_check_bytes=args.inline_check_bytes,
                             check_workers=args.check_workers,
                             max_pool_checks=POOL_CHECKS_PER_WORKER * args.check_workers,
                             stream_by_default=frozenset(
                                 filter(None, args.stream_by_default.split(","))))
    app = HttpGuard(settings).app()
    await serve_until_signal(app, args.host, args.port,
                             f"guarding {args.upstream} on http://{args.host}:{args.port}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[http_guard] %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
