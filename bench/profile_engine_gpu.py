"""Where an engine step's time goes at Llama-7B scale: torch.profiler over decode steps.

The engine of bench_engine_gpu.py (random fp16 weights, synthetic q,k,v,o adapters) with N
requests decoding at once; after the prefills, STEPS steps are profiled, base only and then
with every request on its own adapter. Prints wall time per step, GPU kernel time per step and
the top CPU and GPU entries.

    python bench/profile_engine_gpu.py --tokenizer TOKENIZER_DIR [--num-seqs 200] [--steps 10]
        [--phase decode|prefill]

``--phase prefill`` profiles instead the steps that prefill the N prompts (chunked by the token
budget, mixed with the decode of those already prefilled; eager, no graphs), after a first
round has compiled the kernels and made the adapters resident.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_engine_gpu import FIRST_TOKEN_ID, make_adapters, make_model_dir  # noqa: E402

from slora_backend import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from slora_backend.model.llama import LlamaModel  # noqa: E402
from slora_backend.model.spec import ModelSpec  # noqa: E402
from slora_testing.synthetic_adapters import LLAMA7B_CONFIG  # noqa: E402

PROMPT_LEN = 256
WARM_STEPS = 8
MAX_TOKENS = 400  # long enough to outlast cold adapter loads and the profiled steps


def profile_steps(engine: LLMEngine, adapters: list[str] | None, args: argparse.Namespace,
                  tag: str) -> None:
    prefill = args.phase == "prefill"  # the steps that prefill every prompt (chunked, eager)
    prefill_all(engine, adapters, args, tag)  # also compiles and makes the adapters resident
    if prefill:
        finish(engine)
    else:
        for _ in range(WARM_STEPS):
            engine.step()

    def run_phase() -> int:
        if prefill:
            return prefill_all(engine, adapters, args, tag)
        for _ in range(args.steps):
            engine.step()
        return args.steps

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_steps = run_phase()
    torch.cuda.synchronize()
    plain_ms = 1e3 * (time.perf_counter() - t0) / n_steps
    if prefill:
        finish(engine)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        n_steps = run_phase()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / n_steps
    print(f"\n=== {tag}: {args.num_seqs} sequences, {args.phase} steps ({n_steps}), "
          f"async={engine.async_scheduling}: {plain_ms:.2f} ms per step (unprofiled), GPU "
          f"kernels {gpu_us / 1e3:.2f} ms per step")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    finish(engine)


def prefill_all(engine: LLMEngine, adapters: list[str] | None, args: argparse.Namespace,
                tag: str) -> int:
    """Queue the requests and step until every one has its first token; returns the steps."""
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randrange(FIRST_TOKEN_ID, engine.spec.vocab_size) for _ in range(PROMPT_LEN)]
        engine.add_request(f"{tag}{i}", prompt_token_ids=prompt, adapter_id=(
            adapters[i % len(adapters)] if adapters else None), params=SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    started: set[str] = set()
    steps = 0
    while len(started) < args.num_seqs:
        started.update(out.request_id for out in engine.step())
        steps += 1
    return steps


def finish(engine: LLMEngine) -> None:
    engine.abort_all()
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--num-seqs", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--phase", default="decode", choices=("decode", "prefill"),
                   help="profile decode steps (default) or the steps that prefill the prompts")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-engine-") as tmp:
        model_dir = make_model_dir(Path(tmp), args.tokenizer, LLAMA7B_CONFIG)
        spec = ModelSpec.from_hf_config(LLAMA7B_CONFIG)
        adapters = make_adapters(Path(tmp) / "adapters", spec, args.num_adapters, [8, 16, 32, 64])
        model = LlamaModel.random(spec, torch.float16, "cuda")
        engine = LLMEngine(EngineConfig(
            model=str(model_dir), adapter_dir=str(Path(tmp) / "adapters"), device="cuda",
            dtype="float16", pool_fraction=0.8, max_rank=64,
            max_loaded_adapters=args.num_adapters + 1, max_num_seqs=256,
            max_num_batched_tokens=4096, max_waiting=1024, host_cache_bytes=64 << 30,
            async_scheduling=args.async_scheduling), model=(spec, model))
        profile_steps(engine, None, args, "base")
        profile_steps(engine, adapters, args, "lora")
        engine.close()


if __name__ == "__main__":
    main()
