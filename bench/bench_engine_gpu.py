"""End-to-end engine throughput on the GPU at the paper's scale: LoRA vs base only.

A Llama-7B-shaped model (hidden 4096, 32 layers, 32 heads, mlp 11008, vocab 32000) with random
fp16 weights made on the GPU (no download), --num-adapters synthetic PEFT adapters on disk
(q,k,v,o; ranks cycled from --ranks), --num-requests requests with input and output lengths
uniform in --lengths, EOS ignored, greedy, all queued at once. The same requests run through
one engine: every request on the base model, then every request with its (random) adapter,
twice: with the adapters on disk at the start (loaded on demand), then with all of them
resident in the pool. Reports requests/s, output tokens/s and the LoRA cost of each, and per
step kind (decode-only, mixed: prompt tokens beside decode rows) the device time per step and
the path the steps took (CUDA graphs or eager), with the mixed-step bound of issue 19: the
decode-only step of the batch plus 1.5x the prompt tokens' FLOP floor at the measured fp16
matmul rate (slora_testing/step_timing.py). `--runs` picks the runs: without lora_cold, the
adapters are made resident first by one short request each.

Adapters of one rank share their weights (hard links of one file per rank): writing 100
distinct 7B-shaped adapters (~6 GB of random numbers) would take most of a device lease. Each
adapter id is still validated, read, cached, and paged into the pool on its own.

    python bench/bench_engine_gpu.py --tokenizer DIR        # full run (CUDA)
    python bench/bench_engine_gpu.py --tokenizer DIR --quick
    python bench/bench_engine_gpu.py --tokenizer DIR --num-requests 600 --runs base,lora_resident
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slora_backend import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from slora_backend.model.llama import LlamaModel  # noqa: E402
from slora_backend.model.spec import ModelSpec  # noqa: E402
from slora_testing.step_timing import (  # noqa: E402
    SYNC_SITES_LISTED,
    StepTimer,
    by_kind,
    idle_by_pool_loads,
    idle_detail,
    matmul_flops_per_token,
    measure_matmul_flops,
    mixed_bound,
    sync_sites,
)
from slora_testing.synthetic_adapters import (  # noqa: E402
    LLAMA7B_CONFIG,
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    link_adapter,
    write_adapter,
)

# --tiny: the same run on a small model (a smoke test of this script, CPU included)
TINY_CONFIG = dict(LLAMA7B_CONFIG, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FIRST_TOKEN_ID = 3  # random prompts skip special tokens
HBM_BYTES_PER_S = 4.8e12  # H200 spec sheet; the decode floor reads every weight once per step


def add_workload_args(p: argparse.ArgumentParser, num_requests: int) -> None:
    """The request list and engine settings (shared with bench_table3.py)."""
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="folder with tokenizer.json (any Llama-family tokenizer; ids < 32000)")
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--lengths", default="8,512", help="min,max input and output tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--pool-fraction", type=float, default=0.8, help="of free GPU memory")
    p.add_argument("--pool-bytes", type=int, default=None, help="instead of --pool-fraction")
    p.add_argument("--cuda-graph-max-batch", type=int, default=256)
    p.add_argument("--cuda-graph-mixed", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--seed", type=int, default=0)


RUN_NAMES = ("base", "lora_cold", "lora_resident")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_workload_args(p, num_requests=200)
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_gpu.json")
    p.add_argument("--runs", default=",".join(RUN_NAMES),
                   help=f"comma list of {', '.join(RUN_NAMES)}")
    p.add_argument("--quick", action="store_true", help="20 requests, 8 adapters")
    p.add_argument("--tiny", action="store_true", help="a small model instead of Llama-7B")
    p.add_argument("--device", default="cuda")
    p.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--sync-too", action="store_true",
                   help="then base and LoRA resident again with async scheduling off")
    p.add_argument("--logprobs-too", type=int, default=None, metavar="K",
                   help="then LoRA resident again with every request asking for logprobs "
                        "with K alternatives (the cost of computing them in the step)")
    args = p.parse_args()
    if args.quick:
        args.num_requests, args.num_adapters = 20, 8
    args.runs = args.runs.split(",")
    if not set(args.runs) <= set(RUN_NAMES):
        p.error(f"--runs: choose from {RUN_NAMES}")
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_model_dir(root: Path, tokenizer: Path, config: dict) -> Path:
    d = root / "model"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, d / name)
    return d


def make_adapters(root: Path, spec: ModelSpec, count: int, ranks: list[int], prefix: str = "",
                  first: dict[int, Path] | None = None) -> list[str]:
    """One real PEFT folder per rank; the other ids hard-link its files. `first`
    (rank -> folder) carries the real folders over calls: ids made with another `prefix` link
    the same files (one file per rank in the page cache, whatever the number of ids)."""
    first = {} if first is None else first
    names = []
    for i in tqdm(range(count), desc="adapters"):
        rank = ranks[i % len(ranks)]
        name = f"{prefix}a{i:03d}-r{rank}"
        recipe = AdapterRecipe(rank, ATTN_MODULES, float(2 * rank), False, "list", seed=rank)
        if rank not in first:
            first[rank] = write_adapter(root / name, adapter_config(recipe),
                                        adapter_tensors(recipe, spec, torch.float16))
        else:
            link_adapter(first[rank], root / name)
        names.append(name)
    return names


def make_requests(args: argparse.Namespace, adapters: list[str], vocab: int) -> list[dict]:
    rng = random.Random(args.seed)
    lo, hi = (int(v) for v in args.lengths.split(","))
    return [{"prompt": [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randint(lo, hi))],
             "max_tokens": rng.randint(lo, hi), "adapter": rng.choice(adapters)}
            for _ in range(args.num_requests)]


# decode batch classes of the step breakdown: (name, largest batch)
PHASE_BATCHES = (("decode 1-31", 31), ("decode 32-127", 127), ("decode 128+", 1 << 30))


def run(engine: LLMEngine, requests: list[dict], with_adapters: bool, tag: str,
        logprobs: int | None = None, flops: tuple[float, float] | None = None,
        sync_debug: bool = False) -> dict:
    """All requests queued at once; wall time until the last one finishes. Per step phase
    (step_phase): steps, seconds, the mean number of running requests and the pool loads
    started (adapters copied host -> pool). `flops`: (FLOPs per prompt token, matmul FLOP/s)
    for the mixed-step bound."""
    sync(engine.config.device)
    compiled = compiled_kernels()
    allocator = allocator_counters(engine.device)
    timer = StepTimer(engine)
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0,
                                logprobs=logprobs)
        engine.add_request(f"{tag}-{i}", prompt_token_ids=r["prompt"], params=params,
                           adapter_id=r["adapter"] if with_adapters else None)
    tokens = finished = steps = 0
    phases: dict[str, list[float]] = {}  # phase -> [steps, seconds, running, pool loads]
    with tqdm(total=len(requests), desc=tag) as bar, sync_sites(sync_debug) as syncs:
        while engine.has_unfinished():
            phase = step_phase(engine)
            running, loads = len(engine.scheduler.running), engine.adapters.num_loads
            t_step = time.perf_counter()
            outs = engine.step()
            acc = phases.setdefault(phase, [0, 0.0, 0, 0])
            acc[0] += 1
            acc[1] += time.perf_counter() - t_step
            acc[2] += running
            acc[3] += engine.adapters.num_loads - loads
            for out in outs:
                tokens += len(out.new_token_ids)
                if out.finished:
                    if out.error is not None:
                        raise RuntimeError(f"{out.request_id}: {out.error}")
                    finished += 1
                    bar.update(1)
            steps += 1
    sync(engine.config.device)
    wall = time.perf_counter() - t0
    timer.close()
    records = timer.records()
    return {"requests": finished, "output_tokens": tokens, "wall_s": round(wall, 2),
            "steps": steps, "requests_per_s": round(finished / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1),
            "preemptions": engine.scheduler.num_preemptions,
            "steps_and_seconds_by_phase": {k: [v[0], round(v[1], 3)] for k, v in
                                           sorted(phases.items())},
            "step_kinds": by_kind(records),
            "mixed_bound": mixed_bound(records, *flops) if flops else {},
            "idle_by_pool_loads": idle_by_pool_loads(records),
            "idle_detail": idle_detail(records),
            "sync_sites": dict(syncs.most_common(SYNC_SITES_LISTED)),
            "running_mean_by_phase": {k: round(v[2] / v[0], 1) for k, v in sorted(phases.items())},
            "pool_loads_by_phase": {k: v[3] for k, v in sorted(phases.items())},
            "jit_compiles": {k: n - compiled.get(k, 0) for k, n in compiled_kernels().items()
                             if n > compiled.get(k, 0)},
            "allocator": {k: n - allocator[k]
                          for k, n in allocator_counters(engine.device).items()}}


# the caching allocator's counters that can stall the host: a cudaMalloc/cudaFree, a retry
# after an out-of-memory (it frees cached blocks), a synchronization of every stream
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries",
                      "num_sync_all_streams")


def allocator_counters(device: torch.device) -> dict[str, int]:
    """ALLOCATOR_COUNTERS now (empty off CUDA): a rise during a timed run is the allocator
    reaching the driver (a pool copy's staging of a size not cached yet, say)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}


def compiled_kernels() -> dict[str, int]:
    """Compiled variants of each Triton kernel of kernels/ so far: a rise during a timed run
    is a JIT compile (seconds on this host) inside it."""
    counts = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("slora_kernels."):
            continue
        for attr, obj in vars(mod).items():
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict) and caches:
                counts[attr] = sum(len(c[0]) for c in caches.values())
    return counts


def step_phase(engine: LLMEngine) -> str:
    """What a step is about to run: "queue" while requests wait (for a free place in the batch,
    or for their adapter: admission runs each step), then "prefill" while prompt tokens are
    still to compute (both mostly mixed, eager steps), else decode of a batch of this size
    class (CUDA graphs)."""
    sched = engine.scheduler
    if sched.waiting:
        return "queue"
    if any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        return "prefill"
    n = len(engine.scheduler.running)
    return next(name for name, top in PHASE_BATCHES if n <= top)


def main() -> None:
    args = parse_args()
    dev = args.device
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    model_config = TINY_CONFIG if args.tiny else LLAMA7B_CONFIG
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-engine-gpu-") as tmp:
        model_dir = make_model_dir(Path(tmp), args.tokenizer, model_config)
        spec = ModelSpec.from_hf_config(model_config)
        adapters = make_adapters(Path(tmp) / "adapters", spec, args.num_adapters, ranks)
        t0 = time.perf_counter()
        model = LlamaModel.random(spec, dtype, dev, seed=args.seed)
        sync(dev)
        build_s = time.perf_counter() - t0
        config = EngineConfig(
            model=str(model_dir), adapter_dir=str(Path(tmp) / "adapters"),
            dtype=str(dtype).removeprefix("torch."), device=dev, pool_bytes=args.pool_bytes,
            pool_fraction=args.pool_fraction, max_rank=max(ranks),
            max_loaded_adapters=args.num_adapters + 1, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=4 * args.num_requests,
            host_cache_bytes=64 << 30, cuda_graph_max_batch=args.cuda_graph_max_batch,
            async_scheduling=args.async_scheduling, cuda_graph_mixed=args.cuda_graph_mixed)
        t0 = time.perf_counter()
        engine = LLMEngine(config, model=(spec, model))
        init_s = time.perf_counter() - t0
        requests = make_requests(args, adapters, spec.vocab_size)
        # warm-up: Triton compiles the prefill shapes; one adapter only, so that the first
        # LoRA run still finds the other adapters on disk
        warm = [dict(r, max_tokens=4, prompt=r["prompt"][:64], adapter=adapters[0])
                for r in requests[:32]]
        run(engine, warm, True, "warm-up")
        flops = (matmul_flops_per_token(model), measure_matmul_flops(dev))
        results = {
            "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
            "model_build_s": round(build_s, 2), "engine_init_s": round(init_s, 2),
            "matmul_tflops": round(flops[1] / 1e12, 1),
            "pool_pages": engine.pool.num_pages, "args": {k: str(v) for k, v in vars(args).items()},
            "async_scheduling": engine.async_scheduling,
            **timed_runs(engine, requests, adapters, args, flops),
        }
        engine.close()
    for base_key, cases in (("base", ("lora_cold", "lora_resident")),
                            ("base_sync", ("lora_resident_sync",)),
                            ("lora_resident", ("lora_resident_logprobs",))):
        for case in cases:
            if case in results and base_key in results:
                cost = 100 * (1 - results[case]["output_tokens_per_s"]
                              / results[base_key]["output_tokens_per_s"])
                results[case]["cost_vs_base_pct"] = round(cost, 1)
    weight_bytes = sum(t.numel() * t.element_size() for t in _weights(model))
    results["decode_step_floor_ms"] = round(1e3 * weight_bytes / HBM_BYTES_PER_S, 2)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))


def timed_runs(engine: LLMEngine, requests: list[dict], adapters: list[str],
               args: argparse.Namespace, flops: tuple[float, float]) -> dict:
    """The runs of --runs in order (then --sync-too, --logprobs-too) on one engine."""
    out: dict = {}
    for name in RUN_NAMES:
        if name not in args.runs:
            continue
        if name == "lora_resident" and "lora_cold" not in args.runs:
            out["preload_s"] = preload(engine, adapters)
        out[name] = run(engine, requests, name != "base", name, flops=flops)
    if args.sync_too:  # the same engine, each step's tokens read back before the next
        engine.async_scheduling = False
        out["base_sync"] = run(engine, requests, False, "base_sync", flops=flops)
        out["lora_resident_sync"] = run(engine, requests, True, "lora_resident_sync",
                                        flops=flops)
    if args.logprobs_too is not None:
        out["lora_resident_logprobs"] = run(engine, requests, True, "lora_logprobs",
                                            logprobs=args.logprobs_too, flops=flops)
    return out


def preload(engine: LLMEngine, adapters: list[str]) -> float:
    """Every adapter made resident in the pool by one short request each; seconds taken."""
    t0 = time.perf_counter()
    for name in adapters:
        engine.add_request(f"preload-{name}", prompt_token_ids=[FIRST_TOKEN_ID] * 8,
                           params=SamplingParams(max_tokens=1, ignore_eos=True), adapter_id=name)
    while engine.has_unfinished():
        engine.step()
    if len(engine.adapters.resident()) < len(adapters):
        raise RuntimeError(f"only {len(engine.adapters.resident())} of {len(adapters)} adapters "
                           "stayed resident")
    return round(time.perf_counter() - t0, 2)


RUNS = (("base", "base only"), ("lora_resident", "LoRA, adapters resident"),
        ("lora_cold", "LoRA, adapters on disk"), ("base_sync", "base only,\nsync"),
        ("lora_resident_sync", "LoRA resident,\nsync"),
        ("lora_resident_logprobs", "LoRA resident,\nlogprobs"))
COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8da0cb", "#a6d854", "#e5c494")


def plot(results: dict, path: Path) -> None:
    """Output tokens/s of the three runs, with the LoRA cost on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(key, label) for key, label in RUNS if key in results]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(runs), 4))
    values = [results[key]["output_tokens_per_s"] for key, _ in runs]
    bars = ax.bar([label for _, label in runs], values, color=COLORS[:len(runs)])
    for (key, _), bar in zip(runs, bars):
        cost = results[key].get("cost_vs_base_pct")
        note = f"{bar.get_height():,.0f}" + ("" if cost is None else f"\n(-{cost:.0f}%)")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    args = results["args"]
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(0, max(values) * 1.25)
    ax.set_title(f"{results['device']}: Llama-7B shape, {args['num_requests']} requests, "
                 f"{args['num_adapters']} adapters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _weights(model: LlamaModel) -> list[torch.Tensor]:
    out = [model.embed, model.norm] + ([] if model.lm_head is model.embed else [model.lm_head])
    for layer in model.layers:
        out += [layer.attn_norm, layer.w_qkv, layer.w_o, layer.mlp_norm, layer.w_gate_up,
                layer.w_down]
    return out


if __name__ == "__main__":
    main()
