"""A queue longer than the host cache: how many disk -> host loads the engine makes.

The engine on the CPU with a tiny random Llama (SmolLM2's tokenizer), `--adapters` ids that
hard-link one rank-8 q,k,v,o adapter (as the GPU benchmarks make thousands), `--requests` short
requests drawn uniformly from them and queued at once, a host cache with room for `--host-fit`
adapters and a small pool (so adapters also leave the pool). Each necessary host load feeds a
pool load; loads beyond that are adapters evicted from host RAM before their request took them
(thrash). Prints, per run: steps, host loads and evictions, pool loads and evictions.

    .venv/bin/python bench/bench_host_cache_queue.py [--adapters 200 --requests 300
        --host-fit 8,40,400 --repeats 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slora_backend import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from slora_backend.adapters.host_arena import footprint  # noqa: E402
from slora_testing.synthetic_adapters import (  # noqa: E402
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    link_adapter,
    load_spec,
    make_tiny_model,
    write_adapter,
)

RANK = 8
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
POOL_BYTES = 64 << 20  # a few dozen of these adapters next to the KV cache
PROMPT = [5] * 8
MAX_TOKENS = 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--host-fit", default="8,40,400", help="host cache sizes, in adapters")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tokenizer", type=Path,
                   default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    return p.parse_args()


def make_adapters(root: Path, model_dir: Path, count: int) -> None:
    recipe = AdapterRecipe(RANK, MODULES, 2.0 * RANK, False, "list", seed=1)
    first = write_adapter(root / "a0", adapter_config(recipe),
                          adapter_tensors(recipe, load_spec(model_dir), torch.float32))
    for i in range(1, count):
        link_adapter(first, root / f"a{i}")


def one_run(model_dir: Path, adapter_dir: Path, args: argparse.Namespace, fit: int) -> dict:
    config = dict(model=str(model_dir), adapter_dir=str(adapter_dir), dtype="float32",
                  device="cpu", pool_bytes=POOL_BYTES, max_num_seqs=32,
                  max_waiting=4 * args.requests)
    engine = LLMEngine(EngineConfig(**config, host_cache_bytes=1 << 30))
    nbytes = footprint(engine.source.inspect("a0").nbytes)
    engine.close()
    engine = LLMEngine(EngineConfig(**config, host_cache_bytes=fit * nbytes))
    rng = random.Random(0)
    used = set()
    for i in range(args.requests):
        adapter = f"a{rng.randrange(args.adapters)}"
        used.add(adapter)
        engine.add_request(f"r{i}", prompt_token_ids=PROMPT, adapter_id=adapter,
                           params=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                 temperature=0.0))
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    stats = engine.stats().adapter_cache
    engine.close()
    return {"host_fit": fit, "seconds": round(time.perf_counter() - start, 2), "steps": steps,
            "distinct": len(used), "host_loads": stats["loads"],
            "host_evictions": stats["evictions"], "pool_loads": stats["pool_loads"],
            "pool_evictions": stats["pool_evictions"]}


def main() -> None:
    args = parse_args()
    fits = [int(v) for v in args.host_fit.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-host-queue-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", args.tokenizer)
        adapter_dir = Path(tmp) / "adapters"
        adapter_dir.mkdir()
        make_adapters(adapter_dir, model_dir, args.adapters)
        runs = [one_run(model_dir, adapter_dir, args, fit)
                for fit in tqdm(fits * args.repeats, desc="runs")]
    print("| host cache (adapters) | steps | distinct adapters | host loads | host evictions "
          "| pool loads | pool evictions |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(runs, key=lambda r: r["host_fit"]):
        print(f"| {r['host_fit']} | {r['steps']} | {r['distinct']} | {r['host_loads']} | "
              f"{r['host_evictions']} | {r['pool_loads']} | {r['pool_evictions']} |")


if __name__ == "__main__":
    main()
