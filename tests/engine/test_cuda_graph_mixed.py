"""Mixed steps replayed from CUDA graphs (config cuda_graph_mixed) against the same engine with
them off (eager mixed steps), on the GPU (skipped elsewhere): the mixed-step graphs serve the
prefill chunks beside decode rows, and every sampled row's logits match the eager ones while
the greedy tokens agree (fp16: the kernels differ, varlen attention and grouped LoRA against
prefill attention and MBGMM, so a near-tie may flip a token; the rows after it differ anyway).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_async_scheduling import REQUESTS
from test_engine import drain, make_engine, tokens_of

from slora_backend import EngineError, ErrorCode, SamplingParams
from slora_backend.engine.model_runner import DECODE_GRAPH, EAGER, MIXED_GRAPH

FP16_REL_TOL = 2e-2


def test_on_needs_a_graphable_model(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    """"on" where graphs cannot run (the CPU's torch backend) is refused by name; auto is
    eager there."""
    with pytest.raises(EngineError) as exc:
        make_engine(tiny_model_dir, tiny_adapter_dir, cuda_graph_mixed="on")
    assert exc.value.code is ErrorCode.INVALID_ARG and "cuda_graph_mixed" in exc.value.message
    eng = make_engine(tiny_model_dir, tiny_adapter_dir)
    assert eng.runner.mixed is None and eng.runner.graphs is None
    eng.close()


def run(model_dir: Path, adapter_dir: Path, mode: str) -> tuple[dict, dict, set[str]]:
    """Greedy requests (each on its own adapter or the base model), a small token budget so
    prompts are chunked beside decode rows; returns tokens and logits rows per request and
    the paths the steps took (second round: adapters resident)."""
    eng = make_engine(model_dir, adapter_dir, device="cuda", dtype="float16", pool_bytes=None,
                      pool_fraction=0.05, cuda_graph_max_batch=16, cuda_graph_mixed=mode,
                      max_num_batched_tokens=40, max_num_seqs=8)
    assert (eng.runner.mixed is not None) == (mode == "on")
    rows: dict[str, list[torch.Tensor]] = {}
    paths: set[str] = set()

    def hook(ids: list[str], logits: torch.Tensor) -> None:
        for rid, row in zip(ids, logits):
            rows.setdefault(rid, []).append(row.float().cpu())
        paths.add(eng.runner.last_path)

    greedy = [r for r in REQUESTS if r[0].startswith("g_")]
    for _ in range(2):
        rows.clear()
        paths.clear()
        eng.runner.logits_hook = hook
        for rid, prompt, adapter, kw in greedy:
            eng.add_request(rid, prompt_token_ids=prompt, adapter_id=adapter,
                            params=SamplingParams(**kw))
        outs = drain(eng)
    eng.close()
    return {rid: tokens_of(o) for rid, o in outs.items()}, dict(rows), paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_graphs_match_eager_engine(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    tokens_on, rows_on, paths_on = run(tiny_model_dir, tiny_adapter_dir, "on")
    tokens_off, rows_off, paths_off = run(tiny_model_dir, tiny_adapter_dir, "off")
    assert MIXED_GRAPH in paths_on and DECODE_GRAPH in paths_on and EAGER not in paths_on
    assert MIXED_GRAPH not in paths_off and EAGER in paths_off
    assert tokens_on.keys() == tokens_off.keys()
    for rid in tokens_on:
        a, b = tokens_on[rid], tokens_off[rid]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        # row i samples token i: compare up to the first token that differs (included)
        for i in range(min(agree + 1, len(rows_on[rid]))):
            got, ref = rows_on[rid][i], rows_off[rid][i]
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err <= FP16_REL_TOL, (rid, i, err)
