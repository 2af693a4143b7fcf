"""Engine throughput vs HF transformers + PEFT static batching, mixed adapters, CPU fp32.

Same requests on both sides: prompts of random token ids (seeded), each request with its own
adapter (round robin over --num-adapters PEFT adapters of mixed ranks, random non-zero B) and
its own max_new_tokens, EOS ignored, greedy. HF runs static batches of --hf-batch-size with
`generate(adapter_names=...)` (a batch runs until its longest request is done); the engine
gets all requests at once (continuous batching). Reports aggregate output tokens/s.

    .venv/bin/python bench/bench_engine_cpu.py            # full: 32 requests, 8 adapters
    .venv/bin/python bench/bench_engine_cpu.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slora_backend import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_SETS = (ALL_MODULES, ALL_MODULES[:4], ("q_proj", "v_proj"), ALL_MODULES[4:])
B_STD = 0.02  # PEFT initialises lora_B to zero; random B makes every adapter count
FIRST_TOKEN_ID = 3  # skip special tokens in random prompts
POOL_BYTES = 1 << 30


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: list[int]
    adapter: str
    max_tokens: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    p.add_argument("--prompt-len", default="32,128", help="min,max prompt tokens")
    p.add_argument("--output-len", default="64,256", help="min,max new tokens")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="engine torch threads (EngineConfig.cpu_threads; 0 = torch's default)")
    p.add_argument("--hf-threads", default="",
                   help="HF + PEFT runs once per value (default: 1 and torch's default)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 requests, 4 adapters, short prompts and outputs",
    )
    args = p.parse_args()
    if args.quick:
        args.num_requests, args.num_adapters, args.hf_batch_size = 8, 4, 4
        args.prompt_len, args.output_len = "16,32", "8,24"
    return args


def span(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def make_adapters(model_dir: Path, out: Path, count: int, ranks: list[int], seed: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in tqdm(range(count), desc="writing PEFT adapters"):
        torch.manual_seed(seed + i)
        rank = ranks[i % len(ranks)]
        modules = MODULE_SETS[i % len(MODULE_SETS)]
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, B_STD)
        name = f"bench_r{rank}_{i}"
        peft_model.save_pretrained(out / name)
        names.append(name)
    return names


def make_requests(args: argparse.Namespace, adapters: list[str], vocab: int) -> list[Request]:
    rng = random.Random(args.seed)
    (p_lo, p_hi), (o_lo, o_hi) = span(args.prompt_len), span(args.output_len)
    return [
        Request(
            f"req{i}",
            [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randint(p_lo, p_hi))],
            adapters[i % len(adapters)],
            rng.randint(o_lo, o_hi),
        )
        for i in range(args.num_requests)
    ]


def run_engine(args: argparse.Namespace, adapter_dir: Path, reqs: list[Request]) -> float:
    engine = LLMEngine(
        EngineConfig(
            model=str(args.model),
            adapter_dir=str(adapter_dir),
            dtype="float32",
            device="cpu",
            pool_bytes=POOL_BYTES,
            max_num_seqs=len(reqs),
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_loaded_adapters=len(set(r.adapter for r in reqs)),
            **({"cpu_threads": args.threads} if args.threads else {}),
        )
    )
    # warm-up: load every adapter into the host cache so both sides start from memory
    for name in {r.adapter for r in reqs}:
        engine.host_cache.wait(name, timeout=120)
    total = sum(r.max_tokens for r in reqs)
    start = time.perf_counter()
    for r in reqs:
        engine.add_request(
            r.request_id,
            prompt_token_ids=r.prompt,
            adapter_id=r.adapter,
            params=SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True),
        )
    generated = 0
    with tqdm(total=total, desc="engine", unit="tok") as bar:
        while engine.has_unfinished():
            n = sum(len(o.new_token_ids) for o in engine.step())
            generated += n
            bar.update(n)
    elapsed = time.perf_counter() - start
    engine.close()
    assert generated == total, (generated, total)
    return elapsed


def run_hf(
    args: argparse.Namespace, adapter_dir: Path, adapters: list[str], reqs: list[Request],
    threads: int,
) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    pad = base.config.pad_token_id or 0
    start = time.perf_counter()
    desc = f"hf+peft, {threads} threads"
    with tqdm(total=sum(r.max_tokens for r in reqs), desc=desc, unit="tok") as bar:
        for i in range(0, len(reqs), args.hf_batch_size):
            batch = reqs[i : i + args.hf_batch_size]
            width = max(len(r.prompt) for r in batch)
            ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in batch])
            mask = torch.tensor(
                [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch]
            )
            new = max(r.max_tokens for r in batch)  # static batch: runs to its longest request
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    adapter_names=[r.adapter for r in batch],
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad,
                )
            bar.update(sum(r.max_tokens for r in batch))
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    default_threads = torch.get_num_threads()
    hf_threads = [int(t) for t in args.hf_threads.split(",")] if args.hf_threads \
        else sorted({1, default_threads})
    torch.manual_seed(args.seed)
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        adapter_dir = Path(tmp)
        adapters = make_adapters(args.model, adapter_dir, args.num_adapters, ranks, args.seed)
        vocab = int(json.loads((args.model / "config.json").read_text())["vocab_size"])
        reqs = make_requests(args, adapters, vocab)
        engine_s = run_engine(args, adapter_dir, reqs)
        engine_threads = torch.get_num_threads()  # what the engine configured
        hf = {t: run_hf(args, adapter_dir, adapters, reqs, t) for t in hf_threads}
    total = sum(r.max_tokens for r in reqs)
    rows = [(f"S-LoRA engine (continuous batching), {engine_threads} threads", engine_s)]
    rows += [(f"HF + PEFT generate, static batch {args.hf_batch_size}, {t} threads", s)
             for t, s in hf.items()]
    print(
        f"\n{len(reqs)} requests, {len(adapters)} adapters (ranks {args.ranks}), prompts "
        f"{args.prompt_len} tokens, outputs {args.output_len} tokens, {total} output tokens, "
        f"{default_threads} cores"
    )
    print(f"| {'system':<56} | {'wall s':>8} | {'output tok/s':>12} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 14}|")
    for name, seconds in rows:
        print(f"| {name:<56} | {seconds:>8.2f} | {total / seconds:>12.1f} |")
    print(f"speedup vs the faster HF + PEFT run: {min(hf.values()) / engine_s:.2f}x")


if __name__ == "__main__":
    main()
