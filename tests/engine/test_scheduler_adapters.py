"""Admission with adapters that are still loading, on CPU without a model: the real pool tier
(AdapterManager) and host tier (HostCache) over adapters on disk, tokens 'generated' by the
test. While one request's adapter loads, requests whose adapters are ready (or the base model)
fill the batch; once loaded, the waiting request is admitted first (it never starves)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from test_scheduler import BLOCK, make_seq, run_all, step

from slora_backend.adapters import AdapterSource, HostCache
from slora_backend.adapters.adapter_manager import AdapterManager
from slora_backend.adapters.host_arena import footprint
from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.scheduler import Scheduler
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.spec import MODULE_ORDER, ModelSpec
from slora_testing.synthetic_adapters import (
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    link_adapter,
    write_adapter,
)

SPEC = ModelSpec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=100)
MAX_RANK = 16
POOL_PAGES = 256
WAIT_S = 30.0


def _write(root: Path, name: str, rank: int) -> None:
    recipe = AdapterRecipe(rank, MODULE_ORDER, 2.0 * rank, False, "list", seed=rank)
    write_adapter(root / name, adapter_config(recipe), adapter_tensors(recipe, SPEC))


def _seq(rid: str, adapter: str | None):
    seq = make_seq(rid, prompt_len=6, max_tokens=3)
    seq.adapter_id = adapter
    return seq


def test_ready_requests_fill_the_batch_while_an_adapter_loads(tmp_path: Path) -> None:
    for name, rank in (("warm", 4), ("cold", MAX_RANK), ("holder", MAX_RANK)):
        _write(tmp_path, name, rank)
    source = AdapterSource(tmp_path, SPEC, MAX_RANK, torch.float32)
    # room for exactly one rank-16 adapter: while the test holds an evicted one, the arena
    # has no range for "cold", whose load then waits (deterministically) for it to come back
    cache = HostCache(source, footprint(source.inspect("cold").nbytes), workers=1,
                      pin_memory=False)
    pool = PagePool(POOL_PAGES)
    storage = PoolStorage(SPEC.num_layers, POOL_PAGES, BLOCK, SPEC.num_kv_heads, SPEC.head_dim,
                          torch.float32, "cpu")
    manager = AdapterManager(SPEC, storage, pool, cache, max_slots=4, max_rank=MAX_RANK)
    sched = Scheduler(pool, KVManager(pool, BLOCK), manager, max_num_seqs=8,
                      max_num_batched_tokens=64, max_waiting=100)
    try:
        cache.wait("warm", timeout=WAIT_S)
        assert isinstance(manager.acquire("warm"), int)  # in the pool (its host copy may go)
        manager.release("warm")
        held = cache.wait("holder", timeout=WAIT_S)
        cache.evict("holder")
        for rid, adapter in (("c0", "cold"), ("b1", None), ("w2", "warm"), ("b3", None)):
            sched.add(_seq(rid, adapter))
        for _ in range(2):  # "cold" cannot load yet: the others run, c0 waits at the head
            out, _ = step(sched)
            assert {s.request_id for s in out.scheduled} == {"b1", "w2", "b3"}
            assert [s.request_id for s in sched.waiting] == ["c0"]
        sched.add(_seq("b4", None))  # arrives after c0
        del held  # the range comes back: "cold" loads
        assert cache.wait("cold", timeout=WAIT_S).adapter_id == "cold"
        out, _ = step(sched)  # its pool copy starts and (on the CPU) completes at once
        admitted = [s.request_id for s in out.scheduled if s.start == 0]
        assert admitted[0] == "c0"  # admitted before the later arrival
        finished = run_all(sched)
        assert {s.request_id for s in finished} >= {"c0", "b4"}
        assert pool.used_by("kv") == 0
    finally:
        cache.close()


def test_a_long_queue_does_not_thrash_a_small_host_cache(tmp_path: Path) -> None:
    """Requests for many more adapters than the host cache holds, queued at once. Admission
    asks about every waiting request at every step, but only the head of the queue demands a
    load: the others are loaded by the prefetch, in arrival order, within the cache's bound.
    When every question started a load, the loads evicted each other's adapters before their
    requests came (here ~6 loads per adapter)."""
    _write(tmp_path, "a0", 8)
    for i in range(1, 40):  # the same files under other ids, as thousands of adapters are
        link_adapter(tmp_path / "a0", tmp_path / f"a{i}")
    source = AdapterSource(tmp_path, SPEC, MAX_RANK, torch.float32)
    cache = HostCache(source, 4 * footprint(source.inspect("a0").nbytes), workers=2,
                      pin_memory=False)
    # a pool with room for every adapter and request: only the host cache is too small
    pool = PagePool(16 * POOL_PAGES)
    storage = PoolStorage(SPEC.num_layers, pool.num_pages, BLOCK, SPEC.num_kv_heads,
                          SPEC.head_dim, torch.float32, "cpu")
    manager = AdapterManager(SPEC, storage, pool, cache, max_slots=40, max_rank=MAX_RANK)
    sched = Scheduler(pool, KVManager(pool, BLOCK), manager, max_num_seqs=16,
                      max_num_batched_tokens=64, max_waiting=100)
    rng = random.Random(0)
    adapters = [f"a{rng.randrange(40)}" for _ in range(60)]
    try:
        for i, adapter in enumerate(adapters):  # as LLMEngine.add_request does
            sched.add(_seq(f"r{i}", adapter))
            manager.prefetch(adapter)
        finished = []
        deadline = time.monotonic() + WAIT_S
        while sched.has_unfinished() and time.monotonic() < deadline:
            out, done = step(sched)
            finished += done
            if out.is_empty:
                cache.wait_for_loads(0.005)
        stats = cache.stats()
    finally:
        cache.close()
    assert len(finished) == len(adapters)
    assert stats["loads"] <= len(set(adapters)) + 2  # the head's demand may evict one
    assert stats["bytes"] <= cache.capacity_bytes
