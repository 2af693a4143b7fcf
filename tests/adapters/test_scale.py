"""Scale: 2,000 adapters on disk, 500 requests with Zipf popularity, through the real LLMEngine.

Tiny random Llama on CPU. Checks: every request completes; the host cache byte bound, the pool
page accounting and the slot bound hold after every step; afterwards every pool page that does
not hold a resident adapter is free; ~5 requests equal HF+PEFT greedy tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_helpers import MAX_RANK

from slora_backend import EngineConfig, LLMEngine, SamplingParams
from slora_backend.model.lora import plan_adapter_rows
from slora_backend.model.spec import ModelSpec
from slora_testing.synthetic_adapters import (
    adapter_config,
    adapter_name,
    adapter_tensors,
    random_recipe,
    write_adapter,
)

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 2000
NUM_REQUESTS = 500
WAVE_SIZE = 50
# a wave is submitted when fewer than this many requests of earlier waves are unfinished
NEXT_WAVE_AT = 20
ZIPF_ALPHA = 1.0
PROMPT_LEN = (4, 12)
MAX_TOKENS = (2, 4)
RANKS = (4, 8, 16, 32, 64)
POOL_PAGES = 400  # tiny model: one page = 2 layers x 1024 fp32 = 8 KiB; rank 64 x 7 modules ~ 70
MAX_LOADED = 24  # slot tables: fewer than the distinct adapters used, so slots get recycled
HOST_CACHE_BYTES = 4 << 20  # ~30 average adapters of ~2,000: the host tier evicts too
NUM_SPOT_CHECKS = 5
BLOCK_SIZE = 16
FP32_BYTES = 4
MAX_STEPS = 5000
SEED = 1234


@dataclass(frozen=True)
class Req:
    request_id: str
    prompt: list[int]
    adapter: str
    max_tokens: int


@pytest.fixture(scope="module")
def scale_adapters(tmp_path_factory: pytest.TempPathFactory,
                   spec: ModelSpec) -> tuple[Path, list[str]]:
    """NUM_ADAPTERS random adapters (mixed ranks and modules): (adapter dir, ids)."""
    root = tmp_path_factory.mktemp("scale-adapters")
    rng = np.random.default_rng(SEED)
    names = []
    for index in range(NUM_ADAPTERS):
        recipe = random_recipe(rng, RANKS, seed=SEED + index)
        names.append(adapter_name(index, recipe))
        write_adapter(root / names[-1], adapter_config(recipe), adapter_tensors(recipe, spec))
    return root, names


def zipf_requests(names: list[str], vocab: int) -> list[Req]:
    rng = np.random.default_rng(SEED)
    weights = 1.0 / np.arange(1, len(names) + 1) ** ZIPF_ALPHA
    popular_first = rng.permutation(len(names))  # popularity independent of rank / modules
    picks = rng.choice(len(names), size=NUM_REQUESTS, p=weights / weights.sum())
    reqs = []
    for i, pick in enumerate(picks):
        prompt = rng.integers(3, vocab, size=int(rng.integers(*PROMPT_LEN, endpoint=True)))
        reqs.append(Req(f"req{i:03d}", [int(t) for t in prompt], names[popular_first[pick]],
                        int(rng.integers(*MAX_TOKENS, endpoint=True))))
    return reqs


def _lora_pages(engine: LLMEngine, resident: list[str], memo: dict[str, int]) -> int:
    """Pool pages the resident adapters occupy (the adapters never change in this test)."""
    for adapter_id in resident:
        if adapter_id not in memo:
            settings = engine.source.inspect(adapter_id).settings
            memo[adapter_id] = plan_adapter_rows(engine.spec, settings.modules, settings.rank,
                                                 engine.storage.page_elems).num_pages
    return sum(memo[a] for a in resident)


def _check_bounds(engine: LLMEngine, memo: dict[str, int]) -> None:
    stats = engine.stats()
    cache = stats.adapter_cache
    assert cache["bytes"] + cache["reserved_bytes"] <= HOST_CACHE_BYTES
    assert stats.pool_pages_free + stats.pool_pages_kv + stats.pool_pages_lora == POOL_PAGES
    assert stats.adapters_resident <= MAX_LOADED
    assert stats.pool_pages_lora == _lora_pages(engine, engine.resident_adapters(), memo)


def run_waves(engine: LLMEngine, reqs: list[Req]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    finished: dict[str, str | None] = {}
    memo: dict[str, int] = {}
    next_index = steps = 0
    while next_index < len(reqs) or engine.has_unfinished():
        if next_index < len(reqs) and next_index - len(finished) < NEXT_WAVE_AT:
            for req in reqs[next_index:next_index + WAVE_SIZE]:
                params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0,
                                        ignore_eos=True)
                engine.add_request(req.request_id, prompt_token_ids=req.prompt, params=params,
                                   adapter_id=req.adapter)
            next_index += WAVE_SIZE
        for out in engine.step():
            assert out.error is None, f"{out.request_id}: {out.error}"
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
        _check_bounds(engine, memo)
        steps += 1
        assert steps < MAX_STEPS, "the engine stopped making progress"
    assert finished == {r.request_id: "length" for r in reqs}
    print(f"\n{steps} steps")
    return tokens


def hf_peft_greedy(model_dir: Path, adapter_dir: Path, reqs: list[Req]) -> dict[str, list[int]]:
    """Each request alone through HF transformers + PEFT, greedy, full recompute per token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = None
    expected = {}
    for req in reqs:
        if model is None:
            model = PeftModel.from_pretrained(base, adapter_dir / req.adapter,
                                              adapter_name=req.adapter)
        elif req.adapter not in model.peft_config:
            model.load_adapter(adapter_dir / req.adapter, adapter_name=req.adapter)
        model.set_adapter(req.adapter)
        model.eval()
        ids = torch.tensor([req.prompt])
        with torch.no_grad():
            for _ in range(req.max_tokens):
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected[req.request_id] = ids[0, len(req.prompt):].tolist()
    return expected


def test_2000_adapters_500_zipf_requests(tiny_model_dir: Path, spec: ModelSpec,
                                         scale_adapters: tuple[Path, list[str]]) -> None:
    adapter_dir, names = scale_adapters
    reqs = zipf_requests(names, spec.vocab_size)
    distinct = {r.adapter for r in reqs}
    assert len(distinct) > 2 * MAX_LOADED  # the pool and the host cache must evict
    page_bytes = spec.num_layers * spec.page_elems(BLOCK_SIZE) * FP32_BYTES  # all layers
    config = EngineConfig(model=str(tiny_model_dir), adapter_dir=str(adapter_dir),
                          dtype="float32", device="cpu", pool_bytes=POOL_PAGES * page_bytes,
                          max_rank=MAX_RANK, max_loaded_adapters=MAX_LOADED,
                          host_cache_bytes=HOST_CACHE_BYTES, max_num_seqs=64,
                          block_size=BLOCK_SIZE)
    engine = LLMEngine(config)
    try:
        assert engine.pool.num_pages == POOL_PAGES
        assert len(engine.list_adapters()) == NUM_ADAPTERS
        start = time.perf_counter()
        tokens = run_waves(engine, reqs)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
        cache = stats.adapter_cache
    finally:
        engine.close()
    print(f"\n{NUM_REQUESTS} requests over {len(distinct)} adapters in {elapsed:.1f}s: {cache}")
    # afterwards: no KV page is held and every lora page belongs to a resident adapter
    assert stats.pool_pages_kv == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.pool_pages_free == POOL_PAGES - stats.pool_pages_lora
    assert cache["evictions"] > 0 and cache["pool_evictions"] > 0
    assert cache["load_errors"] == 0 and cache["loads"] >= len(distinct)
    assert all(len(tokens[r.request_id]) == r.max_tokens for r in reqs)

    # spot checks: the most popular adapter, a few rare ones (one request each)
    by_adapter: dict[str, list[Req]] = {}
    for req in reqs:
        by_adapter.setdefault(req.adapter, []).append(req)
    ranked = sorted(by_adapter.values(), key=len, reverse=True)
    rare = [group[0] for group in ranked[-(NUM_SPOT_CHECKS - 2):]]
    checks = [ranked[0][0], ranked[0][-1], *rare]
    expected = hf_peft_greedy(tiny_model_dir, adapter_dir, checks)
    for req in checks:
        assert tokens[req.request_id] == expected[req.request_id], req
