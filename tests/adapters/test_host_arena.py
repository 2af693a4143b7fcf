"""HostArena: first-fit ranges of reused chunks, coalescing, the capacity bound (CPU, unpinned)."""

from __future__ import annotations

import threading

from slora_backend.adapters.host_arena import ALIGN, CHUNK_BYTES, HostArena, footprint

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
