"""Host memory of the host cache: chunks allocated once and reused, never one allocation per load.

A fresh allocation per adapter costs a page fault per 4 KiB on first touch (a 63-MB read into
fresh memory ran at 1.8 GB/s here, into reused memory at 6.3 GB/s) and, on CUDA, a
cudaHostAlloc. The arena hands out byte ranges of a few large chunks instead: a chunk is
allocated (pinned on CUDA) the first time a range does not fit the existing ones, and the
chunks together never exceed the capacity. Ranges are first fit within one chunk, so one
adapter is one contiguous range (one read, one host -> device copy).

On CUDA the chunks are pinned eagerly, by a background thread started with the arena (pinning
costs about as much as the loads themselves: a cudaHostAlloc touches and locks every page), so
loads find pinned memory ready; until it is done, a load that does not fit waits for the next
chunk rather than evicting anything. torch keeps freed pinned blocks for reuse, so a later
arena of the same process (a restarted engine) gets them back at once.

On the CPU the chunks are not pinned, so their pages are faulted in by the first load into
them: a page fault per 4 KiB, ~50 ms of a 78-MB load (~12 ms into touched memory), while the
engine loop steps on the same cores. So after each load the host cache faults in, off the next
load's path, the memory right after the load's range, as long as that range (`next_fresh`,
then `prefault`): first fit puts the next load there. The memory touched stays within what
loads will use, plus one adapter's size.

A freed range may still be the source of an asynchronous host -> device copy; it carries the
CUDA event recorded after that copy (a fence) and is reused only once the event completed.
The arena never waits for a fence: `allocate` answers None and `pending_fence` names the one
to wait for, which the host cache waits for with its lock released. Not thread-safe (but
`prefault`): the host cache calls it under its lock.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

CHUNK_BYTES = 1 << 30  # a power of two: torch's pinned allocator rounds sizes up to one
ALIGN = 64  # ranges start on a cache line: aligned for every dtype; adapter sizes are multiples
# madvise advice (Linux >= 5.14): fault pages in as if written, their contents unchanged
MADV_POPULATE_WRITE = 23
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass
class _Chunk:
    tensor: torch.Tensor  # uint8
    free: list[tuple[int, int]] = field(default_factory=list)  # (start, end), sorted, coalesced
    touched: int = 0  # the first bytes, faulted in by loads or `prefault` (the CPU)


def footprint(nbytes: int) -> int:
    """Arena bytes a range of nbytes takes (rounded up to ALIGN): what the host cache counts."""
    return -(-nbytes // ALIGN) * ALIGN


class HostArena:
    """Byte ranges of up to `capacity_bytes` of host memory (pinned when `pin`)."""

    def __init__(self, capacity_bytes: int, pin: bool, lock: threading.Condition,
                 thread_init: Callable[[], None] = lambda: None) -> None:
        """`lock`: the caller's, held around every call; the pinning thread takes it to add a
        chunk (and notifies it). `thread_init`: run first on that thread (the CUDA device)."""
        self.capacity_bytes = capacity_bytes
        self.pin = pin
        self._lock = lock
        self._chunks: dict[int, _Chunk] = {}  # by id: a range names its chunk's id
        self._next_chunk = 0
        self._fenced: list[tuple[int, int, int, object]] = []  # (chunk, start, end, event)
        self.growing = pin  # chunks still being pinned in the background
        self._stopped = False
        if pin:
            threading.Thread(target=self._pin_all, args=(thread_init,), daemon=True,
                             name="slora-host-arena-pin").start()

    @property
    def allocated_bytes(self) -> int:
        """Host memory held by the chunks (what the process really uses)."""
        return sum(c.tensor.numel() for c in self._chunks.values())

    def allocate(self, nbytes: int) -> tuple[int, int] | None:
        """(chunk index, start) of a free range of nbytes; None when none fits right now
        (then, if `pending_fence` names one, after that copy the range may be there)."""
        need = footprint(nbytes)
        self._reclaim()
        found = self._first_fit(need)
        if found is None and self._fenced:
            return None  # copies still read freed ranges: the caller waits for them first
        if found is None and not self.growing:
            found = self._grow(need)
        if found is None and not self.growing:  # chunks too small: drop the empty ones, regrow
            self._drop_empty_chunks()
            found = self._grow(need)
        return found

    def next_fresh(self, where: tuple[int, int], nbytes: int) -> torch.Tensor | None:
        """On the CPU, after a load of nbytes into `where`: the untouched memory right after
        it, up to nbytes (the next adapter likely has its size), now counted as touched; for
        `prefault`, outside the lock. None when pinned (touched at allocation) or none left."""
        chunk = self._chunks.get(where[0])
        if self.pin or chunk is None:
            return None
        end = where[1] + footprint(nbytes)
        start = max(end, chunk.touched)
        stop = min(end + footprint(nbytes), chunk.tensor.numel())
        chunk.touched = max(chunk.touched, end, stop)
        return chunk.tensor[start:stop] if stop > start else None

    def pending_fence(self) -> object | None:
        """The fence of a freed range that a host -> device copy may still read (the oldest),
        None if none. Wait for it without holding the caller's lock: on a GPU the copy ends
        only after the model's step in flight, and the engine loop takes that lock every step."""
        return self._fenced[0][3] if self._fenced else None

    def stop(self) -> None:
        """Stop pinning more chunks (the cache is closing)."""
        self._stopped = True

    def view(self, where: tuple[int, int], nbytes: int) -> torch.Tensor:
        """The uint8 tensor of an allocated range."""
        chunk, start = where
        return self._chunks[chunk].tensor[start:start + nbytes]

    def free(self, where: tuple[int, int], nbytes: int, fence: object | None = None) -> None:
        """Give a range back; with a CUDA event `fence`, only once that event has completed."""
        chunk, start = where
        if fence is not None:
            self._fenced.append((chunk, start, start + footprint(nbytes), fence))
        else:
            self._release(chunk, start, start + footprint(nbytes))

    # ---- internals --------------------------------------------------------------------------

    def _first_fit(self, need: int) -> tuple[int, int] | None:
        for index, chunk in self._chunks.items():
            for i, (start, end) in enumerate(chunk.free):
                if end - start >= need:
                    chunk.free[i:i + 1] = [(start + need, end)] if end - start > need else []
                    return index, start
        return None

    def _grow(self, need: int) -> tuple[int, int] | None:
        size = max(CHUNK_BYTES, need)
        size = min(size, self.capacity_bytes - self.allocated_bytes)
        if size < need:
            return None
        tensor = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return self._add_chunk(tensor, need), 0

    def _add_chunk(self, tensor: torch.Tensor, used: int) -> int:
        index = self._next_chunk
        self._next_chunk += 1
        size = tensor.numel()
        self._chunks[index] = _Chunk(tensor, [(used, size)] if size > used else [])
        return index

    def _pin_all(self, thread_init: Callable[[], None]) -> None:
        """The pinning thread: chunks up to the capacity, each made outside the lock."""
        try:
            thread_init()
            while not self._stopped:
                with self._lock:
                    size = min(CHUNK_BYTES, self.capacity_bytes - self.allocated_bytes)
                if size <= 0:
                    break
                tensor = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                with self._lock:
                    self._add_chunk(tensor, 0)
                    self._lock.notify_all()
        finally:  # also on an error: loads then grow the arena lazily instead
            with self._lock:
                self.growing = False
                self._lock.notify_all()

    def _drop_empty_chunks(self) -> None:
        for index in [i for i, c in self._chunks.items()
                      if c.free == [(0, c.tensor.numel())]]:
            del self._chunks[index]

    def _reclaim(self) -> None:
        """Release the freed ranges whose copies have completed."""
        keep = []
        for chunk, start, end, event in self._fenced:
            if event.query():
                self._release(chunk, start, end)
            else:
                keep.append((chunk, start, end, event))
        self._fenced = keep

    def _release(self, chunk: int, start: int, end: int) -> None:
        free = self._chunks[chunk].free
        free.append((start, end))
        free.sort()
        merged: list[tuple[int, int]] = []
        for s, e in free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        free[:] = merged


def prefault(memory: torch.Tensor) -> None:
    """Fault in the pages of `memory` (contiguous, on the CPU) without changing them, so that a
    later write costs no page faults. Safe while other threads read or write it; a no-op where
    the kernel lacks the advice (Linux < 5.14) and off Linux. Releases the GIL (ctypes)."""
    begin = -(-memory.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (memory.data_ptr() + memory.numel() * memory.element_size()) \
        // mmap.PAGESIZE * mmap.PAGESIZE
    if _LIBC is not None and end > begin:
        _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_POPULATE_WRITE)
