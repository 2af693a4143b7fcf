"""HostCache: LRU bounded in bytes, background loads, failures, counters, thread safety."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from adapter_helpers import MAX_RANK, ManualFence, recipe, resident_pages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_backend.adapters import AdapterSource, HostCache
from slora_backend.adapters.host_arena import footprint
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model.spec import MODULE_ORDER, ModelSpec
from slora_testing.synthetic_adapters import adapter_config, adapter_tensors, write_adapter

WAIT_S = 30.0
LRU_RANKS = (4, 8, 16, 32, 8, 4, 64, 16)  # distinct sizes: the byte bound matters, not counts
# a Llama-7B-like width with 4 layers: one rank-64 all-module adapter is ~37 MB, a load that
# takes long enough to watch it happen in the background
WIDE_SPEC = ModelSpec(num_layers=4, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128,
                      intermediate_size=5632, vocab_size=32000)


@pytest.fixture(scope="module")
def lru_source(tmp_path_factory: pytest.TempPathFactory, spec: ModelSpec) -> AdapterSource:
    root = tmp_path_factory.mktemp("lru-adapters")
    for i, rank in enumerate(LRU_RANKS):
        rec = recipe(rank=rank, modules=MODULE_ORDER[: 1 + i % 7], seed=i)
        write_adapter(root / f"a{i}", adapter_config(rec), adapter_tensors(rec, spec))
    return AdapterSource(root, spec, MAX_RANK, torch.float32)


def _sizes(source: AdapterSource) -> dict[str, int]:
    return {name: source.inspect(name).nbytes for name in source.list_adapters()}


def _check_bound(cache: HostCache) -> None:
    stats = cache.stats()
    assert stats["bytes"] + stats["reserved_bytes"] <= cache.capacity_bytes
    assert stats["bytes"] >= 0 and stats["reserved_bytes"] >= 0


OPS = st.lists(st.tuples(st.sampled_from(["wait", "evict"]), st.integers(0, len(LRU_RANKS) - 1)),
               min_size=1, max_size=40)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, capacity_fraction=st.floats(0.0, 1.0))
def test_lru_matches_reference_and_bound_holds(lru_source: AdapterSource, ops: list,
                                               capacity_fraction: float) -> None:
    sizes = _sizes(lru_source)
    names = sorted(sizes)
    largest, total = max(sizes.values()), sum(sizes.values())
    capacity = int(largest + capacity_fraction * (total - largest))
    cache = HostCache(lru_source, capacity, workers=1, pin_memory=False)
    ref: OrderedDict[str, int] = OrderedDict()
    evictions = misses = 0
    try:
        for op, index in ops:
            name = names[index]
            if op == "evict":
                evicted = cache.evict(name)
                assert evicted == (name in ref)
                evictions += evicted
                ref.pop(name, None)
            elif name in ref:
                ref.move_to_end(name)
                assert cache.wait(name, timeout=WAIT_S).adapter_id == name
            else:
                misses += 1
                while sum(ref.values()) + sizes[name] > capacity:
                    ref.popitem(last=False)
                    evictions += 1
                ref[name] = sizes[name]
                assert cache.wait(name, timeout=WAIT_S).nbytes == sizes[name]
                # the bytes must also be contiguous in the arena: a load may evict more, but
                # only the least recently used entries, so what stays is a suffix of the LRU
                resident = cache.resident()
                assert resident == list(ref)[len(ref) - len(resident):]
                for extra in list(ref)[:len(ref) - len(resident)]:
                    del ref[extra]
                    evictions += 1
            _check_bound(cache)
            assert cache.resident() == list(ref)
        stats = cache.stats()
        assert stats["bytes"] == sum(ref.values())
        assert (stats["evictions"], stats["misses"], stats["loads"]) == (evictions, misses, misses)
    finally:
        cache.close()


def test_bound_holds_under_concurrent_random_use(lru_source: AdapterSource) -> None:
    sizes = _sizes(lru_source)
    names = sorted(sizes)
    capacity = max(sizes.values()) + min(sizes.values())
    cache = HostCache(lru_source, capacity, workers=3, pin_memory=False)
    violations: list[str] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            stats = cache.stats()
            if stats["bytes"] + stats["reserved_bytes"] > capacity:
                violations.append(repr(stats))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            name = rng.choice(names)
            action = rng.random()
            if action < 0.4:
                cache.prefetch(name)
            elif action < 0.9:
                adapter = cache.get(name)
                assert adapter is None or adapter.adapter_id == name
            else:
                cache.evict(name)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        for name in names:  # everything still loads afterwards
            assert cache.wait(name, timeout=WAIT_S).adapter_id == name
    finally:
        stop.set()
        watcher.join()
        cache.close()
    assert violations == []
    stats = cache.stats()
    assert stats["host_inflight"] == 0 and stats["reserved_bytes"] == 0
    assert stats["bytes"] == sum(sizes[n] for n in cache.resident()) <= capacity
    assert stats["load_errors"] == 0


def test_prefetch_returns_at_once_and_loads_in_background(tmp_path: Path) -> None:
    rec = recipe(rank=MAX_RANK, modules=MODULE_ORDER, seed=3)
    write_adapter(tmp_path / "wide", adapter_config(rec), adapter_tensors(rec, WIDE_SPEC))
    source = AdapterSource(tmp_path, WIDE_SPEC, MAX_RANK, torch.float32)
    cache = HostCache(source, capacity_bytes=1 << 30, workers=1, pin_memory=False)
    try:
        start = time.perf_counter()
        cache.prefetch("wide")
        prefetch_s = time.perf_counter() - start
        not_ready = cache.get("wide")
        adapter = cache.wait("wide", timeout=WAIT_S)
        stats = cache.stats()
    finally:
        cache.close()
    assert not_ready is None  # the ~37 MB load was still running after prefetch returned
    assert adapter.nbytes > 30 * (1 << 20)
    assert prefetch_s < stats["load_latency_max_s"] / 2
    assert stats["loads"] == 1 and stats["misses"] == 1 and stats["load_latency_total_s"] > 0


def test_a_load_on_the_cpu_faults_in_the_next_loads_memory(tmp_path: Path) -> None:
    """The memory right after a load's range (where first fit puts the next load) is faulted
    in after it, so that the next load's page faults are on no request's path."""
    rec = recipe(rank=MAX_RANK, modules=MODULE_ORDER, seed=3)
    write_adapter(tmp_path / "wide", adapter_config(rec), adapter_tensors(rec, WIDE_SPEC))
    source = AdapterSource(tmp_path, WIDE_SPEC, MAX_RANK, torch.float32)
    cache = HostCache(source, capacity_bytes=1 << 30, workers=1, pin_memory=False)
    try:
        adapter = cache.wait("wide", timeout=WAIT_S)
    finally:
        cache.close()  # the loader has finished its work
    size, buffer = footprint(adapter.nbytes), adapter.buffer
    after = torch.empty(0, dtype=torch.uint8).set_(
        buffer.untyped_storage(), buffer.storage_offset() * buffer.element_size() + size, (size,))
    resident, pages = resident_pages(after)
    assert resident == pages


def test_adapter_larger_than_cache_is_refused(lru_source: AdapterSource) -> None:
    name = "a6"  # the rank-64 one
    size = lru_source.inspect(name).nbytes
    cache = HostCache(lru_source, capacity_bytes=size - 1, workers=1, pin_memory=False)
    try:
        with pytest.raises(EngineError, match="more than the whole host cache") as info:
            cache.wait(name, timeout=WAIT_S)
    finally:
        cache.close()
    assert info.value.code == ErrorCode.INVALID_ARG and f"'{name}'" in info.value.message
    assert cache.stats()["bytes"] == 0 and cache.stats()["load_errors"] == 1


def test_failed_load_is_reported_and_retried_after_a_fix(spec: ModelSpec, adapter_dir: Path,
                                                         source: AdapterSource) -> None:
    rec = recipe(rank=4)
    bad = adapter_config(rec) | {"use_dora": True}
    write_adapter(adapter_dir / "flaky", bad, adapter_tensors(rec, spec))
    cache = HostCache(source, capacity_bytes=1 << 24, workers=1, pin_memory=False)
    try:
        with pytest.raises(EngineError, match="use_dora"):
            cache.wait("flaky", timeout=WAIT_S)
        assert cache.get("flaky") is None  # a failed load is not retried by polling ...
        assert cache.stats()["misses"] == 1
        assert "use_dora" in cache.error("flaky").message
        folder = write_adapter(adapter_dir / "flaky", adapter_config(rec),
                               adapter_tensors(rec, spec))
        later = time.time() + 5
        for path in folder.iterdir():
            os.utime(path, (later, later))
        # ... but a fixed adapter (new files) is
        assert cache.wait("flaky", timeout=WAIT_S).rank == 4
        assert cache.error("flaky") is None
    finally:
        cache.close()


@pytest.mark.parametrize(("kwargs", "field"), [({"capacity_bytes": 0}, "host_cache_bytes"),
                                              ({"capacity_bytes": 1, "workers": 0},
                                               "host_cache_workers")])
def test_bad_arguments(source: AdapterSource, kwargs: dict, field: str) -> None:
    with pytest.raises(EngineError, match=field):
        HostCache(source, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pinned_on_cuda(lru_source: AdapterSource) -> None:
    cache = HostCache(lru_source, capacity_bytes=1 << 26)
    try:
        adapter = cache.wait("a0", timeout=WAIT_S)
    finally:
        cache.close()
    assert adapter.buffer is not None and adapter.buffer.is_pinned()
    assert all(a.is_pinned() and b.is_pinned() for a, b in adapter.weights.values())


def test_get_of_unknown_or_bad_id_starts_no_load(source: AdapterSource) -> None:
    cache = HostCache(source, capacity_bytes=1 << 20, workers=1, pin_memory=False)
    try:
        assert cache.get("missing") is None
        assert cache.error("missing").code == ErrorCode.NOT_FOUND
        assert cache.get("../escape") is None
        assert cache.error("../escape").code == ErrorCode.INVALID_ARG
        stats = cache.stats()
    finally:
        cache.close()
    assert stats["misses"] == 0 and stats["loads"] == 0 and stats["bytes"] == 0


def test_an_adapter_the_pool_refused_frees_its_bytes(spec: ModelSpec, adapter_dir: Path,
                                                     source: AdapterSource) -> None:
    # values are checked by the pool tier after its copy (on the device): the host tier loads
    # a NaN, and forgets it when the pool tier rejects it
    rec = recipe(rank=4)
    tensors = adapter_tensors(rec, spec)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    write_adapter(adapter_dir / "nan", adapter_config(rec), tensors)
    cache = HostCache(source, capacity_bytes=1 << 24, workers=1, pin_memory=False)
    try:
        adapter = cache.wait("nan", timeout=WAIT_S)
        error = EngineError(ErrorCode.INVALID_ARG, "adapter 'nan': non-finite")
        cache.reject("nan", error, adapter.fingerprint)
        del adapter
        assert cache.get("nan") is None and cache.error("nan") is error  # no reload
        stats = cache.stats()
        assert stats["bytes"] == 0 and stats["reserved_bytes"] == 0 and cache.resident() == []
        assert stats["load_errors"] == 1 and stats["loads"] == 1 and stats["misses"] == 1
        assert cache.wait("nan", timeout=WAIT_S).adapter_id == "nan"  # a new request retries
    finally:
        cache.close()


def _settle(cache: HostCache) -> dict:
    deadline = time.monotonic() + WAIT_S
    while cache.stats()["host_inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return cache.stats()


def test_prefetch_looks_ahead_in_order_within_the_capacity(spec: ModelSpec, adapter_dir: Path,
                                                           source: AdapterSource) -> None:
    """Queued requests' adapters load in arrival order, at most a cache-full ahead of their
    claims (get = admission); loading ahead never evicts an adapter still awaited; a get of an
    adapter still deferred loads it at once."""
    names = [f"p{i}" for i in range(6)]
    for i, name in enumerate(names):
        rec = recipe(rank=8, seed=i)
        write_adapter(adapter_dir / name, adapter_config(rec), adapter_tensors(rec, spec))
    size = source.inspect(names[0]).nbytes
    cache = HostCache(source, capacity_bytes=3 * size, workers=2, pin_memory=False)
    try:
        for name in names:
            cache.prefetch(name)
        stats = _settle(cache)
        assert sorted(cache.resident()) == names[:3] and stats["loads"] == 3  # rest deferred
        assert cache.get(names[0]) is not None  # its request is admitted: room for one more
        stats = _settle(cache)
        assert sorted(cache.resident()) == names[1:4] and stats["loads"] == 4
        assert stats["evictions"] == 1  # p0 (claimed) went, not p1..p3 (still awaited)
        assert cache.wait(names[5], timeout=WAIT_S).adapter_id == names[5]  # the head's demand
        for name in names[1:5]:  # claims in order let the rest load, nothing is lost
            assert cache.wait(name, timeout=WAIT_S).adapter_id == name
        stats = _settle(cache)
        assert stats["load_errors"] == 0 and stats["bytes"] <= 3 * size
    finally:
        cache.close()


def test_a_failed_host_pool_layout_refuses_the_adapter(spec: ModelSpec, adapter_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU engine's loader rewrites B in place after the commit; if that fails (say its
    # scratch cannot be allocated) the entry must go, not stay resident half rewritten
    rec = recipe(rank=4)
    write_adapter(adapter_dir / "a", adapter_config(rec), adapter_tensors(rec, spec))
    source = AdapterSource(adapter_dir, spec, MAX_RANK, torch.float32, host_pool=True)

    def no_scratch(b: torch.Tensor) -> torch.Tensor:
        raise MemoryError(f"no scratch for {tuple(b.shape)}")

    monkeypatch.setattr(source, "_transposed_in_place", no_scratch)
    cache = HostCache(source, capacity_bytes=1 << 24, workers=1, pin_memory=False)
    try:
        cache.prefetch("a")
        deadline = time.monotonic() + WAIT_S
        while cache.error("a") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        error = cache.error("a")
        assert error is not None and error.code is ErrorCode.INTERNAL
        assert "'a': layout failed" in error.message and "no scratch" in error.message
        assert cache.get("a") is None and cache.resident() == []
        assert cache.stats()["bytes"] == 0 and cache.stats()["load_errors"] == 1
    finally:
        cache.close()


def test_a_load_waits_for_a_copy_fence_without_the_cache_lock(spec: ModelSpec,
                                                               adapter_dir: Path,
                                                               source: AdapterSource) -> None:
    """A load that needs the range of an evicted adapter whose host -> pool copy may still read
    it waits for the copy's fence, which on a GPU completes only after the model's step in
    flight. The engine loop asks the cache about every waiting request at every step: that
    wait must not hold the cache's lock, or the loop stalls and the GPU idles."""
    for i, name in enumerate(("a", "b")):
        rec = recipe(rank=8, seed=i)
        write_adapter(adapter_dir / name, adapter_config(rec), adapter_tensors(rec, spec))
    size = footprint(source.inspect("a").nbytes)
    cache = HostCache(source, capacity_bytes=size + size // 2, workers=1, pin_memory=False)
    fence = ManualFence()
    try:
        adapter = cache.wait("a", timeout=WAIT_S)
        adapter.fences[:] = [fence]  # as pool_copy.on_device records its copy's fence
        del adapter
        assert cache.evict("a")  # its range comes back once the fence completes
        cache.prefetch("b")  # only that range can hold it
        assert fence.waited_on.wait(WAIT_S)
        answered = threading.Event()
        asker = threading.Thread(target=lambda: (cache.loading("b"), answered.set()))
        asker.start()
        lock_free = answered.wait(2.0)  # the loop's question, while the loader waits
        fence.complete()
        asker.join()
        assert lock_free, "the cache's lock was held while waiting for a copy's fence"
        assert cache.wait("b", timeout=WAIT_S).adapter_id == "b"
        stats = cache.stats()
        assert stats["bytes"] == size and stats["reserved_bytes"] == 0
    finally:
        fence.complete()
        cache.close()
