"""S-LoRA's Table 3 on one GPU: throughput against the number of adapters, cold and preloaded.

For each n in --ns, a fresh engine (the random Llama-7B-shaped model is built once and shared)
serves, in each mode, the same --num-requests requests (input and output lengths uniform in
--lengths, EOS ignored, greedy, all queued at once, adapters drawn uniformly from n ids; n=0 =
base model).
Adapters are q,k,v,o with ranks cycled from --ranks (S2 = 8/16/32/64), one weights file per
rank hard-linked under every id (bench_engine_gpu.make_adapters), so the page cache is warm.
Each n > 0 runs in each of --modes, on its engine, in this order:
  cold       adapters only on disk at the start: disk -> host -> pool while serving;
  preloaded  then the pool emptied of adapters and every adapter the requests use loaded into
             host RAM before the clock starts (S-LoRA's setting); the preload's aggregate GB/s
             is reported too.
Reported per run: requests/s, output tokens/s, host loads, pool loads and evictions per request,
preemptions; the targets (n=1000 and 2000 cold >= 90% of n=5 cold, n=5 >= 90% of base);
a JSON (--out) and a PNG of requests/s against n next to it.

    python bench/bench_table3.py --tokenizer DIR                    # the full table (CUDA)
    python bench/bench_table3.py --tokenizer DIR --num-requests 300 # half the requests
    python bench/bench_table3.py --tokenizer .cache/models/SmolLM2-135M-Instruct --tiny \\
        --device cpu --ns 0,2,8 --num-requests 8 --lengths 4,12      # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_engine_gpu import (  # noqa: E402 (after the path fix)
    LLAMA7B_CONFIG,
    TINY_CONFIG,
    add_workload_args,
    make_adapters,
    make_model_dir,
    make_requests,
    run,
    sync,
)

from slora_backend import EngineConfig, LLMEngine  # noqa: E402
from slora_backend.model.llama import LlamaModel  # noqa: E402
from slora_backend.model.spec import ModelSpec  # noqa: E402

TARGET_FRACTION = 0.9  # the bar: within 10%
WARM_REQUESTS = 8  # short base requests per fresh engine before the clock (prefill compiles)
WARM_PROMPT = 64
WARM_TOKENS = 4
GIB = 1 << 30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_workload_args(p, num_requests=600)
    p.add_argument("--ns", default="0,5,100,1000,2000", help="adapter counts (0 = base model)")
    p.add_argument("--modes", default="cold,preloaded")
    p.add_argument("--host-cache-gib", type=float, default=40.0)
    p.add_argument("--host-cache-workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="a small model instead of Llama-7B")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "table3.json")
    args = p.parse_args()
    args.ns = [int(n) for n in args.ns.split(",")]
    args.modes = args.modes.split(",")
    if any(n < 0 for n in args.ns) or not set(args.modes) <= {"cold", "preloaded"}:
        p.error("--ns must be >= 0, --modes a subset of cold,preloaded")
    args.async_scheduling = "auto"
    return args


def engine_config(args: argparse.Namespace, model_dir: Path, adapter_dir: Path, n: int,
                  dtype: torch.dtype) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir), adapter_dir=str(adapter_dir), dtype=str(dtype).removeprefix("torch."),
        device=args.device, pool_bytes=args.pool_bytes, pool_fraction=args.pool_fraction,
        max_rank=max(int(r) for r in args.ranks.split(",")), max_loaded_adapters=max(n, 1) + 1,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=4 * args.num_requests, host_cache_bytes=int(args.host_cache_gib * GIB),
        host_cache_workers=args.host_cache_workers,
        cuda_graph_max_batch=args.cuda_graph_max_batch, async_scheduling=args.async_scheduling)


def workload(args: argparse.Namespace, names: list[str], n: int, vocab: int) -> list[dict]:
    """The same prompts and lengths for every n (seeded); adapters drawn uniformly from n."""
    requests = make_requests(args, ["base"], vocab)
    rng = random.Random(args.seed + 1)
    return [dict(r, adapter=rng.choice(names[:n]) if n else None) for r in requests]


def preload(engine: LLMEngine, requests: list[dict]) -> dict:
    """Load every adapter the requests use into host RAM (all at once, the loader threads in
    parallel); the aggregate disk -> host rate."""
    used = list(dict.fromkeys(r["adapter"] for r in requests))
    start = time.perf_counter()
    for adapter in used:
        engine.host_cache.prefetch(adapter)
    nbytes = sum(engine.host_cache.wait(a).nbytes for a in used)
    seconds = time.perf_counter() - start
    return {"adapters": len(used), "gb": round(nbytes / 1e9, 2), "seconds": round(seconds, 2),
            "gb_per_s": round(nbytes / seconds / 1e9, 2)}


def timed_run(engine: LLMEngine, requests: list[dict], n: int, mode: str) -> dict:
    """One mode's timed workload on an engine already warmed up."""
    loaded = None
    if mode == "preloaded":  # S-LoRA's setting: in host RAM, none in the pool
        engine.adapters.evict_idle(engine.pool.num_pages)
        for adapter in {r["adapter"] for r in requests}:  # reloaded: the preload is timed
            engine.host_cache.evict(adapter)
        loaded = preload(engine, requests)
    before = engine.stats().adapter_cache
    result = run(engine, requests, n > 0, f"n={n} {mode}")
    after = engine.stats().adapter_cache
    per_request = {k: round((after[k] - before[k]) / result["requests"], 3)
                   for k in ("loads", "evictions", "pool_loads", "pool_evictions")}
    # pool_fraction is of the free memory: a smaller pool would mean an earlier engine's
    # memory was not given back
    return {"n": n, "mode": mode, "preload": loaded, **result,
            "host_loads": after["loads"] - before["loads"], "per_request": per_request,
            "pool_pages": engine.pool.num_pages,
            "distinct_adapters": len({r["adapter"] for r in requests if r["adapter"]})}


def runs_for_n(args: argparse.Namespace, model: tuple, dirs: tuple[Path, Path],
               names: list[str], n: int, dtype: torch.dtype) -> list[dict]:
    """A fresh engine for this n, warmed up on the base model, then each mode: cold first (on
    disk only), then preloaded (the pool emptied, every used adapter in host RAM). One engine
    for both modes halves the engine starts (CUDA graph captures: 17-27 s each on the H200)."""
    modes = ["base"] if n == 0 else [m for m in ("cold", "preloaded") if m in args.modes]
    t0 = time.perf_counter()
    engine = LLMEngine(engine_config(args, *dirs, n, dtype), model=model)
    init_s = time.perf_counter() - t0
    try:
        requests = workload(args, names, n, model[0].vocab_size)
        warm = [dict(r, max_tokens=WARM_TOKENS, prompt=r["prompt"][:WARM_PROMPT], adapter=None)
                for r in requests[:WARM_REQUESTS]]
        run(engine, warm, False, f"warm n={n}")
        engine.host_cache.wait_pinned()  # the host cache's pinned memory is start-up work
        return [dict(timed_run(engine, requests, n, mode), engine_init_s=round(init_s, 2))
                for mode in modes]
    finally:
        engine.close()
        del engine
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def targets(runs: list[dict]) -> dict:
    """The issue's ratios, where the runs exist."""
    rate = {(r["n"], r["mode"]): r["requests_per_s"] for r in runs}
    out = {}
    if (5, "cold") in rate and (0, "base") in rate:
        out["n5_cold_vs_base"] = round(rate[(5, "cold")] / rate[(0, "base")], 3)
    for n in (1000, 2000):
        for mode in ("cold", "preloaded"):
            if (n, mode) in rate and (5, mode) in rate:
                out[f"n{n}_{mode}_vs_n5"] = round(rate[(n, mode)] / rate[(5, mode)], 3)
    out["all_met"] = all(v >= TARGET_FRACTION for v in out.values()) if out else None
    return out


def main() -> None:
    args = parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model_config = TINY_CONFIG if args.tiny else LLAMA7B_CONFIG
    spec = ModelSpec.from_hf_config(model_config)
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-table3-") as tmp:
        model_dir = make_model_dir(Path(tmp), args.tokenizer, model_config)
        adapter_dir = Path(tmp) / "adapters"
        names = make_adapters(adapter_dir, spec, max(args.ns), ranks)
        t0 = time.perf_counter()
        model = LlamaModel.random(spec, dtype, args.device, seed=args.seed)
        sync(args.device)
        results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else args.device, "model_build_s": round(time.perf_counter() - t0, 2),
                   "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
        for n in tqdm(args.ns, desc="table 3", unit="engine"):
            results["runs"] += runs_for_n(args, (spec, model), (model_dir, adapter_dir), names,
                                          n, dtype)
    results["targets"] = targets(results["runs"])
    print(json.dumps({"runs": [{k: r[k] for k in ("n", "mode", "requests_per_s", "host_loads",
                                                   "per_request", "preload", "pool_pages")}
                               for r in results["runs"]], "targets": results["targets"]},
                     indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"results: {args.out} and {args.out.with_suffix('.png')}")


def plot(results: dict, path: Path) -> None:
    """Requests/s against n, one line per mode, the base model and the 90%-of-n=5 bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    runs = results["runs"]
    ns = sorted({r["n"] for r in runs})
    x_of = {n: i for i, n in enumerate(ns)}  # categorical x: 0, 5, 100, 1000, 2000
    for mode, color in (("cold", "#c44e52"), ("preloaded", "#55a868")):
        pts = [(x_of[r["n"]], r["requests_per_s"]) for r in runs if r["mode"] == mode]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"adapters {mode}")
    for r in runs:
        if r["mode"] == "base":
            ax.axhline(r["requests_per_s"], color="#4c72b0", ls=":", label="base model (n=0)")
        if r["n"] == 5 and r["mode"] == "cold":
            ax.axhline(TARGET_FRACTION * r["requests_per_s"], color="#c44e52", ls="--",
                       lw=0.8, label="90% of n=5 cold")
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("adapters (n)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    args = results["args"]
    ax.set_title(f"{results['device']}: {args['num_requests']} requests, ranks {args['ranks']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
