"""Exactness: the engine's greedy tokens (mixed adapters, staggered arrivals, chunked prefill,
continuous batching) equal HF transformers + PEFT generating each request alone, logits within
1e-4 relative; another arrival order / batch composition gives identical tokens.
Needs about 1-2 min on an idle 2-core machine (SmolLM2 dominates)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from engine_fixtures import ADAPTERS, SMOL_DIR, AdapterSpec, make_adapters

from slora_backend import EngineConfig, LLMEngine
from slora_testing.engine_runs import Req, run_requests

EXTRA_ADAPTER = AdapterSpec("a_r8_v_gate", 8, 8, ("v_proj", "gate_proj"))
ALL_ADAPTERS = (*ADAPTERS, EXTRA_ADAPTER)
NUM_REQUESTS = 14
NUM_BASE = 3  # requests without adapter
REL_TOL = 1e-4
POOL_BYTES = 64 << 20


def make_requests(vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    names: list[str | None] = [a.name for a in ALL_ADAPTERS]
    names = [*names, *names][:NUM_REQUESTS - NUM_BASE] + [None] * NUM_BASE
    reqs = []
    for i, name in enumerate(names):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 40))]
        reqs.append(Req(f"req{i}", prompt, name, rng.randint(12, 16), i // 3))
    return reqs


def run_engine(model_dir: Path, adapter_dir: Path, reqs: list[Req], budget: int,
               max_seqs: int) -> tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), adapter_dir=str(adapter_dir),
                                    dtype="float32", device="cpu", pool_bytes=POOL_BYTES,
                                    max_num_batched_tokens=budget, max_num_seqs=max_seqs))
    try:
        return run_requests(engine, reqs)
    finally:
        engine.close()


def hf_reference(model_dir: Path, adapter_dir: Path, reqs: list[Req],
                 tokens: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], int]:
    """HF + PEFT logits of every request alone (set_adapter / disable_adapter), one forward
    over prompt + the engine's tokens (teacher forcing). Returns the logits of the generated
    positions [n, V] per request and how many adapter requests' greedy tokens differ from
    the base model's.

    Greedy decoding is a pure function of the prefix, so if the HF argmax at every position
    equals the engine's token there, HF generating the request alone yields exactly these
    tokens (by induction over positions) - at one forward per request instead of one per token.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first, *rest = [a.name for a in ALL_ADAPTERS]
    model = PeftModel.from_pretrained(base, adapter_dir / first, adapter_name=first)
    for name in rest:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    logits, num_changed = {}, 0
    for r in reqs:
        ids = torch.tensor([r.prompt + tokens[r.request_id][:-1]])
        with torch.no_grad(), model.disable_adapter():
            base_rows = model(input_ids=ids).logits[0, len(r.prompt) - 1:].float()
        if r.adapter is None:
            logits[r.request_id] = base_rows
            continue
        model.set_adapter(r.adapter)
        with torch.no_grad():
            logits[r.request_id] = model(input_ids=ids).logits[0, len(r.prompt) - 1:].float()
        num_changed += int(not torch.equal(base_rows.argmax(-1),
                                           logits[r.request_id].argmax(-1)))
    return logits, num_changed


def check_exact(model_dir: Path, adapter_dir: Path, vocab: int) -> None:
    reqs = make_requests(vocab, seed=0)
    tokens, logits = run_engine(model_dir, adapter_dir, reqs, budget=48, max_seqs=8)
    ref_logits, num_changed = hf_reference(model_dir, adapter_dir, reqs, tokens)
    assert num_changed >= 3, "adapters must change greedy tokens, or the test proves little"
    for r in reqs:
        got_tokens = torch.tensor(tokens[r.request_id])
        assert len(got_tokens) == r.max_tokens == len(logits[r.request_id])
        assert torch.equal(ref_logits[r.request_id].argmax(-1), got_tokens), r
        for got, want in zip(logits[r.request_id], ref_logits[r.request_id]):
            rel = (got - want).abs().max() / want.abs().max()
            assert rel <= REL_TOL, (r.request_id, float(rel))
    # another arrival order and batch composition: identical tokens
    shuffled = [Req(r.request_id, r.prompt, r.adapter, r.max_tokens, i // 5)
                for i, r in enumerate(reversed(reqs))]
    tokens2, _ = run_engine(model_dir, adapter_dir, shuffled, budget=200, max_seqs=16)
    assert tokens2 == tokens


def test_exact_tiny_gqa_llama(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter_dir = make_adapters(tiny_model_dir, tmp_path / "adapters", ALL_ADAPTERS)
    check_exact(tiny_model_dir, adapter_dir, vocab=49152)


@pytest.mark.skipif(not (SMOL_DIR / "model.safetensors").exists(),
                    reason="SmolLM2 not converted (run make)")
def test_exact_smollm2(tmp_path: Path) -> None:
    adapter_dir = make_adapters(SMOL_DIR, tmp_path / "adapters", ALL_ADAPTERS)
    check_exact(SMOL_DIR, adapter_dir, vocab=49152)
