"""Adapter load times through the tiers: disk -> host RAM -> unified pool, and the added TTFT.

    python bench/bench_adapter_load.py                 # SmolLM2 dims, ranks 8/16/32/64 (CPU ok)
    python bench/bench_adapter_load.py --llama7b       # + a Llama-7B-shaped rank-16 q,k,v,o
                                                       #   adapter (CUDA; only shapes, no model)
    python bench/bench_adapter_load.py --no-ttft       # skip the LLMEngine TTFT part
    python bench/bench_adapter_load.py --throughput-only --workers 1,2,4,8
                                                       # only disk -> host GB/s through HostCache
    (--threads 1 by default: single-threaded torch gives stable timings on a shared CPU)

disk -> host: AdapterSource.load (validation, safetensors read, dtype conversion; the OS page
cache is warm after the first repeat). host -> pool: AdapterManager.acquire of an adapter whose
host copy is resident, until it is ready (pages allocated, the copy with the finite check on the
device (a side stream on CUDA), A / B^T rows written into the pool, slot tables filled; CUDA
synchronized); bulk copy: one copy of the whole host buffer to the device,
the floor for host -> pool. TTFT: a 1-token request through LLMEngine whose adapter is
only on disk, only in host RAM, or already in the pool. Throughput: --throughput-count ids
(hard links of one Llama-7B-shaped rank-32 q,k,v,o file, 67 MB, page cache warm) loaded at once
through a HostCache with each --workers count: aggregate disk -> host GB/s, into a fresh arena
(first touch of its memory on CPU; on CUDA its chunks are pinned at start, timed apart as
arena_start_s) and again after evicting them all (reused arena: a serving
engine's steady state). Adapters are synthesized in a temp dir (random, q,k,v,o). Results: a
table on stdout and JSON in bench/results/adapter_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slora_backend.adapters import AdapterSource, HostCache  # noqa: E402 (after the path fix)
from slora_backend.model.spec import (
    MODULE_ORDER,  # noqa: E402
    ModelSpec,  # noqa: E402
)
from slora_testing.synthetic_adapters import (  # noqa: E402
    LLAMA7B_CONFIG,
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    link_adapter,
    load_spec,
    write_adapter,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
RESULTS = REPO_ROOT / "bench" / "results" / "adapter_load.json"
RANKS = (8, 16, 32, 64)
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA7B = ModelSpec.from_hf_config(LLAMA7B_CONFIG)
LLAMA7B_RANK = 16
THROUGHPUT_RANK = 32
BLOCK_SIZE = 16
POOL_SPARE_PAGES = 4
MIB = 1 << 20
HOST_CACHE_BYTES = 4 << 30
TTFT_PROMPT = "Write one sentence about the sea."
WAIT_S = 120.0
IDLE_SLEEP_S = 0.001


def median_ms(fn: Callable[[], object], repeats: int, sync: bool) -> float:
    """Median wall time of fn() in ms (CUDA synchronized when sync)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def attn_recipe(rank: int, seed: int, modules: tuple[str, ...] = ATTN_MODULES) -> AdapterRecipe:
    """A q,k,v,o (or `modules`) adapter of this rank (alpha = 2 x rank)."""
    return AdapterRecipe(rank=rank, modules=modules, alpha=2.0 * rank, use_rslora=False,
                         target_form="list", seed=seed)


def write_rank_adapters(
    root: Path, spec: ModelSpec, ranks: tuple[int, ...], dtype: torch.dtype
) -> list[str]:
    names = []
    for rank in ranks:
        recipe = attn_recipe(rank, seed=rank)
        names.append(f"bench-r{rank}")
        write_adapter(
            root / names[-1], adapter_config(recipe), adapter_tensors(recipe, spec, dtype=dtype)
        )
    return names


def pool_tier(
    spec: ModelSpec, cache: HostCache, names: list[str], dtype: torch.dtype, device: str
) -> Callable[[str], float] | None:
    """A timer of host -> pool residency through the engine's AdapterManager (None when the
    engine's pool tier cannot be imported)."""
    try:
        from slora_backend.adapters.adapter_manager import AdapterManager, Wait
        from slora_backend.memory_pool import PagePool, PoolStorage
        from slora_backend.model.lora import plan_adapter_rows
    except ImportError:
        return None
    page_elems = spec.page_elems(BLOCK_SIZE)
    most = max(
        plan_adapter_rows(spec, cache.wait(n).modules, cache.wait(n).rank, page_elems).num_pages
        for n in names
    )
    pages = most + POOL_SPARE_PAGES
    storage = PoolStorage(
        spec.num_layers, pages, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, dtype, device
    )
    pool = PagePool(pages)
    manager = AdapterManager(spec, storage, pool, cache, max_slots=2, max_rank=max(RANKS))

    def once(name: str) -> None:
        # on CUDA the copy runs on a side stream: the adapter is ready once its event completed
        while (got := manager.acquire(name)) is Wait.LOADING:
            pass
        assert not isinstance(got, Wait), f"{name} did not become resident"
        manager.release(name)
        manager.evict_idle(pages)  # back to host-only for the next repeat

    return once


def copy_fallback(cache: HostCache, name: str, device: str) -> Callable[[], None]:
    """Without the engine: copy the host buffer into a pool-like tensor on the device."""
    buffer = cache.wait(name).buffer
    target = torch.empty_like(buffer, device=device)
    return lambda: target.copy_(buffer, non_blocking=True)


def bench_tiers(
    spec: ModelSpec, names: list[str], root: Path, dtype: torch.dtype, device: str, repeats: int
) -> list[dict]:
    source = AdapterSource(root, spec, max(RANKS), dtype)
    pin = device == "cuda"
    cache = HostCache(source, HOST_CACHE_BYTES, workers=1, pin_memory=pin)
    rows = []
    try:
        to_pool = pool_tier(spec, cache, names, dtype, device)
        for name in tqdm(names, desc="tiers", unit="adapter"):
            host = cache.wait(name, timeout=WAIT_S)
            # into one reused buffer, as the host cache's arena does
            out = torch.empty(host.nbytes, dtype=torch.uint8, pin_memory=pin)
            disk_ms = median_ms(lambda n=name, o=out: source.load(n, o), repeats, False)
            if to_pool is not None:
                pool_ms = median_ms(lambda n=name: to_pool(n), repeats, device == "cuda")
                how = "AdapterManager.acquire"
            else:
                pool_ms = median_ms(copy_fallback(cache, name, device), repeats, device == "cuda")
                how = "torch copy"
            # the floor for host -> pool: one bulk copy of the (pinned) host buffer
            bulk_ms = median_ms(copy_fallback(cache, name, device), repeats, device == "cuda")
            rows.append(
                {
                    "adapter": name,
                    "rank": host.rank,
                    "modules": list(host.modules),
                    "mib": host.nbytes / MIB,
                    "disk_to_host_ms": disk_ms,
                    "host_to_pool_ms": pool_ms,
                    "bulk_copy_ms": bulk_ms,
                    "pool_path": how,
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch."),
                }
            )
    finally:
        cache.close()
    return rows


def load_all(cache: HostCache, names: list[str]) -> tuple[float, float]:
    """(wall s, process CPU s) to load every adapter through the cache, all prefetched at
    once (no reference is kept: an evicted adapter's arena range must come back). CPU seconds
    (all threads, user + system: the kernel's copy out of the page cache included) give the
    rate per busy thread, which a shared machine's other jobs do not dilute as they do wall."""
    start, cpu = time.perf_counter(), time.process_time()
    for name in names:
        cache.prefetch(name)
    for name in names:
        cache.wait(name, timeout=WAIT_S)
    return time.perf_counter() - start, time.process_time() - cpu


def bench_throughput(root: Path, workers: list[int], count: int, pin: bool) -> list[dict]:
    """Aggregate disk -> host GB/s through HostCache, fresh arena then reused arena."""
    names = write_rank_adapters(root, LLAMA7B, (THROUGHPUT_RANK,), torch.float16)
    first = root / names[0]
    for i in range(1, count):  # hard links: one file in the page cache, `count` adapter ids
        names.append(link_adapter(first, root / f"link{i}").name)
    source = AdapterSource(root, LLAMA7B, max(RANKS), torch.float16)
    nbytes = source.inspect(names[0]).nbytes
    rows = []
    for w in tqdm(workers, desc="throughput", unit="workers"):
        start = time.perf_counter()
        cache = HostCache(source, count * nbytes, workers=w, pin_memory=pin)
        try:
            cache.wait_pinned()  # CUDA: the arena's chunks are pinned at start, not per load
            pin_s = time.perf_counter() - start
            fresh_s, fresh_cpu = load_all(cache, names)
            for name in names:
                cache.evict(name)
            reused_s, reused_cpu = load_all(cache, names)
        finally:
            cache.close()
        gb = count * nbytes / 1e9
        rows.append({"workers": w, "adapters": count, "mib_each": nbytes / MIB,
                     "fresh_arena_gb_s": gb / fresh_s, "reused_arena_gb_s": gb / reused_s,
                     "fresh_gb_per_cpu_s": gb / fresh_cpu, "reused_gb_per_cpu_s": gb / reused_cpu,
                     "load_average_1min": os.getloadavg()[0],
                     "pinned": pin, "arena_start_s": pin_s, "cpus": os.cpu_count()})
    return rows


def first_token_ms(engine: Any, request_id: str, adapter_id: str | None) -> float:
    """Time from add_request to the first generated token, stepping the engine ourselves."""
    from slora_backend import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, prompt=TTFT_PROMPT, params=params, adapter_id=adapter_id)
    while True:
        outputs = engine.step()
        for out in outputs:
            if out.request_id == request_id and out.new_token_ids:
                elapsed = (time.perf_counter() - start) * 1e3
                while engine.has_unfinished():
                    engine.step()
                return elapsed
        if not outputs:
            time.sleep(IDLE_SLEEP_S)  # leave the CPU to the loader thread, as EngineLoop does


def bench_ttft(model: Path, rank: int, repeats: int, modules: tuple[str, ...]) -> dict:
    """Median TTFT (CPU, LLMEngine) with the adapter on disk only / host RAM only / in pool.

    The cases are interleaved in each repeat (noise hits all alike); evicting the adapter from
    the pool (and the host cache) puts it back on the slower tier for the next case."""
    from slora_backend import EngineConfig, LLMEngine

    spec = load_spec(model)
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        root = Path(tmp)
        recipe = attn_recipe(rank, seed=100, modules=modules)
        write_adapter(root / "ttft", adapter_config(recipe), adapter_tensors(recipe, spec))
        engine = LLMEngine(
            EngineConfig(
                model=str(model),
                adapter_dir=str(root),
                device="cpu",
                dtype="float32",
                max_rank=max(RANKS),
            )
        )
        try:
            first_token_ms(engine, "warmup", None)
            times: dict[str, list[float]] = {"base": [], "disk": [], "host": [], "pool": []}
            for i in tqdm(range(repeats), desc="ttft", unit="repeat"):
                times["base"].append(first_token_ms(engine, f"base{i}", None))
                engine.adapters.evict_idle(engine.pool.num_pages)
                engine.host_cache.evict("ttft")
                times["disk"].append(first_token_ms(engine, f"disk{i}", "ttft"))
                times["pool"].append(first_token_ms(engine, f"pool{i}", "ttft"))
                engine.adapters.evict_idle(engine.pool.num_pages)  # the host copy stays
                times["host"].append(first_token_ms(engine, f"host{i}", "ttft"))
            cache = engine.stats().adapter_cache
        finally:
            engine.close()
    assert cache["loads"] == repeats, cache  # each disk case really loaded from disk
    result = {f"ttft_{k}_ms": statistics.median(v) for k, v in times.items()}
    # added time vs resident: median of the paired per-repeat differences (cancels drift)
    for case in ("base", "host", "disk"):
        diffs = [a - b for a, b in zip(times[case], times["pool"])]
        result[f"added_{case}_ms"] = statistics.median(diffs)
    result.update(
        rank=rank,
        modules=list(modules),
        adapter_mb=recipe_bytes(spec, rank, modules) / 1e6,
        model=model.name,
        device="cpu",
        repeats=repeats,
        load_average_1min=os.getloadavg()[0],
        cpus=os.cpu_count(),
    )
    return result


def recipe_bytes(spec: ModelSpec, rank: int, modules: tuple[str, ...]) -> int:
    """fp32 bytes of a rank-`rank` adapter on `modules` (what the CPU engine holds)."""
    per_layer = sum(rank * sum(spec.module_dims(m)) for m in modules)
    return 4 * per_layer * spec.num_layers


def print_tiers(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'rank':>5} {'MiB':>8} {'disk->host ms':>14} {'host->pool ms':>14} "
        f"{'bulk copy ms':>13}  pool path"
    )
    for row in rows:
        print(
            f"{row['rank']:>5} {row['mib']:>8.1f} {row['disk_to_host_ms']:>14.2f} "
            f"{row['host_to_pool_ms']:>14.2f} {row['bulk_copy_ms']:>13.2f}  "
            f"{row['pool_path']} ({row['device']}, {row['dtype']})"
        )


def print_throughput(rows: list[dict]) -> None:
    print(f"\ndisk -> host through HostCache, {rows[0]['adapters']} x "
          f"{rows[0]['mib_each']:.0f} MiB (pinned: {rows[0]['pinned']}, {rows[0]['cpus']} CPUs)")
    print(f"{'workers':>8} {'fresh arena GB/s':>17} {'reused arena GB/s':>18} "
          f"{'reused GB per CPU-s':>20} {'load avg':>9}")
    for row in rows:
        print(f"{row['workers']:>8} {row['fresh_arena_gb_s']:>17.2f} "
              f"{row['reused_arena_gb_s']:>18.2f} {row['reused_gb_per_cpu_s']:>20.2f} "
              f"{row['load_average_1min']:>9.1f}")


def bench_all_tiers(args: argparse.Namespace, tmp: Path, dtype: torch.dtype,
                    results: dict) -> None:
    spec = load_spec(args.model)
    root = tmp / "model"
    names = write_rank_adapters(root, spec, RANKS, dtype)
    results["model"] = bench_tiers(spec, names, root, dtype, args.device, args.repeats)
    print_tiers(f"{args.model.name}: q,k,v,o adapters", results["model"])
    if args.llama7b:
        root7b = tmp / "llama7b"
        names7b = write_rank_adapters(root7b, LLAMA7B, (LLAMA7B_RANK,), torch.float16)
        results["llama7b"] = bench_tiers(LLAMA7B, names7b, root7b, torch.float16, "cuda",
                                         args.repeats)
        print_tiers("Llama-7B shapes: rank-16 q,k,v,o adapter", results["llama7b"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--llama7b",
        action="store_true",
        help="also a Llama-7B-shaped rank-16 q,k,v,o adapter (needs CUDA)",
    )
    parser.add_argument("--no-ttft", action="store_true", help="skip the LLMEngine TTFT part")
    parser.add_argument("--ttft-rank", type=int, default=16)
    parser.add_argument("--ttft-repeats", type=int, default=20)
    parser.add_argument("--ttft-all-modules", action="store_true",
                        help="TTFT adapter on all seven projections (rank 64: 78 MB for SmolLM2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default); 1 gives stable timings on a shared machine",
    )
    parser.add_argument("--workers", default="1,2", help="HostCache loader threads to try")
    parser.add_argument("--throughput-count", type=int, default=16)
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.repeats < 1 or args.ttft_repeats < 1:
        parser.error("--repeats and --ttft-repeats must be >= 1")
    if args.llama7b and not torch.cuda.is_available():
        parser.error("--llama7b needs CUDA (it measures the PCIe host -> GPU copy)")
    return args


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        workers = [int(w) for w in args.workers.split(",")]
        results["host_cache_throughput"] = bench_throughput(
            Path(tmp) / "throughput", workers, args.throughput_count, args.device == "cuda")
        print_throughput(results["host_cache_throughput"])
        if not args.throughput_only:
            bench_all_tiers(args, Path(tmp), dtype, results)
    if not args.no_ttft and not args.throughput_only:
        modules = MODULE_ORDER if args.ttft_all_modules else ATTN_MODULES
        ttft = bench_ttft(args.model, args.ttft_rank, args.ttft_repeats, modules)
        results["ttft"] = ttft
        print(
            f"\nTTFT, 1 output token, LLMEngine on CPU ({ttft['model']}, rank {ttft['rank']}, "
            f"median of {ttft['repeats']}; load average {ttft['load_average_1min']:.1f} on "
            f"{ttft['cpus']} CPUs):"
        )
        for case in ("base", "pool", "host", "disk"):  # base = no adapter
            added = ttft.get(f"added_{case}_ms", 0.0)
            print(
                f"  adapter {case:>4}: {ttft[f'ttft_{case}_ms']:8.1f} ms "
                f"(median paired difference vs resident {added:+.1f} ms)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
