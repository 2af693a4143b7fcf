"""Bytes a tensor-parallel step moves: LoRA's collectives against the base model's.

Computed for Llama-2-7B and Llama-2-70B shapes (--compute), and measured on the CPU (gloo, a
small random Llama with load_format=dummy) as a check of the formula (--measure): the
engine's collectives count their payload bytes by kind (slora_backend/parallel/comm.py).

Per layer, per step of T tokens of which N carry an adapter (rank r padded to rp, a multiple
of tp), payload = the tensor a collective combines:
- base: two all-reduces of [T, hidden] (after o and after down), model dtype;
- LoRA, torch backend (CPU path): all-gathers of [3, N, rp] (q,k,v) and [2, N, rp] (gate,up),
  all-reduces of [1, N, rp] (o) and [1, N, rp] (down), model dtype: 7 N rp elements;
- LoRA, triton backend (CUDA path): the same collectives on the kernels' fp32 shrink output,
  which spans every token of the step (up to its largest padded rank): 7 T rp fp32 elements.
On the wire (ring algorithms) each GPU sends (tp-1)/tp of an all-gather's payload and
2 (tp-1)/tp of an all-reduce's. Not per layer: the step plan (pickled, on a gloo group) and,
with async scheduling, 8 bytes per fed token; an adapter load scatters its padded factors once.
The lm_head is kept whole on rank 0: a vocabulary-parallel head would gather S x vocab logits
per step instead (shown as `vocab-parallel lm_head`).

    python bench/tp_comm_bytes.py                # both: the table, then the CPU check
    python bench/tp_comm_bytes.py --compute --out bench/results/tp_comm_bytes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]

from slora_backend.model.spec import MODULE_ORDER, ModelSpec  # noqa: E402
from slora_testing.synthetic_adapters import LLAMA7B_CONFIG  # noqa: E402

LLAMA70B_CONFIG = dict(LLAMA7B_CONFIG, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
SHAPES = {"Llama-2-7B": LLAMA7B_CONFIG, "Llama-2-70B": LLAMA70B_CONFIG}
TP_SIZES = {"Llama-2-7B": (2, 4, 8), "Llama-2-70B": (4, 8)}
COLUMN_SITES = (3, 2)  # modules gathered together: q,k,v; gate,up
ROW_SITES = (1, 1)  # o; down
FP16, FP32 = 2, 4
# the CPU check: a small Llama (random weights, load_format=dummy) and one decode step
MAX_TOKENS = 8  # no request finishes before the measured step
CHECK_CONFIG = dict(LLAMA7B_CONFIG, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    vocab_size=512, torch_dtype="float32")


@dataclass(frozen=True)
class Step:
    tokens: int  # T
    lora_tokens: int  # N
    rank: int  # every adapter's rank, all seven modules


def padded(rank: int, tp: int) -> int:
    return -(-rank // tp) * tp


def payload_bytes(spec: ModelSpec, tp: int, step: Step, backend: str,
                  dtype_bytes: int) -> dict[str, int]:
    """Payload bytes of one step's per-layer collectives, all layers, by kind and operation."""
    L, T = spec.num_layers, step.tokens
    base = 2 * T * spec.hidden_size * dtype_bytes
    if backend == "torch":
        per_module = step.lora_tokens * padded(step.rank, tp) * dtype_bytes
    else:
        per_module = T * padded(step.rank, tp) * FP32
    return {"base_all_reduce": L * base,
            "lora_all_gather": L * sum(COLUMN_SITES) * per_module,
            "lora_all_reduce": L * sum(ROW_SITES) * per_module}


def wire_bytes(payload: dict[str, int], tp: int) -> dict[str, float]:
    """Bytes each GPU sends (ring): (tp-1)/tp of a gather, 2 (tp-1)/tp of a reduce."""
    share = (tp - 1) / tp
    base = 2 * share * payload["base_all_reduce"]
    lora = share * payload["lora_all_gather"] + 2 * share * payload["lora_all_reduce"]
    return {"base": base, "lora": lora}


def compute_table() -> list[dict]:
    rows = []
    for name, config in SHAPES.items():
        spec = ModelSpec.from_hf_config(config)
        for tp in TP_SIZES[name]:
            for tokens, rank in ((256, 16), (256, 64), (32, 16)):
                step = Step(tokens, tokens, rank)
                row = {"model": name, "tp": tp, "tokens": tokens, "rank": rank}
                for backend in ("torch", "triton"):
                    wire = wire_bytes(payload_bytes(spec, tp, step, backend, FP16), tp)
                    row[f"{backend}_lora_mb"] = round(wire["lora"] / 1e6, 2)
                    row[f"{backend}_lora_pct"] = round(100 * wire["lora"] / wire["base"], 2)
                row["base_mb"] = round(wire["base"] / 1e6, 2)
                row["vocab_parallel_lm_head_mb"] = round(
                    (tp - 1) / tp * tokens * spec.vocab_size * FP32 / 1e6, 2)
                rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | tp | tokens | rank | base (MB/GPU) | LoRA, CUDA path (MB, % of base) | "
          "LoRA, exact ranks (MB, %) | vocab-parallel lm_head (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['tp']} | {r['tokens']} | {r['rank']} | {r['base_mb']} | "
              f"{r['triton_lora_mb']} ({r['triton_lora_pct']}%) | {r['torch_lora_mb']} "
              f"({r['torch_lora_pct']}%) | {r['vocab_parallel_lm_head_mb']} |")


def measure(tp: int, step: Step, root: Path) -> dict[str, int]:
    """The collectives' payload bytes of one decode step of `step.tokens` requests (the first
    step.lora_tokens with an adapter of step.rank on all seven modules) at `tp` ranks on the
    CPU, by kind, from the engine's own counters."""
    from slora_backend import EngineConfig, LLMEngine, SamplingParams
    from slora_testing.synthetic_adapters import (
        AdapterRecipe,
        adapter_config,
        adapter_tensors,
        write_adapter,
    )

    model = root / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(CHECK_CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((REPO / ".cache/models/SmolLM2-135M-Instruct" / name)
                                   .read_bytes())
    spec = ModelSpec.from_hf_config(CHECK_CONFIG)
    recipe = AdapterRecipe(step.rank, MODULE_ORDER, float(step.rank), False, "list", 0)
    write_adapter(root / "adapters" / "a", adapter_config(recipe), adapter_tensors(recipe, spec))
    engine = LLMEngine(EngineConfig(model=str(model), adapter_dir=str(root / "adapters"),
                                    dtype="float32", device="cpu", load_format="dummy",
                                    pool_bytes=16 << 20, max_rank=step.rank,
                                    tensor_parallel_size=tp, max_num_seqs=step.tokens))
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for i in range(step.tokens):
            engine.add_request(str(i), prompt_token_ids=[5 + i, 7, 9], params=params,
                               adapter_id="a" if i < step.lora_tokens else None)
        started: set[str] = set()
        while len(started) < step.tokens:  # prefills (an adapter's request once it is loaded)
            started.update(out.request_id for out in engine.step())
        engine.tp.comm.traffic.clear()
        engine.step()  # one decode step: every request, one token
        return dict(engine.tp.comm.traffic)
    finally:
        engine.close()


def check(tp: int = 2, step: Step = Step(6, 4, 5)) -> dict:
    """Measured vs formula on the CPU (torch backend, fp32)."""
    with tempfile.TemporaryDirectory(prefix="tp-comm-") as tmp:
        measured = measure(tp, step, Path(tmp))
    formula = payload_bytes(ModelSpec.from_hf_config(CHECK_CONFIG), tp, step, "torch", FP32)
    return {"tp": tp, "step": vars(step), "measured": measured,
            "formula": {"base": formula["base_all_reduce"],
                        "lora": formula["lora_all_gather"] + formula["lora_all_reduce"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--compute", action="store_true", help="only the 7B / 70B table")
    p.add_argument("--measure", action="store_true", help="only the CPU check")
    p.add_argument("--out", type=Path, default=None, help="JSON of the results")
    args = p.parse_args()
    results: dict = {}
    if not args.measure:
        results["computed"] = compute_table()
        print_table(results["computed"])
    if not args.compute:
        results["cpu_check"] = check()
        print(json.dumps(results["cpu_check"], indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
