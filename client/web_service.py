"""Running one of the client package's aiohttp services (the OpenAI API, the HTTP guard)."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web


async def serve_until_signal(app: web.Application, host: str, port: int, started: str) -> None:
    """Serve `app` on host:port until SIGINT / SIGTERM, logging `started` once listening.
    handler_cancellation: a client that disconnects cancels its handler (and what it waits on:
    the gRPC stream or the upstream request), so the server aborts that request."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logging.info(started)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
