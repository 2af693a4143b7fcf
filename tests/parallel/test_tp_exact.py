"""Tensor parallelism on the CPU (gloo): 2 and 4 ranks give the greedy tokens of 1 rank and
its fp32 logits within 1e-5, for a mixed batch of base-model requests and adapters of ranks
4-64 over all seven modules (staggered arrivals, chunked prefill, prefill and decode in one
step), on a model whose heads split evenly and on one with SmolLM2's 9 query / 3 KV heads,
which 2 or 4 ranks share only once padded with zero heads (12 / 4: parallel/shard.py
pad_heads; at 4 ranks the last one holds zero heads only). 2 ranks run with async scheduling
(tokens fed from rank 0's previous step), 4 without.
One rank is checked against HF + PEFT by tests/engine/test_exactness.py. About a minute and a
half on 2 cores (the workers' start-up dominates)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from tp_helpers import engine_config, make_tp_model, max_abs_diff, mixed_requests, run

pytestmark = pytest.mark.slow

LOGITS_TOL = 1e-5  # |logits| here reach ~4.5
ADAPTER_EFFECT = 0.1  # each adapter moves its request's logits by more than this


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """heads ("even" / "padded") -> (model, adapters, requests, 1-rank tokens, 1-rank logits),
    each model built and run once."""
    built: dict[str, tuple] = {}

    def get(heads: str) -> tuple:
        if heads not in built:
            built[heads] = _one_rank(tmp_path_factory.mktemp(f"tp_exact_{heads}"), heads)
        return built[heads]

    return get


def _one_rank(root: Path, heads: str) -> tuple:
    model, adapters = make_tp_model(root, heads)
    reqs = mixed_requests()
    tokens, logits, traffic = run(engine_config(model, adapters, 1), reqs)
    assert traffic == {}  # one rank: no collective at all
    _, base_logits, _ = run(engine_config(model, adapters, 1),
                            [dataclasses.replace(r, adapter=None) for r in reqs])
    for r in reqs:  # else the comparison would prove little
        moved = float((logits[r.request_id] - base_logits[r.request_id]).abs().max())
        assert (moved > ADAPTER_EFFECT) == (r.adapter is not None), (r, moved)
    return model, adapters, reqs, tokens, logits


@pytest.mark.parametrize("heads, tp, async_scheduling",
                         [("even", 2, "on"), ("padded", 2, "on"), ("padded", 4, "off")])
def test_tp_matches_one_rank(reference, caplog: pytest.LogCaptureFixture, heads: str, tp: int,
                            async_scheduling: str) -> None:
    model, adapters, reqs, tokens, logits = reference(heads)
    with caplog.at_level(logging.WARNING, "slora_backend.parallel.driver"):
        got_tokens, got_logits, traffic = run(
            engine_config(model, adapters, tp, async_scheduling=async_scheduling), reqs)
    padded = f"9 query / 3 KV heads padded to 12 / 4 for tensor_parallel_size {tp}"
    assert (padded in caplog.text) == (heads == "padded"), caplog.text  # logged, once
    assert caplog.text.count("heads padded") <= 1
    assert got_tokens == tokens
    diff = max_abs_diff(got_logits, logits)
    print(f"{heads} heads, tp={tp}: max |logit difference| = {diff:.2e}")
    assert diff <= LOGITS_TOL
    # the LoRA collectives ran, and the adapters reached the workers through the plan
    assert traffic["lora"] > 0 and traffic["adapter"] > 0 and traffic["base"] > 0
    assert (traffic.get("feed", 0) > 0) == (async_scheduling == "on")


def test_tp_refuses_a_size_that_does_not_split_the_mlp(reference) -> None:
    from slora_backend import EngineError, LLMEngine

    model, adapters, *_ = reference("even")
    with pytest.raises(EngineError) as err:
        LLMEngine(engine_config(model, adapters, 3))  # heads padded, but MLP 128, hidden 64
    assert err.value.field == "tensor_parallel_size"
    assert "does not divide the model's 128 MLP columns" in err.value.message
