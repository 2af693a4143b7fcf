"""Admission headroom (kv_headroom_tokens): a waiting request is admitted only while the pool
keeps room for every running request's next tokens, so that admitting it does not make the
batch's next page preempt it; no request waits forever; and issue 19's simulation
(bench/sim_preemption.py) runs and shows the gain."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from test_scheduler import BLOCK, make_sched, make_seq, run_all, step

from slora_backend.config import EngineConfig
from slora_backend.errors import EngineError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import sim_preemption  # noqa: E402


def test_admission_waits_instead_of_being_preempted() -> None:
    """4 pages of 4 tokens. `a` (4 + 8 tokens) runs; `b` (8 + 2) arrives when `a` holds 2 pages
    at 5 tokens. Without headroom `b` takes the 2 free pages and `a`'s next page preempts it
    (its 8-token prefill wasted); with one page of headroom `b` waits for `a` to finish."""
    outcomes = {}
    for headroom in (0, BLOCK):
        sched = make_sched(num_pages=4, budget=64, headroom=headroom)
        sched.add(make_seq("a", 4, 8))
        step(sched)
        sched.add(make_seq("b", 8, 2))
        out, _ = step(sched)
        admitted = "b" in {s.request_id for s in out.scheduled}
        finished = run_all(sched)
        assert sorted(s.request_id for s in finished) == ["a", "b"]
        assert sched.pool.num_free == 4
        outcomes[headroom] = (admitted, sched.num_preemptions)
    assert outcomes[0] == (True, 1)  # the old policy: admitted, then preempted
    assert outcomes[BLOCK] == (False, 0)  # kept waiting: no preemption, no recompute


def test_headroom_stops_at_max_tokens() -> None:
    """A running request on its last token keeps no headroom, nor does a request of one
    token: with a headroom of 16 tokens (4 pages each) the last free page still admits `b`."""
    sched = make_sched(num_pages=4, budget=64, headroom=16)
    sched.add(make_seq("a", 8, 2))
    step(sched)  # a: 9 tokens, 1 to go
    sched.add(make_seq("b", 3, 1))
    out = sched.schedule()  # a grows to 3 pages; b needs 1 page for its 3 + 1 tokens
    assert {s.request_id for s in out.scheduled} == {"a", "b"}
    assert sched.pool.num_free == 0 and sched.num_preemptions == 0


def test_long_request_is_not_starved_by_a_stream_of_short_ones() -> None:
    """A request of 14 of the pool's 16 pages queued behind running ones that finish one by
    one, with two short ones arriving every step: each time a little room frees, a short one
    would fit where the long one does not. Admission stays first come first served, so the
    long one goes in once the earlier ones are done (no later one first) and finishes."""
    sched = make_sched(num_pages=16, max_num_seqs=8, budget=64, max_waiting=1000, headroom=4)
    for i in range(4):
        sched.add(make_seq(f"early{i}", 8, 4 * (i + 1)))
    step(sched)
    long = make_seq("long", 48, 8)
    sched.add(long)
    admitted_before_long: list[str] = []
    finished: list[str] = []
    for i in range(200):
        sched.add(make_seq(f"late{i}", 4, 10))
        sched.add(make_seq(f"late{i}b", 4, 10))
        out, done = step(sched)
        finished += [s.request_id for s in done]
        if long.num_computed_tokens == 0:
            admitted_before_long += [s.request_id for s in out.scheduled
                                     if s.request_id.startswith("late")]
        if "long" in finished:
            break
    assert "long" in finished, "the long request waited forever"
    assert admitted_before_long == []
    assert {f"early{i}" for i in range(4)} <= set(finished)
    assert long.num_preemptions == 0


@pytest.mark.parametrize("headroom", [0, 4, 16, 10**6])
def test_random_arrivals_all_finish_in_a_tiny_pool(headroom: int) -> None:
    """Random prompts and lengths arriving over time into a 24-page pool (each fits alone):
    every request finishes, within a bound on its wait, and the pool is empty at the end;
    a headroom up to a whole request (10**6 tokens) only delays."""
    rng = random.Random(headroom)
    sched = make_sched(num_pages=24, max_num_seqs=6, budget=16, headroom=headroom)
    pending = [make_seq(f"r{i}", rng.randint(1, 40), rng.randint(1, 50)) for i in range(60)]
    added_at: dict[str, int] = {}
    finished = 0
    for t in range(20_000):
        if pending and rng.random() < 0.3:
            seq = pending.pop(0)
            sched.add(seq)
            added_at[seq.request_id] = t
        if not pending and not sched.has_unfinished():
            break
        _, done = step(sched)
        for seq in done:
            finished += 1
            assert t - added_at[seq.request_id] < 2_000  # a bound well above the fair share
    assert finished == 60
    assert sched.pool.num_free == 24 and sched.kv.num_seqs == 0


def test_kv_headroom_tokens_is_validated() -> None:
    assert EngineConfig(kv_headroom_tokens=0).kv_headroom_tokens == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(EngineError, match="kv_headroom_tokens"):
            EngineConfig(kv_headroom_tokens=bad)


def test_simulation_old_vs_new_policy() -> None:
    """bench/sim_preemption.py on a scaled-down issue 19 workload (60 requests, a pool a tenth
    of the H100's): the old policy preempts and recomputes, the default does not, in no more
    simulated time."""
    old = sim_preemption.simulate(676, sim_preemption.POLICIES["old"], 60, seed=0)
    new = sim_preemption.simulate(676, sim_preemption.POLICIES["new"], 60, seed=0)
    assert old["preemptions"] > 0 and old["recompute_pct"] > 0
    assert new["preemptions"] < old["preemptions"]
    assert new["prompt_tokens_prefilled"] < old["prompt_tokens_prefilled"]
    assert new["prompt_tokens_in_requests"] == old["prompt_tokens_in_requests"]
    assert new["est_seconds"] <= old["est_seconds"]
