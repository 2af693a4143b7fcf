"""python -m client.openai_api: serve the OpenAI API until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging

from client.openai_api.server import OpenAIServer, ServerSettings
from client.web_service import serve_until_signal

DEFAULTS = ServerSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.openai_api", description=__doc__)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--triton-url", default=DEFAULTS.triton_url, help="Triton gRPC HOST:PORT")
    p.add_argument("--base-model-id", default=DEFAULTS.base_model_id,
                   help="`model` value that selects the base model (no adapter)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULTS.default_max_tokens,
                   help="chat requests without max_tokens / max_completion_tokens")
    p.add_argument("--max-in-flight", type=int, default=DEFAULTS.max_in_flight,
                   help="concurrent generations; more are refused with 429")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    settings = ServerSettings(args.triton_url, args.base_model_id, args.default_max_tokens,
                              args.max_in_flight)
    await serve_until_signal(OpenAIServer(settings).app(), args.host, args.port,
                             f"OpenAI API on http://{args.host}:{args.port}/v1 "
                             f"(Triton gRPC {args.triton_url})")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[openai_api] %(message)s")
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
