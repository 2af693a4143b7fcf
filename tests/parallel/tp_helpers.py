"""Helpers for the tensor-parallel tests: tiny GQA Llamas (one whose heads split 4 ways, one
with SmolLM2's 9 query / 3 KV heads, which 2 or 4 ranks share only once padded), synthetic
PEFT adapters of ranks 4-64 over all seven modules, and an engine run that records tokens
and logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slora_backend import EngineConfig, LLMEngine
from slora_backend.model.spec import MODULE_ORDER
from slora_testing.engine_runs import Req, run_requests
from slora_testing.synthetic_adapters import (
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    load_spec,
    make_tiny_model,
    write_adapter,
)

REPO = Path(__file__).resolve().parents[2]
SMOL_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
HEADS = {
    # 8 query heads, 4 KV heads (GQA 2), hidden 64, MLP 128: every size splits 1, 2 or 4 ways
    "even": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    # 9 query heads, 3 KV heads (GQA 3, as SmolLM2-135M): padded to 12 / 4 heads at 2 or 4
    # ranks; hidden 72 (transformers wants a multiple of the heads)
    "padded": dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8, hidden_size=72),
}
# name -> (rank, modules): ranks 4-64 (6 and 12 not multiples of 4: padded shares), all seven
# modules covered, column- and row-parallel ones mixed
ADAPTERS = {
    "r4_all": (4, MODULE_ORDER),
    "r6_q_o_down": (6, ("q_proj", "o_proj", "down_proj")),
    "r8_kv_up": (8, ("k_proj", "v_proj", "up_proj")),
    "r12_gate_down": (12, ("gate_proj", "down_proj")),
    "r32_attn": (32, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "r64_mlp_o": (64, ("o_proj", "gate_proj", "up_proj", "down_proj")),
}
POOL_BYTES = 32 << 20


def make_tp_model(root: Path, heads: str = "even", **config: object) -> tuple[Path, Path]:
    """(model dir, adapter dir) under root; `heads`: which head counts (HEADS); `config`: more
    LlamaConfig fields."""
    model = make_tiny_model(root / "tiny", SMOL_DIR, **{**HEADS[heads], **config})
    spec = load_spec(model)
    for seed, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
        recipe = AdapterRecipe(rank, tuple(modules), float(rank), seed == 1, "list", seed)
        write_adapter(root / "adapters" / name, adapter_config(recipe),
                      adapter_tensors(recipe, spec))
    return model, root / "adapters"


def mixed_requests() -> list[Req]:
    """Base and adapter requests, staggered: prefill chunks and decodes share steps."""
    names = [None, *ADAPTERS, None, "r4_all", "r64_mlp_o"]
    return [Req(f"req{i}", [(7 * i + 5 * j) % 4000 + 3 for j in range(6 + 5 * i % 23)], name,
                6 + i % 4, i // 3) for i, name in enumerate(names)]


def engine_config(model: Path, adapters: Path, tp: int, **overrides: object) -> EngineConfig:
    settings = dict(dtype="float32", device="cpu", pool_bytes=POOL_BYTES,
                    max_num_batched_tokens=32, max_num_seqs=6)
    return EngineConfig(model=str(model), adapter_dir=str(adapters), tensor_parallel_size=tp,
                        **{**settings, **overrides})


def run(config: EngineConfig, reqs: list[Req]
        ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], dict[str, int]]:
    """Greedy tokens and logits [n, V] per request, and the collectives' bytes by kind."""
    engine = LLMEngine(config)
    try:
        tokens, logits = run_requests(engine, reqs)
        traffic = dict(engine.tp.comm.traffic) if engine.tp is not None else {}
    finally:
        engine.close()
    for pid in engine.tp.pids() if engine.tp is not None else []:
        with pytest.raises(ProcessLookupError):  # the workers exited and were reaped
            os.kill(pid, 0)
    return tokens, {k: torch.stack(v) for k, v in logits.items()}, traffic


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest |difference| over every logit of every request."""
    return max(float((got[k] - w).abs().max()) for k, w in want.items())
