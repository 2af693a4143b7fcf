"""Admission with adapters that are still loading, on CPU without a model: the real pool tier
(AdapterManager) and host tier (HostCache) over adapters on disk, tokens 'generated' by the
test. While one request's adapter loads, requests whose adapters are ready (or the base model)
fill the batch; once loaded, the waiting request is admitted first (it never starves)."""

from __future__ import annotations

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
