"""PagePool accounting properties (hypothesis) and PoolStorage layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_backend.errors import PoolExhaustedError
from slora_backend.memory_pool import PagePool, PoolStorage, pages_for_bytes

NUM_PAGES = 24

# an op: ("alloc", n, kind) or ("free", index into the live allocations, unused)
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, NUM_PAGES + 4), st.sampled_from(["kv", "lora"])),
        st.tuples(st.just("free"), st.integers(0, 1000), st.just("")),
        st.tuples(st.just("double_free"), st.integers(0, 1000), st.just("")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops_strategy)
def test_random_allocate_free_never_loses_or_shares_pages(ops: list[tuple[str, int, str]]) -> None:
    pool = PagePool(NUM_PAGES)
    live: list[tuple[list[int], str]] = []
    freed: list[list[int]] = []
    for op, n, kind in ops:
        if op == "alloc":
            before = (pool.num_free, pool.used_by("kv"), pool.used_by("lora"))
            if n > pool.num_free:
                assert not pool.can_allocate(n)
                with pytest.raises(PoolExhaustedError):
                    pool.allocate(n, kind)
                assert (pool.num_free, pool.used_by("kv"), pool.used_by("lora")) == before
            else:
                assert pool.can_allocate(n)
                pages = pool.allocate(n, kind)
                assert len(pages) == len(set(pages)) == n
                live.append((pages, kind))
        elif op == "free" and live:
            pages, _ = live.pop(n % len(live))
            pool.free(pages)
            freed.append(pages)
        elif op == "double_free" and freed:
            pages = freed[n % len(freed)]
            if not any(set(pages) & set(p) for p, _ in live):  # still free: must be refused
                before = pool.num_free
                with pytest.raises(ValueError):
                    pool.free(pages if pages else [NUM_PAGES + 1])
                assert pool.num_free == before
        all_live = [p for pages, _ in live for p in pages]
        assert len(all_live) == len(set(all_live)), "a page is shared by two allocations"
        assert pool.num_used == len(all_live)
        assert pool.num_free + pool.num_used == NUM_PAGES
        for kind_name in ("kv", "lora"):
            exact = sum(len(p) for p, k in live if k == kind_name)
            assert pool.used_by(kind_name) == exact
        assert all(pool.kind_of(p) is not None for p in all_live)


def test_free_refuses_unallocated_and_changes_nothing() -> None:
    pool = PagePool(4)
    pages = pool.allocate(2, "kv")
    with pytest.raises(ValueError):
        pool.free([pages[0], 3])  # 3 was never allocated
    assert pool.num_free == 2  # pages[0] was not freed either
    with pytest.raises(ValueError):
        pool.free([pages[0], pages[0]])
    pool.free(pages)
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free(pages)


def test_bad_kind_and_count_are_refused() -> None:
    pool = PagePool(4)
    with pytest.raises(ValueError, match="kind"):
        pool.allocate(1, "weights")
    with pytest.raises(ValueError):
        pool.allocate(-1, "kv")
    with pytest.raises(ValueError):
        PagePool(0)


def test_storage_kv_view_and_flat_address_the_same_memory() -> None:
    storage = PoolStorage(num_layers=2, num_pages=3, block_size=4, num_kv_heads=2, head_dim=8,
                          dtype=torch.float32, device="cpu")
    assert storage.tensor.shape == (2, 3, 2 * 4 * 2 * 8)
    kv = storage.kv_view(1)
    kv[2, 1, 3, 1, 5] = 7.0  # page 2, V, token offset 3, head 1, dim 5
    offset = 2 * storage.page_elems + ((1 * 4 + 3) * 2 + 1) * 8 + 5
    assert storage.flat(1)[offset] == 7.0
    assert storage.flat(0).abs().sum() == 0


def test_pages_for_bytes() -> None:
    # 2 layers * 64 elems * 4 bytes = 512 bytes per page
    assert pages_for_bytes(512 * 10 + 100, 2, 64, torch.float32) == 10
