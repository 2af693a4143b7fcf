"""Scheduler behaviour on CPU without a model: tokens are 'generated' by the test."""

from __future__ import annotations

import itertools

import pytest

from slora_backend.config import DEFAULT_KV_HEADROOM_TOKENS
from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.scheduler import Scheduler, SchedulerOutput
from slora_backend.engine.sequence import SeqStatus, Sequence
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool
from slora_backend.sampling_params import SamplingParams

BLOCK = 4
FAKE_TOKEN = 7
_arrival = itertools.count()


def make_sched(num_pages: int = 64, max_num_seqs: int = 8, budget: int = 32,
               max_waiting: int = 100,
               headroom: int = DEFAULT_KV_HEADROOM_TOKENS) -> Scheduler:
    pool = PagePool(num_pages)
    return Scheduler(pool, KVManager(pool, BLOCK), None, max_num_seqs, budget, max_waiting,
                     headroom)


def make_seq(rid: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                    None, next(_arrival))


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    """One engine step without a model: commit, append a token where sampled, finish at length."""
    out = sched.schedule()
    for s in out.scheduled:  # every scheduled token must have a KV slot
        pages = sched.kv.block_table(s.request_id)
        assert len(pages) * BLOCK >= s.start + s.num_new_tokens
    sched.commit(out)
    done = []
    for s in out.scheduled:
        seq = sched.seqs[s.request_id]
        if s.sample:
            seq.output_token_ids.append(FAKE_TOKEN)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq, "length")
                done.append(seq)
    return out, done


def run_all(sched: Scheduler, max_steps: int = 10_000) -> list[Sequence]:
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        _, done = step(sched)
        finished += done
    raise AssertionError("scheduler did not finish")


def test_fcfs_admission_and_running_cap() -> None:
    sched = make_sched(max_num_seqs=2, budget=100)
    seqs = [make_seq(f"r{i}", 5, 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2", "r3"]
    finished = run_all(sched)
    assert [s.request_id for s in finished] == ["r0", "r1", "r2", "r3"]


def test_token_budget_chunked_prefill_and_mixed_steps() -> None:
    budget = 8
    sched = make_sched(budget=budget)
    sched.add(make_seq("short", 3, 6))
    sched.add(make_seq("long", 20, 2))
    saw_mixed = False
    chunks_of_long = []
    while sched.has_unfinished():
        out, _ = step(sched)
        assert out.num_batched_tokens <= budget
        by_id = {s.request_id: s for s in out.scheduled}
        if "long" in by_id and not by_id["long"].sample:
            chunks_of_long.append(by_id["long"].num_new_tokens)
        if "short" in by_id and by_id["short"].num_new_tokens == 1 and "long" in by_id \
                and by_id["long"].num_new_tokens > 1:
            saw_mixed = True  # a decode and a prefill chunk in one step
    assert saw_mixed
    assert len(chunks_of_long) >= 2  # the 20-token prompt did not fit in one step


def test_preemption_under_tiny_pool_finishes_everything_and_frees_pages() -> None:
    # 4 sequences of up to 4 + 12 - 1 = 15 tokens need 4 pages each; 8 pages hold 2 of them,
    # and admission without headroom lets all 4 in (then their growth preempts)
    sched = make_sched(num_pages=8, budget=64, headroom=0)
    seqs = [make_seq(f"r{i}", 4, 12) for i in range(4)]
    for s in seqs:
        sched.add(s)
    finished = run_all(sched)
    assert sorted(s.request_id for s in finished) == [f"r{i}" for i in range(4)]
    assert all(len(s.output_token_ids) == 12 for s in finished)
    assert sched.num_preemptions > 0
    assert sched.pool.num_free == 8 and sched.kv.num_seqs == 0


def test_preempted_sequence_recomputes_prompt_and_outputs() -> None:
    sched = make_sched(num_pages=4, budget=64, headroom=0)
    a, b = make_seq("a", 4, 9), make_seq("b", 4, 9)
    sched.add(a)
    sched.add(b)
    preempted_at = None
    for _ in range(50):
        out, _ = step(sched)
        if out.preempted and preempted_at is None:
            preempted_at = (out.preempted[0], len(sched.seqs[out.preempted[0]].output_token_ids))
            assert sched.waiting[0].request_id == out.preempted[0]  # requeued at the front
            assert sched.seqs[out.preempted[0]].num_computed_tokens == 0
        elif preempted_at is not None:
            sched_b = {s.request_id: s for s in out.scheduled}.get(preempted_at[0])
            if sched_b is not None:  # resumed: prompt + outputs so far, then samples
                assert sched_b.start == 0
                assert sched_b.num_new_tokens == 4 + preempted_at[1]
                assert sched_b.sample
                break
    assert preempted_at is not None, "a 4-page pool must preempt one of two 3-page sequences"


def test_abort_frees_pages_and_reports_cancelled() -> None:
    sched = make_sched()
    sched.add(make_seq("a", 10, 5))
    sched.add(make_seq("w", 10, 5))
    sched.max_num_seqs = 1
    step(sched)
    assert sched.pool.num_used > 0
    seq = sched.abort("a")
    assert seq is not None and seq.finish_reason == "cancelled" and seq.status is SeqStatus.FINISHED
    assert sched.pool.num_used == 0
    waiting = sched.abort("w")
    assert waiting is not None and waiting.finish_reason == "cancelled"
    assert not sched.has_unfinished()
    assert sched.abort("a") is None  # already gone


def test_bounded_queue_rejects_with_unavailable() -> None:
    sched = make_sched(max_waiting=2)
    sched.add(make_seq("a", 3, 2))
    sched.add(make_seq("b", 3, 2))
    with pytest.raises(EngineError) as info:
        sched.add(make_seq("c", 3, 2))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert len(sched.waiting) == 2


def test_duplicate_request_id_refused() -> None:
    sched = make_sched()
    sched.add(make_seq("a", 3, 2))
    with pytest.raises(EngineError, match="request_id"):
        sched.add(make_seq("a", 3, 2))
