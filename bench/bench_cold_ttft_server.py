"""Cold start as a user sees it: TTFT of an adapter only on disk vs the same adapter warm,
through a running tritonserver while it serves a background load.

The script writes one rank-R adapter (--modules, all seven by default) for the served model into
the server's adapter folder (SLORA_ADAPTER_DIR; adapters are found on demand) and hard-links it
under a new id per repeat, so each cold request really reads its adapter from disk (page cache
warm, as in the issue) while the warm request right after it finds the same adapter resident.
Meanwhile --load-clients gRPC streams keep base-model requests running. Reports median TTFT cold
and warm and the median paired difference (cold minus warm), as JSON (--out). Each request
follows the previous one's first token, which comes out at the end of a step: the requests
arrive early in a step. --jitter-ms J waits a random 0-J ms before each one, so that they
arrive at any point of a step (J about one step's time). With --serve it
starts the real server itself (scripts/tritonserver.sh, the model --base-model, SLORA_*
settings from --server-env) and stops it at the end.

    SLORA_ADAPTER_DIR=/tmp/cold-adapters scripts/tritonserver.sh --model-repository \
        model_repository &                       # then, once it is ready:
    .venv/bin/python bench/bench_cold_ttft_server.py --adapter-dir /tmp/cold-adapters \
        --url localhost:8001 --rank 64           # SmolLM2 fp32: a 78-MB file
    .venv/bin/python bench/bench_cold_ttft_server.py --adapter-dir /tmp/cold-adapters --serve
    # GPU host: a Llama-7B-shaped model (bench/make_served_model.py), random weights
    python bench/bench_cold_ttft_server.py --serve --adapter-dir DIR/adapters \
        --base-model DIR/model --server-env SLORA_LOAD_FORMAT=dummy,SLORA_MAX_NUM_SEQS=256 \
        --modules q_proj,k_proj,v_proj,o_proj --dtype float16 --load-clients 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_served_vs_engine import start_server  # noqa: E402 (after the path fix)
from bench_server_throughput import Request, StreamClient  # noqa: E402

from slora_backend.model.spec import MODULE_ORDER  # noqa: E402
from slora_testing.servers import stop_server  # noqa: E402
from slora_testing.synthetic_adapters import (  # noqa: E402
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    link_adapter,
    load_spec,
    write_adapter,
)

PROMPT = "Write one sentence about the sea."
LOAD_PROMPT = "Tell me a long story about a lighthouse keeper and the ships she saw."
SOURCE_ID = "cold-source"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapter-dir", type=Path, required=True, help="the server's adapter folder")
    p.add_argument("--url", default="localhost:8001")
    p.add_argument("--model", default="slora")
    p.add_argument("--base-model", type=Path,
                   default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="of the adapter file (the server's dtype)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--load-clients", type=int, default=4)
    p.add_argument("--load-max-tokens", type=int, default=64)
    p.add_argument("--modules", default=",".join(MODULE_ORDER), help="the adapter's targets")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="wait a random 0..J ms before each measured request (seeded)")
    p.add_argument("--serve", action="store_true",
                   help="start the real server (model --base-model) and stop it at the end")
    p.add_argument("--server-env", default="", help="K=V,... for the server (SLORA_* settings)")
    p.add_argument("--server-log", type=Path, default=None, help="--serve: its log file")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cold_ttft.json")
    return p.parse_args()


def write_ids(args: argparse.Namespace) -> tuple[list[str], int]:
    """One real adapter, hard-linked under one new id per repeat; its file size."""
    spec = load_spec(args.base_model)
    recipe = AdapterRecipe(args.rank, tuple(args.modules.split(",")), 2.0 * args.rank, False,
                           "list", seed=7)
    dtype = getattr(torch, args.dtype)
    src = write_adapter(args.adapter_dir / SOURCE_ID, adapter_config(recipe),
                        adapter_tensors(recipe, spec, dtype=dtype))
    suffix = os.urandom(4).hex()  # ids never seen by this server before
    names = []
    for i in range(args.repeats):
        names.append(link_adapter(src, args.adapter_dir / f"cold-{suffix}-{i}").name)
    return names, sum(f.stat().st_size for f in src.iterdir())


def background_load(args: argparse.Namespace, stop: threading.Event) -> list[threading.Thread]:
    def loop() -> None:
        client = StreamClient(args.url, args.model, args.load_max_tokens, args.timeout)
        try:
            while not stop.is_set():
                client.run(Request(0, "", LOAD_PROMPT))
        finally:
            client.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.load_clients)]
    for t in threads:
        t.start()
    return threads


def ttft_ms(client: StreamClient, adapter: str) -> float:
    rec = client.run(Request(1, adapter, PROMPT))
    if not rec.ok or rec.first is None:
        raise RuntimeError(f"request with adapter {adapter!r} failed: {rec.error}")
    return (rec.first - rec.start) * 1e3


def measure(args: argparse.Namespace, names: list[str]) -> tuple[list[float], list[float]]:
    """(cold, warm) TTFT of each id in turn, under the background load."""
    client = StreamClient(args.url, args.model, 1, args.timeout)
    stop = threading.Event()
    load = background_load(args, stop)
    cold, warm = [], []
    rng = random.Random(0)

    def after_jitter(name: str) -> float:
        time.sleep(rng.uniform(0.0, args.jitter_ms) / 1e3)
        return ttft_ms(client, name)

    try:
        ttft_ms(client, "")  # the stream and the server warmed up
        for name in tqdm(names, desc="cold/warm", unit="pair"):
            cold.append(after_jitter(name))
            warm.append(after_jitter(name))
    finally:
        stop.set()
        for t in load:
            t.join(args.timeout)
        client.close()
    return cold, warm


def serve(args: argparse.Namespace) -> object:
    """The real tritonserver on free ports, serving --base-model with --adapter-dir."""
    env = {**os.environ, "SLORA_MODEL": str(args.base_model.resolve()),
           "SLORA_ADAPTER_DIR": str(args.adapter_dir.resolve())}
    for item in filter(None, (s.strip() for s in args.server_env.split(","))):
        key, _, value = item.partition("=")
        env[key] = value
    log = args.server_log or args.out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, args.url, _ = start_server(env, log, REPO / "model_repository")
    return proc


def main() -> None:
    args = parse_args()
    # a `timeout` around this script sends SIGTERM: unwind, so that --serve stops its server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{__file__}: terminated"))
    args.adapter_dir.mkdir(parents=True, exist_ok=True)
    names, file_bytes = write_ids(args)
    proc = serve(args) if args.serve else None
    try:
        cold, warm = measure(args, names)
    finally:
        if proc is not None:
            stop_server(proc)
    result = {"adapter_file_mb": file_bytes / 1e6, "rank": args.rank, "modules": args.modules,
              "repeats": args.repeats, "load_clients": args.load_clients,
              "jitter_ms": args.jitter_ms,
              "ttft_cold_ms": statistics.median(cold), "ttft_warm_ms": statistics.median(warm),
              "added_cold_ms": statistics.median([c - w for c, w in zip(cold, warm)]),
              "cold_ms": [round(c, 1) for c in cold], "warm_ms": [round(w, 1) for w in warm],
              "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
