"""Host-RAM tier: an LRU of HostAdapters bounded in bytes, filled by background loads.

A load first validates the adapter, then takes room for it (host_room.py: its bytes reserved
within the capacity, evicting LRU entries or waiting for other loads, and a range of the
reused HostArena), then reads it. A range returns to the arena when its HostAdapter is evicted
and no longer referenced.

Values are not checked here: the pool tier checks them after its copy (on the GPU) and
`reject`s an adapter with a NaN/Inf, whose error is then kept like a failed load's.

Prefetch (S-LoRA's): `prefetch` is called for every queued request, in arrival order. Loads
run in that order, and the adapters prefetched but not yet claimed by a `get` (the admission of
their request), plus the prefetches loading, are kept within the capacity: further prefetches
wait in order (deferred) until claims make room, so loading ahead never evicts an adapter that
a request still queued is waiting for (eviction takes claimed adapters first). The pool tier's
admission `get`s only the queue head's adapter with `load` (a deferred one loads at once: the
head never waits for the lookahead), and claims an adapter once its pool copy started.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from slora_backend.adapters.host_arena import footprint, prefault
from slora_backend.adapters.host_room import HostRoom
from slora_backend.adapters.prefetch import PrefetchWindow
from slora_backend.adapters.source import AdapterSource, Fingerprint, HostAdapter
from slora_backend.adapters.validation import refuse
from slora_backend.device import use_device
from slora_backend.errors import EngineError, ErrorCode

LATENCY_WINDOW = 1024  # recent load latencies kept for the max / mean in stats()


@dataclass
class _Failure:
    error: EngineError
    fingerprint: Fingerprint | None  # the files when it failed: a rewrite clears the failure


class HostCache:
    """LRU (by bytes) of adapters in host memory, loaded by `workers` background threads.

    `prefetch` returns at once; `get` returns the adapter or None while it is not ready (and
    starts a load if none is running); `error` reports a failed load. Thread-safe.
    """

    def __init__(self, source: AdapterSource, capacity_bytes: int, workers: int = 1,
                 pin_memory: bool | None = None, device: torch.device | str = "cpu") -> None:
        """`device`: the engine's; its loader threads pin host memory in that GPU's context."""
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) \
                or capacity_bytes < 1:
            raise EngineError.invalid("host_cache_bytes", f"must be an integer >= 1, "
                                                          f"got {capacity_bytes!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise EngineError.invalid("host_cache_workers", f"must be an integer >= 1, "
                                                            f"got {workers!r}")
        self.source = source
        self.capacity_bytes = capacity_bytes
        # pinned host memory makes host -> GPU copies async and ~2x faster; useless on CPU
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._entries: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU first
        self._inflight: set[str] = set()
        self._failures: dict[str, _Failure] = {}
        self._counters = {"hits": 0, "misses": 0, "loads": 0, "load_errors": 0, "evictions": 0}
        self._latency_total = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._cond = threading.Condition()  # an RLock: a range may come back while it is held
        self._room = HostRoom(capacity_bytes, self.pin_memory, self._cond, self._evict_one,
                              thread_init=lambda: use_device(device))
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix="slora-host-cache",
                                            initializer=use_device, initargs=(device,))
        # they share a large file's read with a loader: an adapter loaded alone (a cold
        # request while nothing else loads) is read by all of them
        self._readers = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="slora-host-read")
        self._closed = False
        self._window = PrefetchWindow(capacity_bytes)  # S-LoRA's lookahead (prefetch.py)

    # ---- public API -------------------------------------------------------------------------

    def prefetch(self, adapter_id: str) -> None:
        """Start loading the adapter in the background (no-op when resident or loading).
        Clears an earlier failure so that a fixed adapter is retried."""
        with self._cond:
            if self._window.is_deferred(adapter_id):
                return  # waits for room already (asked again at every step while it waits)
        try:
            size = footprint(self.source.inspect(adapter_id).nbytes)
        except EngineError:
            size = 0  # _lookup records the refusal
        with self._cond:
            self._failures.pop(adapter_id, None)
            idle = adapter_id not in self._entries and adapter_id not in self._inflight
            if idle and size and not self._window.offer(adapter_id, size):
                return  # waits for room, in arrival order
            if not idle and self._window.is_deferred(adapter_id):
                return
        self._lookup(adapter_id, count_hit=False)
        with self._cond:  # no load started after all (resident meanwhile, or refused)
            if adapter_id not in self._inflight:
                self._window.cancel(adapter_id)

    def get(self, adapter_id: str, load: bool = True, claim: bool = True
            ) -> HostAdapter | None:
        """The adapter if resident and still current on disk; else None (a load is started
        unless one runs or it failed: see `error`). `load=False` (a request behind the head of
        the queue): only a resident adapter, no stat otherwise, no load started (demanding
        every waiting request's adapter would bypass the lookahead's bound and thrash).
        `claim=False`: its prefetch stays unclaimed (kept before others) until `claim`: the pool
        tier claims it once its copy started, not when the pool had no room for it yet."""
        with self._cond:
            if not load and adapter_id not in self._entries:
                return None
            if load:  # before the load starts: it commits as unclaimed
                self._window.demand(adapter_id)  # wanted now: no more waiting for room
        adapter = self._lookup(adapter_id, count_hit=True, load=load)
        if adapter is not None and claim:
            self.claim(adapter_id)  # only once taken: the loads it lets start may evict it
        return adapter

    def claim(self, adapter_id: str) -> None:
        """The adapter's request took it (see `get`): evictable first from now on, and its
        room in the lookahead goes to the next prefetch."""
        with self._cond:
            if self._window.release(adapter_id):
                self._drain()

    def loading(self, adapter_id: str) -> bool:
        """A load of the adapter is running or queued. No disk access: admission asks this of
        every waiting request at every step."""
        with self._cond:
            return adapter_id in self._inflight

    def wait_for_loads(self, timeout: float) -> None:
        """Sleep, the GIL released, until a load ends (or the cache changes otherwise), at most
        `timeout` seconds; at once if none is running. For an engine whose waiting requests
        need adapters still loading, and nothing else to run."""
        with self._cond:
            if self._inflight:
                self._cond.wait(timeout)

    def error(self, adapter_id: str) -> EngineError | None:
        """Why the last load of this adapter failed (None if it did not)."""
        with self._cond:
            failure = self._failures.get(adapter_id)
            return failure.error if failure else None

    def wait(self, adapter_id: str, timeout: float | None = None) -> HostAdapter:
        """Block until the adapter is loaded; raises its load error (or UNAVAILABLE on timeout).
        For tools and tests; the engine polls `get` instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.prefetch(adapter_id)
        while True:
            adapter = self.get(adapter_id)
            if adapter is not None:
                return adapter
            with self._cond:
                failure = self._failures.get(adapter_id)
                if failure is not None:
                    raise failure.error
                if self._closed:
                    raise EngineError(ErrorCode.UNAVAILABLE, "host adapter cache is closed")
                if adapter_id in self._inflight:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise EngineError(ErrorCode.UNAVAILABLE,
                                          f"adapter '{adapter_id}' not loaded after {timeout}s")
                    self._cond.wait(remaining)

    def is_current(self, adapter: HostAdapter) -> bool:
        """True while the adapter's files are unchanged on disk since it was loaded."""
        return self.disk_fingerprint(adapter.adapter_id) == adapter.fingerprint

    def disk_fingerprint(self, adapter_id: str) -> Fingerprint | None:
        """The adapter's files' fingerprint now (None when they cannot be read). A stat only:
        starts no load, so the pool tier can check a resident copy cheaply."""
        fingerprint, problem = self._current(adapter_id)
        return None if problem is not None else fingerprint

    def resident(self) -> list[str]:
        """Resident adapter ids, least recently used first."""
        with self._cond:
            return list(self._entries)

    def evict(self, adapter_id: str) -> bool:
        """Drop an adapter from host memory; True if it was resident."""
        with self._cond:
            return self._drop(adapter_id, count=True)

    def reject(self, adapter_id: str, error: EngineError,
               fingerprint: Fingerprint | None) -> None:
        """The pool tier refused the adapter's values (its finite check runs on the device):
        drop the host copy and answer `error` for the adapter until its files change (or a
        prefetch retries it)."""
        with self._cond:
            self._drop(adapter_id, count=False)
            self._failures[adapter_id] = _Failure(error, fingerprint)
            self._counters["load_errors"] += 1
            self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        """Counters for metrics: hits (get found it resident), misses (a load was started),
        loads, load_errors, evictions, bytes, load latency."""
        with self._cond:
            window = list(self._latencies)
            return {
                **self._counters,
                "bytes": self._room.bytes,
                "reserved_bytes": self._room.reserved,
                "capacity_bytes": self.capacity_bytes,
                "host_resident": len(self._entries),
                "host_inflight": len(self._inflight),
                "load_latency_total_s": self._latency_total,
                "load_latency_avg_s": sum(window) / len(window) if window else 0.0,
                "load_latency_max_s": max(window, default=0.0),
            }

    def wait_pinned(self) -> None:
        """Block until the arena's pinned memory is all allocated (benchmarks start their clock
        after it, as a server serves after its start-up)."""
        with self._cond:
            while self._room.arena.growing:
                self._cond.wait()

    def close(self) -> None:
        """Stop the workers (queued loads are cancelled, a running one finishes)."""
        with self._cond:
            self._closed = True
            self._room.close()
            self._cond.notify_all()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True)

    # ---- internals --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Start the deferred prefetches that fit now, in order (under the lock)."""
        if self._closed:
            return
        for adapter_id in self._window.startable():
            if adapter_id in self._entries or adapter_id in self._inflight:
                self._window.cancel(adapter_id)
            else:
                self._submit(adapter_id)

    def _submit(self, adapter_id: str) -> None:
        self._failures.pop(adapter_id, None)
        self._inflight.add(adapter_id)
        self._counters["misses"] += 1
        self._executor.submit(self._load, adapter_id)

    def _current(self, adapter_id: str) -> tuple[Fingerprint | None, EngineError | None]:
        try:
            return self.source.fingerprint(adapter_id), None
        except EngineError as exc:
            return None, exc

    def _lookup(self, adapter_id: str, count_hit: bool, load: bool = True
                ) -> HostAdapter | None:
        # the stat runs outside the lock: it is the only disk access on this path
        fingerprint, problem = self._current(adapter_id)
        with self._cond:
            entry = self._entries.get(adapter_id)
            if entry is not None and problem is None and entry.fingerprint == fingerprint:
                self._entries.move_to_end(adapter_id)
                self._counters["hits"] += count_hit
                return entry
            self._drop(adapter_id, count=False)  # removed or rewritten on disk: stale
            failure = self._failures.get(adapter_id)
            if failure is not None and failure.fingerprint == fingerprint:
                return None
            if problem is not None:
                self._failures[adapter_id] = _Failure(problem, None)
                self._cond.notify_all()
                return None
            if load and adapter_id not in self._inflight and not self._closed:
                self._submit(adapter_id)
            return None

    def _drop(self, adapter_id: str, count: bool) -> bool:
        entry = self._entries.pop(adapter_id, None)
        if entry is None:
            return False
        self._room.drop(entry.nbytes)
        if self._window.release(adapter_id):  # evicted before its request came: room
            self._drain()
        if count:
            self._counters["evictions"] += 1
        self._cond.notify_all()
        return True

    def _evict_one(self) -> bool:
        """Evict for room (HostRoom): LRU first, but adapters that queued requests await last
        (if all are awaited, the oldest waits again, first in line). False: none resident."""
        if not self._entries:
            return False
        victim = next((a for a in self._entries if not self._window.is_unclaimed(a)), None)
        if victim is None:
            victim = next(iter(self._entries))
            self._window.requeue(victim)
        return self._drop(victim, count=True)

    def _load(self, adapter_id: str) -> None:
        start = time.perf_counter()
        # a failure is remembered with the files' state (what inspect saw, or a stat if inspect
        # itself failed): only a rewrite of the files makes get() try again
        fingerprint = None
        try:
            info = self.source.inspect(adapter_id)  # validates before anything is allocated
            fingerprint = info.fingerprint
            if footprint(info.nbytes) > self.capacity_bytes:
                raise refuse(adapter_id, f"needs {info.nbytes} bytes of host memory, more than "
                                         f"the whole host cache ({self.capacity_bytes} bytes, "
                                         "host_cache_bytes)")
            where = self._room.reserve(info.nbytes)
            try:
                adapter = self.source.load(adapter_id, self._room.arena.view(where, info.nbytes),
                                           info, self._readers)
            except BaseException:
                with self._cond:
                    self._room.abandon(info.nbytes)
                self._room.give_back(where, info.nbytes, [])
                raise
            # the range comes back once nothing refers to the adapter any more
            weakref.finalize(adapter, self._room.give_back, where, info.nbytes,
                             adapter.fences).atexit = False
            self._commit(adapter, info.nbytes, time.perf_counter() - start)
        except EngineError as exc:
            self._fail(adapter_id, exc, fingerprint or self._current(adapter_id)[0])
            return
        except Exception as exc:  # noqa: BLE001 (a worker must never die silently)
            self._fail(adapter_id, _internal(adapter_id, "load", exc),
                       fingerprint or self._current(adapter_id)[0])
            return
        if self.source.host_pool:
            self._lay_out(adapter)
        self._prefault_next(where, info.nbytes)

    def _lay_out(self, adapter: HostAdapter) -> None:
        """A host pool's layout of a committed adapter, off the loop. A failure refuses the
        resident entry: it must not stay half rewritten."""
        try:
            self.source.prepare_for_host_pool(adapter)
        except Exception as exc:  # noqa: BLE001 (a worker must never die silently)
            self.reject(adapter.adapter_id, _internal(adapter.adapter_id, "layout", exc),
                        adapter.fingerprint)

    def _prefault_next(self, where: tuple[int, int], nbytes: int) -> None:
        """CPU: fault in the arena memory the next load likely takes (host_arena.py), after
        this one is committed: its page faults are then off the next load's path."""
        with self._cond:
            fresh = self._room.arena.next_fresh(where, nbytes)
        if fresh is not None:
            prefault(fresh)

    def _commit(self, adapter: HostAdapter, reserved: int, seconds: float) -> None:
        """Turn the reservation into a resident entry, atomically (the bound never breaks).
        The sizes match: AdapterSource.load refuses an adapter whose size changed."""
        with self._cond:
            self._room.commit(reserved)
            self._entries[adapter.adapter_id] = adapter
            self._counters["loads"] += 1
            self._latency_total += seconds
            self._latencies.append(seconds)
            self._inflight.discard(adapter.adapter_id)
            self._failures.pop(adapter.adapter_id, None)  # e.g. a NOT_FOUND seen mid-load
            self._window.loaded(adapter.adapter_id, footprint(adapter.nbytes))
            self._cond.notify_all()

    def _fail(self, adapter_id: str, error: EngineError, fingerprint: Fingerprint | None) -> None:
        with self._cond:
            self._failures[adapter_id] = _Failure(error, fingerprint)
            self._counters["load_errors"] += 1
            self._inflight.discard(adapter_id)
            if self._window.release(adapter_id):
                self._drain()
            self._cond.notify_all()


def _internal(adapter_id: str, what: str, exc: Exception) -> EngineError:
    return EngineError(ErrorCode.INTERNAL, f"adapter '{adapter_id}': {what} failed: {exc!r}")
