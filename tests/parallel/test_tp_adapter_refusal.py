"""At tensor parallelism an adapter's values are checked on rank 0's host copy before any rank
writes it (parallel/adapters.py ShardedCopier): a NaN refuses its requests with INVALID_ARG
naming the tensor, its pages and slot come back, and the engine serves the other requests
(2 ranks on the CPU, gloo)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tp_helpers import engine_config, make_tp_model

from slora_backend import LLMEngine, SamplingParams
from slora_backend.adapters.validation import tensor_key
from slora_backend.errors import ErrorCode
from slora_testing.synthetic_adapters import (
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    load_spec,
    write_adapter,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 200
MAX_TOKENS = 4


def test_a_non_finite_adapter_is_refused_at_tp(tmp_path: Path) -> None:
    model, adapters = make_tp_model(tmp_path)
    recipe = AdapterRecipe(8, ("q_proj", "down_proj"), 8.0, False, "list", 7)
    tensors = adapter_tensors(recipe, load_spec(model))
    key = tensor_key(1, "down_proj", "B")
    tensors[key][0, 0] = math.nan
    write_adapter(adapters / "bad", adapter_config(recipe), tensors)
    engine = LLMEngine(engine_config(model, adapters, 2))
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for rid, adapter in (("bad", "bad"), ("good", "r8_kv_up"), ("base", None)):
            engine.add_request(rid, prompt_token_ids=[5, 6, 7, 8, 9], params=params,
                               adapter_id=adapter)
        tokens: dict[str, list[int]] = {"good": [], "base": []}
        errors = {}
        for _ in range(MAX_STEPS):
            for out in engine.step():
                if out.error is not None:
                    errors[out.request_id] = out.error
                else:
                    tokens[out.request_id] += out.new_token_ids
            if not engine.has_unfinished():
                break
        assert list(errors) == ["bad"]
        assert errors["bad"].code is ErrorCode.INVALID_ARG
        assert f"'{key}' has non-finite values" in errors["bad"].message
        assert {rid: len(t) for rid, t in tokens.items()} == {"good": MAX_TOKENS,
                                                              "base": MAX_TOKENS}
        assert engine.adapters.resident() == ["r8_kv_up"]  # the refused one holds nothing
        assert engine.pool.used_by("lora") == engine.adapters.pages_for("r8_kv_up")
        assert engine.failure is None  # the ranks are still in step
    finally:
        engine.close()
