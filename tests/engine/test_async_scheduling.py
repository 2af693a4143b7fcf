"""Async scheduling: a step's tokens are read back after the next step is launched.

The next step reads those tokens on the device (placeholders in the sequences, fed from the
previous step's token tensor); a sequence that stops on a token is computed one extra row,
which is dropped. Outputs must be exactly those of the synchronous engine, with nothing leaked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import GREEDY, drain, make_engine, tokens_of

from slora_backend import LLMEngine, RequestOutput, SamplingParams

# (request id, prompt, adapter, sampling) - ranks 4..64, base rows, greedy and seeded sampling
REQUESTS = [
    ("g_base", [100 + j for j in range(12)], None, dict(max_tokens=30, **GREEDY)),
    ("g_qv", [200 + 3 * j for j in range(9)], "a_r4_qv", dict(max_tokens=1, **GREEDY)),
    ("s_all", [300 + j for j in range(20)], "a_r8_all",
     dict(max_tokens=25, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)),
    ("g_mlp", [400 + 5 * j for j in range(15)], "a_r16_mlp", dict(max_tokens=18, **GREEDY)),
    ("s_attn", [500 + j for j in range(7)], "a_r32_attn",
     dict(max_tokens=22, temperature=1.2, top_k=20, seed=3, ignore_eos=True)),
    ("g_ko", [600 + 2 * j for j in range(30)], "a_r64_ko_down", dict(max_tokens=12, **GREEDY)),
    ("g_rs", [700 + j for j in range(5)], "a_r16_rslora", dict(max_tokens=27, **GREEDY)),
    ("abort", [800 + j for j in range(10)], "a_r8_all", dict(max_tokens=40, **GREEDY)),
]
ABORT_AFTER_STEPS = 4


def summary(outs: list[RequestOutput]) -> tuple:
    last = outs[-1]
    return (tokens_of(outs), "".join(o.new_text for o in outs), last.finish_reason,
            last.num_output_tokens, [o.num_output_tokens for o in outs])


def run(engine: LLMEngine, stops: dict[str, str]) -> dict[str, tuple]:
    for rid, prompt, adapter, kw in REQUESTS:
        stop = [stops[rid]] if rid in stops else []
        engine.add_request(rid, prompt_token_ids=prompt, adapter_id=adapter,
                           params=SamplingParams(stop=stop, **kw))
    outs: dict[str, list[RequestOutput]] = {}
    for i in range(ABORT_AFTER_STEPS):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if i == ABORT_AFTER_STEPS - 1:
            engine.abort("abort")
    for rid, more in drain(engine).items():
        outs.setdefault(rid, []).extend(more)
    stats = engine.stats()
    assert stats.pool_pages_kv == 0 and stats.num_running == stats.num_waiting == 0
    assert not engine.has_unfinished()
    return {rid: summary(o) for rid, o in outs.items()}


def test_async_outputs_equal_sync(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    """Same tokens, texts, finish reasons and counts as the synchronous engine, with stop
    strings hit mid-stream (the extra row of a stopped sequence is dropped) and an abort while
    a step is in flight. (Preemption of sequences whose last token is still on the device:
    test_engine.py::test_preemption_gives_the_same_tokens[on].)"""
    results = {}
    for mode in ("off", "on"):
        eng = make_engine(tiny_model_dir, tiny_adapter_dir, async_scheduling=mode)
        assert eng.async_scheduling == (mode == "on")
        run(eng, {})  # makes every adapter resident: the same batches in both modes
        plain = run(eng, {})
        # stop strings cut two greedy requests in the middle of their text
        stops = {rid: plain[rid][1][len(plain[rid][1]) // 2:][:4] for rid in ("g_base", "g_mlp")}
        stopped = run(eng, stops)
        for rid in stops:
            assert stopped[rid][2] == "stop" and len(stopped[rid][0]) < len(plain[rid][0])
        results[mode] = plain, stopped
        eng.close()
    for got, expected in zip(results["on"], results["off"]):
        # the abort lands after step ABORT_AFTER_STEPS in both; async had streamed one less
        aborted, aborted_sync = got.pop("abort"), expected.pop("abort")
        assert aborted[2] == aborted_sync[2] == "cancelled"
        assert aborted[0] == aborted_sync[0][:len(aborted[0])] and len(aborted[0]) >= 1
    (plain, stopped), (plain_sync, stopped_sync) = results["on"], results["off"]
    assert plain == plain_sync
    # a stopped sequence's extra row changes the batch shape of one step, and CPU matmuls
    # round differently with the number of rows: exact for greedy requests only
    assert {k: v for k, v in stopped.items() if k.startswith("g_")} == \
        {k: v for k, v in stopped_sync.items() if k.startswith("g_")}
    assert all(stopped[k][2:4] == stopped_sync[k][2:4] for k in stopped)


def test_tokens_arrive_one_step_later(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    """Async: the token a step samples is streamed by the next step; the sequence that ends
    by length is not scheduled again, so its last step only reads back."""
    per_step = {}
    for mode in ("off", "on"):
        eng = make_engine(tiny_model_dir, tiny_adapter_dir, async_scheduling=mode)
        eng.add_request("r", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=3,
                                                                                **GREEDY))
        steps = []
        while eng.has_unfinished():
            steps.append([t for o in eng.step() for t in o.new_token_ids])
        per_step[mode] = steps
        assert eng.stats().num_steps == len(steps) and eng.stats().pool_pages_kv == 0
        eng.close()
    sync, lagged = per_step["off"], per_step["on"]
    assert [len(s) for s in sync] == [1, 1, 1]
    assert lagged == [[]] + sync


@pytest.mark.parametrize("device,gpu", [("cuda", 0), ("cuda:1", 1)])
def test_async_equals_sync_on_cuda(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                   device: str, gpu: int) -> None:
    """On the GPU: Triton kernels, decode steps replayed from CUDA graphs that take their input
    tokens from the previous step's device tensor; greedy tokens equal the synchronous run.
    A bare "cuda" (what device "auto" gives) is the current GPU; on the second GPU too (the
    kernels, graphs and events must follow the engine's device)."""
    if torch.cuda.device_count() <= gpu:
        pytest.skip(f"needs {gpu + 1} CUDA device(s) (the GPU machine)")
    greedy = [r for r in REQUESTS if r[0].startswith("g_")]
    results = {}
    for mode in ("off", "on"):
        eng = make_engine(tiny_model_dir, tiny_adapter_dir, async_scheduling=mode,
                          device=device, dtype="float16", pool_bytes=None,
                          pool_fraction=0.05,
                          cuda_graph_max_batch=16)
        assert eng.runner.graphs is not None and eng.device == torch.device("cuda", gpu)
        for _ in range(2):  # the first run makes the adapters resident: same batches after
            for rid, prompt, adapter, kw in greedy:
                eng.add_request(rid, prompt_token_ids=prompt, adapter_id=adapter,
                                params=SamplingParams(**kw))
            outs = drain(eng)
        results[mode] = {rid: summary(o) for rid, o in outs.items()}
        assert eng.stats().pool_pages_kv == 0
        eng.close()
    assert results["on"] == results["off"]
    assert all(len(v[0]) == kw["max_tokens"] for (rid, _, _, kw), v in
               zip(greedy, (results["on"][r[0]] for r in greedy)))
