"""The host cache's room: its byte bound and the arena ranges its loads take.

Byte accounting: resident bytes + bytes reserved by loads in flight never exceed the capacity.
A load first reserves its size (the cache evicts, or the load waits for loads in flight), then
takes a range of the HostArena (host_arena.py) for it, so the bound holds even while loads run
in parallel. The range returns to the arena once its adapter is evicted and nothing refers to
it any more (`give_back`, from a weakref finalizer).

A range can be missing while the bytes fit: the arena's chunks are still being pinned; a freed
range that a host -> pool copy may still read (its fence is waited for with the lock released:
on a GPU the copy ends only after the model's step in flight, and the engine loop takes the
cache's lock for every waiting request at every step); a range that an evicted adapter still
holds (its pool copy keeps it until the copy's flip, at the engine's next step: waited for a
while, DETACHED_WAIT_S); or fragmentation (then the cache evicts more).

Not thread-safe on its own: the host cache's lock (`lock`) is held around every call but
`reserve` and `give_back`, which take it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from slora_backend.adapters.host_arena import HostArena, footprint
from slora_backend.errors import EngineError, ErrorCode

# how long a load waits for a range that an evicted adapter still holds (its pool copy reads
# it until the copy's flip, at the engine's next step) before the cache evicts an adapter that
# a queued request awaits
DETACHED_WAIT_S = 0.05


class HostRoom:
    """`capacity_bytes` of host memory (pinned when `pin`) for the host cache's adapters.
    `evict()`: the cache evicts one adapter (False when none is resident)."""

    def __init__(self, capacity_bytes: int, pin: bool, lock: threading.Condition,
                 evict: Callable[[], bool], thread_init: Callable[[], None]) -> None:
        self.capacity_bytes = capacity_bytes
        self.lock = lock
        self._evict = evict
        self.arena = HostArena(capacity_bytes, pin, lock, thread_init)
        self.bytes = 0  # of the resident adapters
        self.reserved = 0  # by loads in flight
        self._live_ranges = 0  # taken and not given back (in use or referenced)
        self._loading_ranges = 0  # of those, the ranges of loads not committed yet
        self._resident_ranges = 0  # of those, the ranges of resident adapters
        self.closed = False

    def reserve(self, nbytes: int) -> tuple[int, int]:
        """Room for a load of nbytes: its bytes reserved (evicting, or waiting for loads in
        flight) and an arena range for it. UNAVAILABLE once closed."""
        need = footprint(nbytes)
        with self.lock:
            while self.bytes + self.reserved + need > self.capacity_bytes:
                self._evict_or_wait()
            self.reserved += need
        try:
            return self._take_range(nbytes)
        except BaseException:
            with self.lock:
                self.reserved -= need
            raise

    def _take_range(self, nbytes: int) -> tuple[int, int]:
        patient_until = time.monotonic() + DETACHED_WAIT_S
        while True:
            with self.lock:
                where = self.arena.allocate(nbytes)
                if where is not None:
                    self._live_ranges += 1
                    self._loading_ranges += 1
                    return where
                fence = self.arena.pending_fence()
                if fence is None:  # enough bytes, but not pinned, held, or fragmented
                    if self.arena.growing and not self.closed:
                        self.lock.wait()  # the next pinned chunk
                    elif self._detached() and time.monotonic() < patient_until:
                        self.lock.wait(patient_until - time.monotonic())
                    else:
                        self._evict_or_wait()
                    continue
            fence.synchronize()

    def _detached(self) -> int:
        """Ranges of evicted adapters that something still refers to (a pool copy until its
        flip): they come back to the arena once nothing does."""
        return self._live_ranges - self._resident_ranges - self._loading_ranges

    def _evict_or_wait(self) -> None:
        if self._evict():
            return
        if self.closed:
            raise EngineError(ErrorCode.UNAVAILABLE, "host adapter cache is closed")
        self.lock.wait()  # a load commits, or an evicted adapter's range comes back

    def commit(self, nbytes: int) -> None:
        """A load of nbytes became a resident adapter: its reservation, its bytes."""
        self.reserved -= footprint(nbytes)
        self.bytes += footprint(nbytes)
        self._loading_ranges -= 1
        self._resident_ranges += 1

    def abandon(self, nbytes: int) -> None:
        """A load of nbytes failed after `reserve`: its reservation goes (then `give_back`)."""
        self.reserved -= footprint(nbytes)
        self._loading_ranges -= 1

    def drop(self, nbytes: int) -> None:
        """A resident adapter of nbytes left the cache (its range may still be referred to)."""
        self.bytes -= footprint(nbytes)
        self._resident_ranges -= 1

    def give_back(self, where: tuple[int, int], nbytes: int, fences: list) -> None:
        """A range is free again (its adapter is gone, or its load failed), once the last
        host -> device copy from it (`fences[-1]`) has completed."""
        with self.lock:
            self.arena.free(where, nbytes, fences[-1] if fences else None)
            self._live_ranges -= 1
            self.lock.notify_all()

    def close(self) -> None:
        """Loads waiting for room fail from now on; no more chunks are pinned."""
        self.closed = True
        self.arena.stop()
