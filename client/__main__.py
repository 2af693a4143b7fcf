"""python -m client "prompt" --adapter NAME [--max-tokens N] [--temperature T]
[--protocol grpc|http] [--no-stream] [--url HOST:PORT] [--chat] | --list-adapters

Prints the text as it arrives, then the finish reason and token counts on their own line.
Exits 1 printing the server's message on error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from client import (
    DEFAULT_GRPC_URL,
    DEFAULT_HTTP_URL,
    Chunk,
    ClientError,
    GenerateRequest,
    generate_http,
    list_adapters,
    stream_grpc,
    stream_http,
)

EXIT_ERROR = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", help="the prompt (a user message with --chat)")
    p.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--no-stream", action="store_true", help="one response at the end")
    p.add_argument("--url", default=None, help=f"server (default {DEFAULT_GRPC_URL} for grpc, "
                                                 f"{DEFAULT_HTTP_URL} for http)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--list-adapters", action="store_true",
                   help="print the available and resident adapters and exit")
    args = p.parse_args(argv)
    if not args.list_adapters and not args.prompt:
        p.error("a prompt is required (or --list-adapters)")
    return args


def _chunks(args: argparse.Namespace, request: GenerateRequest) -> Iterator[Chunk]:
    if args.protocol == "grpc":
        return stream_grpc(args.url or DEFAULT_GRPC_URL, request)
    url = args.url or DEFAULT_HTTP_URL
    if request.stream:
        return stream_http(url, request)
    return iter([generate_http(url, request)])


def run(args: argparse.Namespace) -> Chunk | None:
    """Print the completion as it arrives; return the last response."""
    if args.list_adapters:
        default = DEFAULT_GRPC_URL if args.protocol == "grpc" else DEFAULT_HTTP_URL
        adapters = list_adapters(args.url or default, protocol=args.protocol)
        print(json.dumps(adapters, indent=2))
        return None
    request = GenerateRequest(
        args.prompt, adapter_id=args.adapter, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        stop=args.stop, chat=args.chat or None, stream=not args.no_stream,
    )
    last = None
    for chunk in _chunks(args, request):
        print(chunk.text, end="", flush=True)
        last = chunk
    if last is not None:
        print(f"\n[finish_reason: {last.finish_reason}, input tokens: {last.num_input_tokens}, "
              f"output tokens: {last.num_output_tokens}]")
    return last


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ClientError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # connection refused, DNS, ...
        print(f"\nerror: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
