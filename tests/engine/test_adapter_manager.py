"""Pool tier: adapter rows written into the shared pool, slots, refcounts, LRU eviction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pool_helpers import assert_rows_equal

from slora_backend.adapters.adapter_manager import AdapterManager, Wait
from slora_backend.adapters.host_cache import HostCache
from slora_backend.adapters.source import AdapterSource
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.spec import MODULE_INDEX, ModelSpec

BLOCK = 16
HOST_BYTES = 64 << 20


def build(model_dir: Path, adapter_dir: Path, num_pages: int, slots: int = 4,
          max_rank: int = 64, block: int = BLOCK) -> tuple[AdapterManager, HostCache]:
    spec = ModelSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    storage = PoolStorage(spec.num_layers, num_pages, block, spec.num_kv_heads, spec.head_dim,
                          torch.float32, "cpu")
    cache = HostCache(AdapterSource(adapter_dir, spec, max_rank, torch.float32), HOST_BYTES)
    return AdapterManager(spec, storage, PagePool(num_pages), cache, slots, max_rank), cache


def load_now(mgr: AdapterManager, cache: HostCache, name: str,
             reserve: int = 0) -> int | Wait:
    cache.wait(name, timeout=60)
    return mgr.acquire(name, reserve_pages=reserve)


def test_rows_in_pool_equal_peft_weights(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64)
    name = "a_r16_rslora"
    assert mgr.acquire(name) is Wait.LOADING  # host copy not loaded yet: the request waits
    slot = load_now(mgr, cache, name)
    assert isinstance(slot, int)
    cfg = json.loads((tiny_adapter_dir / name / "adapter_config.json").read_text())
    rank = cfg["r"]
    assert mgr.tables.scales[slot].item() == pytest.approx(cfg["lora_alpha"] / rank ** 0.5)
    assert_rows_equal(mgr, slot, tiny_adapter_dir, name, ("q_proj", "up_proj", "o_proj"), rank)
    assert mgr.tables.ranks[slot, MODULE_INDEX["k_proj"]] == 0
    assert mgr.pool.used_by("lora") > 0 and mgr.pool.used_by("kv") == 0
    cache.close()


def test_refcount_and_lru_eviction_of_idle_adapters(tiny_model_dir: Path,
                                                     tiny_adapter_dir: Path) -> None:
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64)
    names = ["a_r4_qv", "a_r8_all", "a_r16_mlp"]
    slots = [load_now(mgr, cache, n) for n in names]
    assert len(set(slots)) == 3 and all(isinstance(s, int) for s in slots)
    assert mgr.evict_idle(1000) == 0  # all in use: nothing evictable
    mgr.release("a_r8_all")
    mgr.release("a_r4_qv")  # released last = most recently used
    lora_before = mgr.pool.used_by("lora")
    freed = mgr.evict_idle(1)  # evicts the LRU idle one only
    assert freed > 0 and mgr.pool.used_by("lora") == lora_before - freed
    assert mgr.resident() == ["a_r16_mlp", "a_r4_qv"]
    assert mgr.tables.ranks[slots[1]].sum() == 0  # its slot was cleared
    assert load_now(mgr, cache, "a_r4_qv") == slots[0]  # still resident: same slot, no reload
    with pytest.raises(ValueError):
        mgr.release("a_r8_all")  # not held any more
    cache.close()


def test_idle_adapters_that_queued_requests_await_are_evicted_last(
        tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64)
    names = ["a_r4_qv", "a_r8_all", "a_r16_mlp"]
    for name in names:
        assert isinstance(load_now(mgr, cache, name), int)
        mgr.release(name)  # idle, least recently used first: names' order
    mgr.awaited = lambda: {"a_r4_qv"}  # the next admission needs it: evicted now, reloaded
    mgr.evict_idle(1)
    assert mgr.resident() == ["a_r4_qv", "a_r16_mlp"]  # the LRU of the others went
    mgr.evict_idle(1000)  # but evicted too when nothing else frees enough
    assert mgr.resident() == []
    cache.close()


def test_kv_and_adapters_compete_for_the_same_pages(tiny_model_dir: Path,
                                                    tiny_adapter_dir: Path) -> None:
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=40)
    slot = load_now(mgr, cache, "a_r64_ko_down")
    adapter_pages = mgr.pool.used_by("lora")
    mgr.release("a_r64_ko_down")
    kv_pages = mgr.pool.allocate(mgr.pool.num_free, "kv")  # KV takes every free page
    assert isinstance(slot, int) and mgr.resident() == ["a_r64_ko_down"]
    # KV needs more: the idle adapter is evicted and its pages go to KV
    assert mgr.evict_idle(1) == adapter_pages
    assert mgr.pool.num_free == adapter_pages and mgr.resident() == []
    # with the pool full of KV, an adapter cannot become resident: acquire says "no room"
    mgr.pool.allocate(mgr.pool.num_free, "kv")
    assert load_now(mgr, cache, "a_r4_qv") is Wait.NO_ROOM
    mgr.pool.free(kv_pages)
    # reserve_pages: the request's KV must fit next to the adapter, or it waits for room
    assert mgr.acquire("a_r4_qv", reserve_pages=mgr.pool.num_free) is Wait.NO_ROOM
    assert isinstance(mgr.acquire("a_r4_qv", reserve_pages=1), int)
    cache.close()


def test_slot_capacity_waits_then_evicts_lru(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64, slots=2)
    assert isinstance(load_now(mgr, cache, "a_r4_qv"), int)
    assert isinstance(load_now(mgr, cache, "a_r8_all"), int)
    assert load_now(mgr, cache, "a_r16_mlp") is Wait.NO_ROOM  # both slots held by requests
    mgr.release("a_r4_qv")
    assert isinstance(mgr.acquire("a_r16_mlp"), int)
    assert mgr.resident() == ["a_r8_all", "a_r16_mlp"]
    cache.close()


def test_rows_longer_than_a_page_refuse_the_adapter(tiny_model_dir: Path,
                                                    tiny_adapter_dir: Path) -> None:
    """A pool page of 1 token (64 elements here) holds the attention rows (64 long) but not
    the MLP ones (128): that adapter is refused with INVALID_ARG at admission, not a crash."""
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64, block=1)
    try:
        assert mgr.pages_for("a_r4_qv") > 0
        with pytest.raises(EngineError) as err:
            mgr.pages_for("a_r16_mlp")
        assert err.value.code is ErrorCode.INVALID_ARG
        assert "adapter 'a_r16_mlp': does not fit the model" in err.value.message
    finally:
        cache.close()


def test_admitting_a_resident_adapter_starts_no_host_load(tiny_model_dir: Path,
                                                          tiny_adapter_dir: Path) -> None:
    # the pool copy serves; only a rewrite on disk (a stat) sends it back to the host tier.
    # Reloading its host copy instead evicted host entries that queued requests awaited
    mgr, cache = build(tiny_model_dir, tiny_adapter_dir, num_pages=64)
    try:
        assert isinstance(load_now(mgr, cache, "a_r4_qv"), int)
        mgr.release("a_r4_qv")
        cache.evict("a_r4_qv")
        before = cache.stats()
        assert isinstance(mgr.acquire("a_r4_qv"), int)
        after = cache.stats()
        assert (after["misses"], after["loads"]) == (before["misses"], before["loads"])
        assert "a_r4_qv" not in cache.resident()
    finally:
        cache.close()
