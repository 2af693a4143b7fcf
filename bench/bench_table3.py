"""S-LoRA's Table 3 on one GPU: throughput against the number of adapters, cold and preloaded.

For each n in --ns the same --num-requests requests (input and output lengths uniform in
--lengths, EOS ignored, greedy, all queued at once, adapters drawn uniformly from n ids; n=0 =
base model) run through ONE engine, in each of --modes:
  cold       adapters only on disk at the start: disk -> host -> pool while serving;
  preloaded  every adapter the requests use loaded into host RAM before the clock starts
             (S-LoRA's setting); the preload's aggregate GB/s is reported too.
Adapters are q,k,v,o with ranks cycled from --ranks (S2 = 8/16/32/64), one weights file per
rank hard-linked under every id (bench_engine_gpu.make_adapters), so the page cache is warm.

One engine for every run (a start costs 17-27 s of CUDA graph capture and arena pinning on the
H200: five of them did not fit one device call). What a fresh engine per n would give, each run
gets: before it, the pool holds no adapter and no KV page, the host cache no adapter, and each n
has its own adapter ids (n0005-a000-r8, ...), never seen by the engine, so a cold run validates
and reads every adapter it uses from disk like a fresh server. What stays is what a serving
engine keeps: compiled kernels and CUDA graphs (all warmed up before the first run, LoRA
included), the host cache's pinned arena, and validated headers (one per rank).

Runs go in priority order (base, the smallest n cold, the other n cold from the largest, then
the same preloaded), so that --deadline-s, when it cuts, cuts the least needed; the JSON is
rewritten after every run.
Reported per run: requests/s, output tokens/s, host loads, pool loads and evictions per request,
preemptions, and per step phase (bench_engine_gpu.step_phase) steps, seconds, the mean running
batch and the pool loads; the targets (n=1000 and 2000 cold >= 90% of n=5 cold, n=5 >= 90% of
base); a table on stdout, a JSON (--out) and a PNG of requests/s against n next to it.

    python bench/bench_table3.py --tokenizer DIR                    # the full table (CUDA)
    python bench/bench_table3.py --tokenizer DIR --deadline-s 420   # stop starting runs at 420 s
    python bench/bench_table3.py --tokenizer .cache/models/SmolLM2-135M-Instruct --tiny \\
        --device cpu --ns 0,2,8 --num-requests 8 --lengths 4,12      # CPU smoke run
"""

from __future__ import annotations

import argparse
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
WARM_REQUESTS = 32  # short requests before the first run: prefill and LoRA kernels compile
WARM_PROMPT = 64
WARM_TOKENS = 4
WARM_PREFIX = "warm-"
GIB = 1 << 30
DEADLINE_MARGIN = 1.15  # a run is started only if the longest so far fits this many times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_workload_args(p, num_requests=600)
    p.add_argument("--ns", default="0,5,100,1000,2000", help="adapter counts (0 = base model)")
    p.add_argument("--modes", default="cold,preloaded")
    p.add_argument("--host-cache-gib", type=float, default=40.0)
    p.add_argument("--host-cache-workers", type=int, default=0, help="0 = the engine's auto")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no run that would end after this many seconds (0 = no limit)")
    p.add_argument("--tiny", action="store_true", help="a small model instead of Llama-7B")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sync-debug", action="store_true",
                   help="count the host's waits for the device by source line (sync_sites)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "table3.json")
    args = p.parse_args()
    args.ns = [int(n) for n in args.ns.split(",")]
    args.modes = args.modes.split(",")
    if any(n < 0 for n in args.ns) or not set(args.modes) <= {"cold", "preloaded"}:
        p.error("--ns must be >= 0, --modes a subset of cold,preloaded")
    args.async_scheduling = "auto"
    return args


def engine_config(args: argparse.Namespace, model_dir: Path, adapter_dir: Path,
                  dtype: torch.dtype) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir), adapter_dir=str(adapter_dir), dtype=str(dtype).removeprefix("torch."),
        device=args.device, pool_bytes=args.pool_bytes, pool_fraction=args.pool_fraction,
        max_rank=max(int(r) for r in args.ranks.split(",")),
        max_loaded_adapters=max(max(args.ns), WARM_REQUESTS) + 1,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=4 * args.num_requests, host_cache_bytes=int(args.host_cache_gib * GIB),
        host_cache_workers=args.host_cache_workers,
        cuda_graph_max_batch=args.cuda_graph_max_batch, async_scheduling=args.async_scheduling,
        cuda_graph_mixed=args.cuda_graph_mixed)


def run_order(ns: list[int], modes: list[str]) -> list[tuple[int, str]]:
    """Base first, then each mode over n: the smallest n > 0 (the reference), then the others
    from the largest."""
    adapters = sorted(n for n in ns if n > 0)
    by_priority = adapters[:1] + sorted(adapters[1:], reverse=True)
    return ([(0, "base")] if 0 in ns else []) + [(n, mode) for mode in ("cold", "preloaded")
                                                 if mode in modes for n in by_priority]


def workload(args: argparse.Namespace, names: list[str], n: int, vocab: int) -> list[dict]:
    """The same prompts and lengths for every n (seeded); adapters drawn uniformly from n."""
    requests = make_requests(args, ["base"], vocab)
    rng = random.Random(args.seed + 1)
    return [dict(r, adapter=rng.choice(names) if n else None) for r in requests]


def empty_tiers(engine: LLMEngine) -> None:
    """The pool without adapters (and, between runs, without KV), the host cache empty."""
    sync(engine.config.device)  # every pool copy done: poll() flips them all
    engine.adapters.poll()
    engine.adapters.evict_idle(engine.pool.num_pages)
    for adapter in engine.host_cache.resident():
        engine.host_cache.evict(adapter)
    assert engine.pool.num_free == engine.pool.num_pages, "pages still held after a run"


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


def timed_run(engine: LLMEngine, requests: list[dict], n: int, mode: str,
              sync_debug: bool = False) -> dict:
    """One run from empty tiers (host RAM filled first when preloaded)."""
    empty_tiers(engine)
    loaded = preload(engine, requests) if mode == "preloaded" else None
    before = engine.stats().adapter_cache
    result = run(engine, requests, n > 0, f"n={n} {mode}", sync_debug=sync_debug)
    after = engine.stats().adapter_cache
    per_request = {k: round((after[k] - before[k]) / result["requests"], 3)
                   for k in ("loads", "evictions", "pool_loads", "pool_evictions")}
    return {"n": n, "mode": mode, "preload": loaded, **result,
            "host_loads": after["loads"] - before["loads"], "per_request": per_request,
            "pool_pages": engine.pool.num_pages,
            "distinct_adapters": len({r["adapter"] for r in requests if r["adapter"]})}


def warm_up(engine: LLMEngine, names: list[str], vocab: int, args: argparse.Namespace) -> None:
    """Short requests, base and LoRA (one adapter per rank), before any clock: prefill shapes
    and the LoRA kernels compile here, not in the first timed run."""
    requests = make_requests(argparse.Namespace(**{**vars(args), "num_requests": WARM_REQUESTS}),
                             names, vocab)
    warm = [dict(r, max_tokens=WARM_TOKENS, prompt=r["prompt"][:WARM_PROMPT],
                 adapter=names[i % len(names)] if i % 4 else None)
            for i, r in enumerate(requests)]
    run(engine, warm, True, "warm-up")
    engine.host_cache.wait_pinned()  # the host cache's pinned memory is start-up work


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


def run_all(args: argparse.Namespace, engine: LLMEngine, names: dict[int, list[str]],
            results: dict, started: float) -> None:
    """Every (n, mode) in priority order, each written to --out as soon as it is done."""
    longest = 0.0
    for n, mode in tqdm(run_order(args.ns, args.modes), desc="table 3", unit="run"):
        elapsed = time.perf_counter() - started
        if args.deadline_s and elapsed + DEADLINE_MARGIN * longest > args.deadline_s:
            results["skipped"].append({"n": n, "mode": mode, "at_s": round(elapsed, 1)})
            continue
        t0 = time.perf_counter()
        requests = workload(args, names.get(n, []), n, engine.spec.vocab_size)
        results["runs"].append(timed_run(engine, requests, n, mode, args.sync_debug))
        longest = max(longest, time.perf_counter() - t0)
        results["targets"] = targets(results["runs"])
        save(results, args.out)


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model_config = TINY_CONFIG if args.tiny else LLAMA7B_CONFIG
    spec = ModelSpec.from_hf_config(model_config)
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-table3-") as tmp:
        model_dir = make_model_dir(Path(tmp), args.tokenizer, model_config)
        adapter_dir = Path(tmp) / "adapters"
        first: dict[int, Path] = {}  # one real file per rank, linked under every id
        warm_names = make_adapters(adapter_dir, spec, len(ranks), ranks, WARM_PREFIX, first)
        names = {n: make_adapters(adapter_dir, spec, n, ranks, f"n{n:04d}-", first)
                 for n in args.ns if n > 0}
        t0 = time.perf_counter()
        model = LlamaModel.random(spec, dtype, args.device, seed=args.seed)
        sync(args.device)
        results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else args.device, "model_build_s": round(time.perf_counter() - t0, 2),
                   "args": {k: str(v) for k, v in vars(args).items()}, "runs": [],
                   "skipped": []}
        t0 = time.perf_counter()
        engine = LLMEngine(engine_config(args, model_dir, adapter_dir, dtype),
                           model=(spec, model))
        results["engine_init_s"] = round(time.perf_counter() - t0, 2)
        results["host_cache_workers"] = engine.config.resolved_host_cache_workers
        try:
            t0 = time.perf_counter()
            warm_up(engine, warm_names, spec.vocab_size, args)
            results["warm_up_s"] = round(time.perf_counter() - t0, 2)
            run_all(args, engine, names, results, started)
        finally:
            engine.close()
    results["targets"] = targets(results["runs"])
    results["total_s"] = round(time.perf_counter() - started, 1)
    save(results, args.out)
    print(table(results))
    print(f"results: {args.out} and {args.out.with_suffix('.png')}")


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if results["runs"]:
        plot(results, path.with_suffix(".png"))


def table(results: dict) -> str:
    """The short table: requests/s per run, % of the smallest n in its mode (5 in the issue's
    table), tier traffic per request,
    seconds in steps while requests wait (queue) and after."""
    rate = {(r["n"], r["mode"]): r["requests_per_s"] for r in results["runs"]}
    ref_n = min((r["n"] for r in results["runs"] if r["n"]), default=0)
    lines = [f"{results['device']}: {results['args']['num_requests']} requests, ranks "
             f"{results['args']['ranks']}, {results.get('total_s', '?')} s in all",
             f"{'n':>5} {'mode':>9} {'req/s':>7} {f'% n={ref_n}':>7} {'host loads':>10} "
             f"{'pool loads/req':>14} {'pool evict/req':>14} {'queue s':>8} {'other s':>8} "
             f"{'preload GB/s':>12}"]
    for r in results["runs"]:
        ref = rate.get((ref_n, r["mode"])) if r["n"] else None
        share = f"{100 * r['requests_per_s'] / ref:.0f}" if ref else "-"
        phases = r["steps_and_seconds_by_phase"]
        queue = phases.get("queue", [0, 0.0])[1]
        other = sum(s for k, (_, s) in phases.items() if k != "queue")
        gbs = r["preload"]["gb_per_s"] if r["preload"] else "-"
        lines.append(f"{r['n']:>5} {r['mode']:>9} {r['requests_per_s']:>7.2f} {share:>7} "
                     f"{r['host_loads']:>10} {r['per_request']['pool_loads']:>14.3f} "
                     f"{r['per_request']['pool_evictions']:>14.3f} {queue:>8.1f} {other:>8.1f} "
                     f"{gbs:>12}")
    lines += [f"skipped (deadline): {s['n']} {s['mode']}" for s in results["skipped"]]
    lines.append(f"targets: {json.dumps(results['targets'])}")
    return "\n".join(lines)


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
        pts = sorted((x_of[r["n"]], r["requests_per_s"]) for r in runs if r["mode"] == mode)
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
