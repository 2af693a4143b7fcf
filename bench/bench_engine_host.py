"""Host (Python) time of one engine step, apart from the model: what a GPU cannot hide.

A decode step on the GPU replays a CUDA graph in milliseconds; everything around it (scheduling,
building the batch, sampling bookkeeping, detokenizing, stop checks, outputs) runs in Python on
the host, serially with the GPU. This runs the engine on the CPU with a tiny random Llama (2
layers, hidden 64, SmolLM2's tokenizer) so that the model costs little, N requests decoding at
once, and splits each step's wall time into the model forward (timed around
`LlamaModel.forward`), sampling (`Sampler.sample`) and the rest: the host's share.

    .venv/bin/python bench/bench_engine_host.py [--num-seqs 200] [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slora_backend import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from slora_testing.synthetic_adapters import make_tiny_model  # noqa: E402

FIRST_TOKEN_ID = 3
PROMPT_LEN = (8, 64)
POOL_BYTES = 256 << 20
WARM_STEPS = 6  # prefill and first decodes, not measured


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-seqs", type=int, default=200)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokenizer", type=Path,
                   default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", args.tokenizer)
        engine = LLMEngine(EngineConfig(
            model=str(model_dir), adapter_dir=tmp, dtype="float32", device="cpu",
            pool_bytes=POOL_BYTES, max_num_seqs=args.num_seqs, max_num_batched_tokens=4096))
        rng = random.Random(0)
        vocab = engine.spec.vocab_size
        for i in range(args.num_seqs):
            prompt = [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randint(*PROMPT_LEN))]
            engine.add_request(f"r{i}", prompt_token_ids=prompt, params=SamplingParams(
                max_tokens=WARM_STEPS + args.steps + 1, temperature=0.0, ignore_eos=True))
        for _ in range(WARM_STEPS):
            engine.step()
        spent = {"forward": 0.0, "sampling": 0.0}
        engine.model.forward = timed(engine.model.forward, spent, "forward")
        engine.runner.sampler.sample = timed(engine.runner.sampler.sample, spent, "sampling")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - t0
        engine.close()
    step_ms = 1e3 * wall / args.steps
    forward_ms, sampling_ms = (1e3 * spent[k] / args.steps for k in ("forward", "sampling"))
    host_ms = step_ms - forward_ms - sampling_ms
    print(f"{args.num_seqs} decoding sequences, {args.steps} steps: {step_ms:.1f} ms per step = "
          f"model forward {forward_ms:.1f} + sampling {sampling_ms:.1f} (argmax over the "
          f"vocabulary on the CPU) + host {host_ms:.1f} ms "
          f"({1e3 * host_ms / args.num_seqs:.0f} us per sequence)")


def timed(fn: Callable, spent: dict[str, float], key: str) -> Callable:
    """`fn`, adding its wall time to spent[key]."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0
    return wrapper

if __name__ == "__main__":
    main()
