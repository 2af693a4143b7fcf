"""Preemption on issue 19's workload, simulated on the CPU: the real Scheduler, PagePool and
KVManager, no model.

The workload is bench_engine_gpu.py's (its own request list, same seed): 600 requests, prompt
and output lengths uniform in [8, 512], EOS ignored (each runs to max_tokens), all queued at
once, max_num_seqs 256, max_num_batched_tokens 4096, pages of 16 tokens. The pool sizes are the
H100's (6,760 pages: 80% of its free memory, measured) and the H200's (~2.6x more free memory:
17,600 pages). Steps are driven as LLMEngine.step drives them, with async scheduling (the GPU
default): a step's sampled token is a placeholder until the next step is launched, and a
sequence is finished only when its last token is read back.

Cost model (an estimate for comparing policies, calibrated on the H100 run of issue 19 in
docs/BENCHMARKS.md, c489a18: decode-only steps 18.0 ms at 133 rows, mixed steps 41.2 ms):
  - every step reads the weights (13.5 GB) and the K/V of every scheduled row's context
    (0.5 MB per token at Llama-7B: 2 x 32 layers x 4096 x fp16) at the H100's 3.0 TB/s copy
    rate times HBM_EFFICIENCY, which makes the simulated old policy's decode-only steps cost
    the measured 18 ms (the floor alone gives 15.5 ms);
  - a step with prompt tokens (prefill chunks and recompute: every scheduled token that is not
    a decode row, counted as slora_testing/step_timing.py counts them) adds their weight-matmul
    FLOPs (2 x 6.48e9 per token) at the measured 772 TFLOP/s, times 1.1 (the mixed steps
    measured cost decode + ~1.1x that floor).
Host time and attention FLOPs are left out (the measured run was device-bound).

    python bench/sim_preemption.py                       # the table: old vs new, both pools
    python bench/sim_preemption.py --pool-pages 6760 --policies old
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_engine_gpu import make_requests  # noqa: E402

from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.engine.kv_manager import KVManager  # noqa: E402
from slora_backend.engine.scheduler import Scheduler, SchedulerOutput  # noqa: E402
from slora_backend.engine.sequence import PLACEHOLDER, Sequence  # noqa: E402
from slora_backend.memory_pool import PagePool  # noqa: E402
from slora_backend.sampling_params import SamplingParams  # noqa: E402

H100_PAGES = 6_760  # measured: 80% of an H100's free memory after the Llama-7B weights
H200_PAGES = 17_600  # ~2.6x the H100's free memory
VOCAB = 32_000
NUM_ADAPTERS = 100  # bench_engine_gpu.py's default: its request list draws one per request
WEIGHT_BYTES = 13.5e9  # Llama-7B in fp16
KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, fp16
HBM_BYTES_PER_S = 3.0e12  # the H100's measured device-copy rate
# the measured decode-only step (18.0 ms at 133 rows) over its floor at this rate: the value
# for which the simulated old policy's decode-only steps cost 18 ms on the H100's pool
HBM_EFFICIENCY = 0.83
FLOPS_PER_PROMPT_TOKEN = 2 * 6.476e9  # weight matmuls of the 32 layers (step_timing.py)
MATMUL_FLOPS_PER_S = 772e12  # measured on the H100 (fp16, 8192^3)
MIXED_FLOP_FACTOR = 1.1  # mixed steps measured at decode + ~1.1x their prompt FLOP floor
MAX_STEPS_PER_REQUEST = 100  # a run past this many steps is a scheduler that does not finish

# policies: EngineConfig fields the scheduler reads (the rest as in bench_engine_gpu.py).
# old: admit as soon as a request's current tokens fit (c9dfa4d..c489a18, measured on the GPU);
# new: the defaults (room kept for every running request's next kv_headroom_tokens tokens)
POLICIES: dict[str, dict] = {
    "old": {"kv_headroom_tokens": 0},
    "new": {},
}


@dataclasses.dataclass
class StepStats:
    decode_rows: int
    prompt_tokens: int
    kv_tokens_read: int
    running: int

    @property
    def seconds(self) -> float:
        read = WEIGHT_BYTES + KV_BYTES_PER_TOKEN * self.kv_tokens_read
        flops = FLOPS_PER_PROMPT_TOKEN * self.prompt_tokens
        return (read / (HBM_BYTES_PER_S * HBM_EFFICIENCY)
                + MIXED_FLOP_FACTOR * flops / MATMUL_FLOPS_PER_S)


class SimEngine:
    """LLMEngine.step's order of work without a model: schedule, commit, a placeholder for each
    sampled token (a sequence whose last token it is stops being scheduled), then the previous
    step's tokens read back (async scheduling) and finished requests freed."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.in_flight: list[Sequence] = []

    def step(self) -> StepStats | None:
        sched = self.sched
        out = sched.schedule()
        stats = None if out.is_empty else self._stats(out)  # nothing launched: no cost
        sched.commit(out)
        launched = []
        for s in out.scheduled:
            if s.sample:
                seq = sched.seqs[s.request_id]
                seq.output_token_ids.append(PLACEHOLDER)
                seq.finishing = len(seq.output_token_ids) >= seq.params.max_tokens
                launched.append(seq)
        for seq in self.in_flight:  # read back: the placeholder becomes a token
            if seq.finished:
                continue
            seq.output_token_ids[seq.output_token_ids.index(PLACEHOLDER)] = 0
            if PLACEHOLDER not in seq.output_token_ids and seq.finishing:
                sched.finish(seq, "length")
        self.in_flight = launched
        return stats

    def _stats(self, out: SchedulerOutput) -> StepStats:
        seqs = self.sched.seqs
        decode = sum(1 for s in out.scheduled
                     if s.num_new_tokens == 1 and s.start >= seqs[s.request_id].num_prompt_tokens)
        return StepStats(decode, out.num_batched_tokens - decode,
                         sum(s.start + s.num_new_tokens for s in out.scheduled),
                         len(self.sched.running))


def simulate(pool_pages: int, policy: dict, num_requests: int, seed: int) -> dict:
    """One run of the workload; its counts and estimated seconds."""
    return summarize(*simulate_steps(pool_pages, policy, num_requests, seed))


def simulate_steps(pool_pages: int, policy: dict, num_requests: int, seed: int
                   ) -> tuple[list[StepStats], list[dict], int]:
    """One run of the workload: every launched step's stats, the requests, the preemptions."""
    config = EngineConfig(max_num_seqs=256, max_num_batched_tokens=4096,
                          max_waiting=4 * num_requests, **policy)
    pool = PagePool(pool_pages)
    sched = Scheduler.from_config(pool, KVManager(pool, config.block_size), None, config)
    args = argparse.Namespace(seed=seed, lengths="8,512", num_requests=num_requests)
    requests = make_requests(args, [f"a{i}" for i in range(NUM_ADAPTERS)], VOCAB)
    for i, r in enumerate(requests):
        sched.add(Sequence(f"r{i}", r["prompt"], SamplingParams(max_tokens=r["max_tokens"],
                                                                 ignore_eos=True), None, i))
    engine = SimEngine(sched)
    steps: list[StepStats] = []
    for _ in range(MAX_STEPS_PER_REQUEST * num_requests):
        if not sched.has_unfinished():
            break
        stats = engine.step()
        if stats is not None:
            steps.append(stats)
    else:
        raise RuntimeError("the scheduler does not finish the workload")
    return steps, requests, sched.num_preemptions


def summarize(steps: list[StepStats], requests: list[dict], preemptions: int) -> dict:
    decode = [s for s in steps if not s.prompt_tokens]
    mixed = [s for s in steps if s.prompt_tokens]
    in_requests = sum(len(r["prompt"]) for r in requests)
    prefilled = sum(s.prompt_tokens for s in steps)
    output_tokens = sum(r["max_tokens"] for r in requests)
    seconds = sum(s.seconds for s in steps)
    return {"steps": len(steps), "decode_steps": len(decode), "mixed_steps": len(mixed),
            "prompt_tokens_in_requests": in_requests, "prompt_tokens_prefilled": prefilled,
            "recompute_pct": round(100 * (prefilled - in_requests) / in_requests, 1),
            "preemptions": preemptions,
            "running_mean": round(sum(s.running for s in steps) / len(steps), 1),
            "decode_rows_mean_decode_steps": round(sum(s.decode_rows for s in decode)
                                                   / max(1, len(decode)), 1),
            "decode_ms_per_step": round(1e3 * sum(s.seconds for s in decode)
                                        / max(1, len(decode)), 1),
            "mixed_ms_per_step": round(1e3 * sum(s.seconds for s in mixed)
                                       / max(1, len(mixed)), 1),
            "est_seconds": round(seconds, 2),
            "est_output_tokens_per_s": round(output_tokens / seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pool-pages", default=f"{H100_PAGES},{H200_PAGES}")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--num-requests", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = p.parse_args()
    results = []
    for pages in (int(v) for v in args.pool_pages.split(",")):
        for name in args.policies.split(","):
            row = {"pool_pages": pages, "policy": name,
                   **simulate(pages, POLICIES[name], args.num_requests, args.seed)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: list[dict]) -> None:
    cols = ("pool_pages", "policy", "steps", "decode_steps", "mixed_steps", "preemptions",
            "prompt_tokens_prefilled", "recompute_pct", "running_mean", "est_seconds",
            "est_output_tokens_per_s")
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for row in results:
        print("| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c])
                                for c in cols) + " |")


if __name__ == "__main__":
    main()
