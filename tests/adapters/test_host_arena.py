"""HostArena: first-fit ranges of reused chunks, coalescing, the capacity bound (CPU, unpinned)."""

from __future__ import annotations

import threading

import torch
from adapter_helpers import ManualFence, resident_pages

from slora_backend.adapters.host_arena import (
    ALIGN,
    CHUNK_BYTES,
    HostArena,
    footprint,
    prefault,
)

CAPACITY = 1 << 20  # one chunk of 1 MiB (chunks are min(CHUNK_BYTES, what is left))
PART = 300_000


def _arena() -> HostArena:
    return HostArena(CAPACITY, pin=False, lock=threading.Condition())


def test_ranges_are_disjoint_aligned_and_bounded() -> None:
    arena = _arena()
    got = [arena.allocate(PART) for _ in range(3)]
    assert all(g is not None for g in got)
    starts = sorted(start for _, start in got)
    assert all(s % ALIGN == 0 for s in starts)
    assert all(b - a >= footprint(PART) for a, b in zip(starts, starts[1:]))
    assert arena.allocate(PART) is None  # a fourth does not fit the capacity
    assert arena.allocated_bytes <= CAPACITY


def test_freed_ranges_are_reused_and_coalesced() -> None:
    arena = _arena()
    first, second, third = (arena.allocate(PART) for _ in range(3))
    arena.view(second, PART).fill_(7)
    arena.free(second, PART)
    assert arena.allocate(PART) == second  # the same memory again, no new chunk
    arena.free(first, PART)
    arena.free(second, PART)
    assert arena.allocate(2 * PART) == first  # two neighbours merged into one range
    assert arena.allocated_bytes == CAPACITY


def test_a_range_larger_than_the_chunks_regrows_when_all_is_free() -> None:
    # untouched chunks are only address space on the CPU: GiB sizes cost nothing here
    capacity = CHUNK_BYTES + CHUNK_BYTES // 2
    arena = HostArena(capacity, pin=False, lock=threading.Condition())
    small = arena.allocate(PART)  # makes a first chunk of CHUNK_BYTES
    big = CHUNK_BYTES + CHUNK_BYTES // 4
    assert arena.allocate(big) is None  # the first chunk is too small, the rest too: 0.5 GiB
    arena.free(small, PART)
    where = arena.allocate(big)  # all free: the small chunk is dropped, one big one made
    assert where is not None and arena.view(where, big).numel() == big
    assert arena.allocated_bytes <= capacity


def test_prefault_faults_pages_in_and_keeps_their_contents() -> None:
    memory = torch.empty(64 << 20, dtype=torch.uint8)  # a fresh mapping: no page touched yet
    half = memory.numel() // 2
    memory[:half].fill_(7)
    resident, pages = resident_pages(memory[half:])
    assert resident < pages // 2
    prefault(memory)
    resident, pages = resident_pages(memory[half:])
    assert resident == pages
    assert bool((memory[:half] == 7).all())


def test_next_fresh_is_the_untouched_memory_after_a_load_once() -> None:
    arena = _arena()
    first = arena.allocate(PART)
    fresh = arena.next_fresh(first, PART)
    assert fresh is not None and fresh.numel() == footprint(PART)
    assert fresh.data_ptr() == arena.view(first, PART).data_ptr() + footprint(PART)
    assert arena.next_fresh(first, PART) is None  # counted as touched: not twice
    second = arena.allocate(PART)  # first fit: the next load takes that memory
    assert arena.view(second, PART).data_ptr() == fresh.data_ptr()
    third = arena.allocate(PART)
    tail = arena.next_fresh(third, PART)  # clipped to the chunk
    assert tail is not None and tail.numel() == CAPACITY - 3 * footprint(PART)
    assert HostArena(CAPACITY, pin=False, lock=threading.Condition()).next_fresh((0, 0), 1) \
        is None  # no chunk yet


def test_a_fenced_range_is_reused_only_after_its_copy_without_waiting() -> None:
    arena = _arena()
    first, _, _ = (arena.allocate(PART) for _ in range(3))
    fence = ManualFence(timeout=0.0)  # a wait for it fails at once
    arena.free(first, PART, fence)
    assert arena.allocate(PART) is None  # the copy may still read it: no waiting, no range
    assert arena.pending_fence() is fence  # what the caller waits for, its lock released
    fence.complete()
    assert arena.allocate(PART) == first
    assert arena.pending_fence() is None
    assert not fence.waited_on.is_set()  # the arena never waited for it
