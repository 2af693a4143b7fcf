"""The benchmarks' per-step timing (slora_testing/step_timing.py): step kinds recorded from a
real engine, and the mixed-step bound's arithmetic."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_engine import GREEDY, drain, make_engine

from slora_backend import SamplingParams
from slora_testing.step_timing import (
    DECODE,
    MIXED,
    StepRecord,
    StepTimer,
    by_kind,
    idle_by_pool_loads,
    idle_detail,
    matmul_flops_per_token,
    mixed_bound,
    sync_sites,
)


def test_step_timer_kinds(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    """Every prompt token is counted once, in mixed steps; decode-only steps carry none; the
    engine's launch is restored on close."""
    eng = make_engine(tiny_model_dir, tiny_adapter_dir, max_num_batched_tokens=16,
                      max_num_seqs=4)
    launch = eng.runner.launch
    timer = StepTimer(eng)
    prompts = [[100 + j for j in range(n)] for n in (30, 5, 12, 9, 20)]
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", prompt_token_ids=p,
                        params=SamplingParams(max_tokens=6, **GREEDY))
    drain(eng)
    timer.close()
    assert eng.runner.launch == launch
    records = timer.records()
    kinds = by_kind(records)
    assert kinds[MIXED]["prompt_tokens"] == sum(map(len, prompts))
    assert kinds[DECODE]["prompt_tokens"] == 0 and kinds[DECODE]["steps"] > 0
    assert all(r.decode_rows <= 4 and r.gpu_ms > 0 for r in records)
    assert kinds[DECODE]["paths"] == {"eager": kinds[DECODE]["steps"]}
    assert sum(r.pool_loads for r in records) == 0 and idle_by_pool_loads(records) == {}
    eng.close()


def test_step_timer_counts_pool_loads_per_step(tiny_model_dir: Path,
                                               tiny_adapter_dir: Path) -> None:
    """Each adapter's host -> pool load is counted once, on a step whose scheduling started
    it (at most one per sequence of the step)."""
    eng = make_engine(tiny_model_dir, tiny_adapter_dir, max_num_seqs=2)
    adapters = sorted(p.name for p in tiny_adapter_dir.iterdir())[:3]
    set_slot = eng.adapters.tables.set_slot
    timer = StepTimer(eng)
    for i, adapter in enumerate(adapters):
        eng.add_request(f"r{i}", prompt_token_ids=[100, 101, 102], adapter_id=adapter,
                        params=SamplingParams(max_tokens=4, **GREEDY))
    drain(eng)
    timer.close()
    records = timer.records()
    assert sum(r.pool_loads for r in records) == eng.adapters.num_loads == len(adapters)
    assert all(r.pool_loads <= 2 for r in records) and records[0].pool_loads >= 1
    # every adapter turned ready once (on the CPU at its load), the tables' method restored
    assert sum(r.flips for r in records) == len(adapters)
    assert eng.adapters.tables.set_slot == set_slot
    assert records[0].gap_ms != records[0].gap_ms and all(r.gap_ms >= 0 for r in records[1:])
    eng.close()


def test_idle_split_by_pool_loads() -> None:
    records = [StepRecord(DECODE, "g", 8, 0, 1.0, gpu_ms=5.0),  # the first: no idle time
               StepRecord(MIXED, "m", 8, 40, 1.0, gpu_ms=9.0, pool_loads=2, idle_ms=3.0),
               StepRecord(DECODE, "g", 8, 0, 1.0, gpu_ms=5.0, idle_ms=0.5),
               StepRecord(DECODE, "g", 8, 0, 1.0, gpu_ms=5.0, idle_ms=1.5)]
    out = idle_by_pool_loads(records)
    assert out["with_pool_loads"] == {"steps": 1, "pool_loads": 2, "idle_s": 0.003,
                                      "idle_ms_per_step": 3.0}
    assert out["without_pool_loads"] == {"steps": 2, "pool_loads": 0, "idle_s": 0.002,
                                         "idle_ms_per_step": 1.0}


def test_idle_detail_lists_the_longest_idles() -> None:
    records = [StepRecord(DECODE, "g", 8, 0, 1.0, gpu_ms=5.0)] + [
        StepRecord(DECODE, "g", 8, 0, 1.0, gpu_ms=5.0 + i, idle_ms=float(i), flips=i % 2,
                   gap_ms=0.5) for i in range(1, 40)]
    out = idle_detail(records)
    assert out["idle_s_first_5pct"] == 0.001 and out["idle_s_rest"] == round(779 / 1e3, 3)
    assert out["flips"] == 20 and len(out["worst"]) == 12
    assert [w["step"] for w in out["worst"]] == list(range(28, 40))
    assert out["worst"][0] == {"step": 28, "idle_ms": 28.0, "pool_loads": 0, "flips": 0,
                               "gap_ms": 0.5, "previous_gpu_ms": 32.0}
    assert idle_detail(records[:1]) == {}


def test_sync_sites_counts_sync_warnings_by_line() -> None:
    # torch's sync debug mode warns at each host wait for the device (CUDA only); the count
    # is by the line that made the call, other warnings are not counted
    with sync_sites() as counts:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    (site, n), = counts.items()
    assert site.startswith("test_step_timing.py:") and n == 3
    with sync_sites(enabled=False) as counts, pytest.warns(UserWarning):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert not counts


def test_mixed_bound_arithmetic() -> None:
    """Bound = decode ms of the nearest batch class + 1.5 x prompt tokens x FLOPs / rate."""
    records = [StepRecord(DECODE, "g", 200, 0, 1.0, gpu_ms=10.0),
               StepRecord(DECODE, "g", 10, 0, 1.0, gpu_ms=4.0),
               StepRecord(MIXED, "m", 199, 100, 1.0, gpu_ms=12.0),  # bound 10 + 1.5 x 2 = 13
               StepRecord(MIXED, "m", 0, 500, 1.0, gpu_ms=30.0)]  # bound 4 + 1.5 x 10 = 19
    out = mixed_bound(records, flops_per_token=2e9, peak_flops=1e14)  # 0.02 ms per token
    assert out["mixed_steps"] == 2 and out["within_bound_pct"] == 50.0
    assert out["bound_ms_per_step"] == pytest.approx(16.0)
    assert out["actual_over_bound_total"] == pytest.approx(42 / 32, abs=1e-3)
    assert out["decode_ms_by_batch_class"] == {"16": 4.0, "208": 10.0}
    assert mixed_bound(records[:2], 2e9, 1e14) == {}


def test_flops_per_token(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    eng = make_engine(tiny_model_dir, tiny_adapter_dir)
    s = eng.spec
    per_layer = s.hidden_size * (s.q_size + 2 * s.kv_size) + s.q_size * s.hidden_size \
        + 3 * s.hidden_size * s.intermediate_size
    assert matmul_flops_per_token(eng.model) == 2 * s.num_layers * per_layer
    eng.close()
