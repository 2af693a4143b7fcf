"""python -m client.http_guard: serve the guard in front of Triton's HTTP port until SIGINT /
SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from aiohttp import web

from client.http_guard.proxy import DEFAULT_MAX_BODY_BYTES, GuardSettings, HttpGuard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.http_guard", description=__doc__)
    p.add_argument("--upstream", required=True,
                   help="Triton's HTTP endpoint, http://HOST:PORT (e.g. http://server:8000)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    settings = GuardSettings(args.upstream, args.max_body_bytes)
    # handler_cancellation: a client that disconnects closes its upstream request too
    runner = web.AppRunner(HttpGuard(settings).app(), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    logging.info("guarding %s on http://%s:%d", args.upstream, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[http_guard] %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
