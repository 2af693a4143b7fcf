"""The pool tier of the adapter hierarchy (disk -> host RAM -> pool; slora_backend/adapters).

An adapter is resident when its A rows and B^T rows (all layers) sit in pages of the SAME
PagePool the KV cache uses (kind "lora") and a slot of the slot tables points at them.
Making one resident is asynchronous: `acquire` takes pages and a slot and starts the host ->
pool copy (pool_copy.py: a side stream on a GPU); the adapter is *loading* until the copy has
completed, then the loop flips it to ready (`poll`, or the next `acquire`): the slot tables are
written and requests may use it. Running requests hold a reference; idle ready adapters
(refcount 0) stay resident and are evicted LRU when pages or slots are needed (those the next
queued requests await last); a loading one is never evicted (its copy still writes its pages).
The engine reaches the lower tiers only through here. The copier decides where the rows go:
this device's pool, or, at tensor parallelism, every rank's share into every rank's pool
(parallel/adapters.py ShardedCopier).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from slora_backend.adapters.pool_copy import PoolCopier, PoolCopy
from slora_backend.adapters.validation import refuse
from slora_backend.adapters.values import non_finite_error
from slora_backend.errors import EngineError
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.lora import LoraTables, RowPlan
from slora_backend.model.spec import ModelSpec

if TYPE_CHECKING:
    from slora_backend.adapters.host_cache import HostCache
    from slora_backend.adapters.source import HostAdapter

LORA_KIND = "lora"


class Wait(Enum):
    """Why `acquire` returned no slot."""

    LOADING = "loading"  # host copy not loaded yet, or the pool copy in flight: others go first
    NO_ROOM = "no_room"  # no free slot, or too few pages even after evicting idle adapters


@dataclass
class _Resident:
    slot: int
    pages: list[int]
    refcount: int
    # of the host copy it was written from; not the copy itself, whose host memory the host
    # cache reuses once it is evicted there
    fingerprint: Any
    copy: PoolCopy | None = None  # in flight: the slot tables are written when it completes


class AdapterManager:
    def __init__(self, spec: ModelSpec, storage: PoolStorage, pool: PagePool, host: HostCache,
                 max_slots: int, max_rank: int, copier: PoolCopier | None = None) -> None:
        self.spec = spec
        self.storage = storage
        self.pool = pool
        self.host = host
        self.max_rank = max_rank
        self.copier = copier if copier is not None else PoolCopier(storage.tensor, spec, max_slots)
        self.tables = LoraTables.create(max_slots, self.copier.table_rank(max_rank),
                                        storage.tensor.device)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._loading: dict[str, _Resident] = {}  # copies in flight
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._plans: dict[tuple[tuple[str, ...], int], RowPlan] = {}
        # the adapters the next queued requests need (the scheduler's, asked only when
        # evicting): idle ones are evicted after the others
        self.awaited: Callable[[], Collection[str]] = frozenset
        self.num_loads = 0
        self.num_evictions = 0

    # ---- lower tiers ---------------------------------------------------------------------
    def pages_for(self, adapter_id: str) -> int:
        """Validate an adapter on disk (EngineError INVALID_ARG / NOT_FOUND, no weight read);
        the pool pages it occupies when resident."""
        settings = self.host.source.inspect(adapter_id).settings
        return self._plan(adapter_id, settings.modules, settings.rank).num_pages

    def prefetch(self, adapter_id: str) -> None:
        """Start the disk -> host load of an adapter that is not resident."""
        if adapter_id not in self._resident:
            self.host.prefetch(adapter_id)

    def _host_copy(self, adapter_id: str, load: bool) -> HostAdapter | None:
        if self.host.loading(adapter_id):  # the common case while requests wait: no stat
            return None
        host = self.host.get(adapter_id, load=load, claim=False)
        if host is None:
            err = self.host.error(adapter_id)
            if err is not None:
                raise err
            # no-op while loading or deferred; else loads an evicted copy (behind the head:
            # within the lookahead's bound, in the order of the queue)
            self.host.prefetch(adapter_id)
        return host

    # ---- the pool ---------------------------------------------------------------------------
    def acquire(self, adapter_id: str, reserve_pages: int = 0, load: bool = True) -> int | Wait:
        """Take a reference and return the adapter's slot once it is ready in the pool.

        Wait.LOADING while its host copy or its pool copy is not done (this call starts the
        pool copy when the host copy is there, and with `load` the host load if none runs:
        the head of the queue; the requests behind it wait for the host cache's prefetch, in
        arrival order); Wait.NO_ROOM when no slot is free, or fewer than (its pages +
        `reserve_pages`) pages can be freed by evicting idle adapters.
        Raises the EngineError of an adapter that failed to load or was refused."""
        res = self._resident.get(adapter_id)
        if res is not None and res.copy is not None and not self._complete(adapter_id, res):
            return Wait.LOADING
        if res is not None and res.refcount == 0 and self._rewritten(adapter_id, res):
            self._drop(adapter_id)
            res = None
        if res is not None:
            if not self._free_pages_for(reserve_pages, keep=adapter_id):
                return Wait.NO_ROOM
            return self._take(adapter_id, res)
        host = self._host_copy(adapter_id, load)
        if host is None:
            return Wait.LOADING
        return self._load(adapter_id, host, reserve_pages)

    def poll(self) -> None:
        """Flip every adapter whose copy has completed (once per step, by the scheduler), so
        that one whose requests were cancelled meanwhile becomes evictable too. A refusal is
        remembered by the host tier and raised to the adapter's requests at their acquire."""
        for adapter_id, res in list(self._loading.items()):
            try:
                self._complete(adapter_id, res)
            except EngineError:
                pass

    def _rewritten(self, adapter_id: str, res: _Resident) -> bool:
        """The files changed on disk since the resident copy was written. A stat, never a load:
        reloading the host copy of every resident adapter it admits would evict host entries
        that queued requests await (and race them)."""
        now = self.host.disk_fingerprint(adapter_id)
        return now is not None and now != res.fingerprint

    def _load(self, adapter_id: str, host: HostAdapter, reserve_pages: int) -> int | Wait:
        plan = self._plan(adapter_id, host.modules, host.rank)
        if not self._free_slots and not self._evict_lru_idle():
            return Wait.NO_ROOM
        if not self._free_pages_for(plan.num_pages + reserve_pages, keep=None):
            return Wait.NO_ROOM
        pages = self.pool.allocate(plan.num_pages, LORA_KIND)
        try:
            copy = self.copier.start(host, pages, plan, self._free_slots[-1])
        except (ValueError, KeyError) as err:
            self.pool.free(pages)
            raise refuse(adapter_id, f"does not fit the model: {err}") from err
        self.host.claim(adapter_id)  # copied from now on: its host copy may go first
        res = _Resident(self._free_slots.pop(), pages, 0, host.fingerprint, copy)
        self._resident[adapter_id] = res
        self._loading[adapter_id] = res
        self.num_loads += 1
        if not self._complete(adapter_id, res):
            return Wait.LOADING
        return self._take(adapter_id, res)

    def _complete(self, adapter_id: str, res: _Resident) -> bool:
        """Flip a loading adapter to ready once its copy has completed (False while in
        flight): its slot tables are written. A copy with a NaN/Inf is refused: its pages are
        zeroed and freed, and the INVALID_ARG naming the tensor is raised (and kept)."""
        copy = res.copy
        assert copy is not None
        if not copy.done():
            return False
        res.copy = None
        del self._loading[adapter_id]
        if copy.finite():
            self.tables.set_slot(res.slot, self.copier.table_rank(copy.host.rank),
                                 copy.host.scale, copy.pointers)
            return True
        self.copier.scrub(res.pages)
        self._drop(adapter_id, count=False)
        err = non_finite_error(adapter_id, copy.host.factors)
        self.host.reject(adapter_id, err, copy.host.fingerprint)
        raise err

    def _take(self, adapter_id: str, res: _Resident) -> int:
        res.refcount += 1
        self._resident.move_to_end(adapter_id)
        return res.slot

    def _plan(self, adapter_id: str, modules: tuple[str, ...], rank: int) -> RowPlan:
        key = (tuple(modules), int(rank))
        if key not in self._plans:
            try:
                self._plans[key] = self.copier.plan(modules, rank)
            except ValueError as err:  # a row longer than a pool page
                raise refuse(adapter_id, f"does not fit the model: {err}") from err
        return self._plans[key]

    def release(self, adapter_id: str) -> None:
        res = self._resident.get(adapter_id)
        if res is None or res.refcount <= 0:
            raise ValueError(f"adapter {adapter_id!r} released without a reference")
        res.refcount -= 1
        self._resident.move_to_end(adapter_id)  # LRU by last use

    def _free_pages_for(self, pages: int, keep: str | None) -> bool:
        if pages > self.pool.num_free:
            self.evict_idle(pages - self.pool.num_free, keep=keep)
        return pages <= self.pool.num_free

    def _idle(self) -> Iterator[str]:
        """Evictable adapters (ready and unreferenced): least recently used first, those the
        next queued requests await last (evicted now, they would be loaded again soon)."""
        def idle() -> Iterator[str]:
            return (a for a, r in self._resident.items() if r.refcount == 0 and r.copy is None)

        awaited = self.awaited()
        yield from (a for a in idle() if a not in awaited)
        yield from (a for a in idle() if a in awaited)

    def evict_idle(self, pages_needed: int, keep: str | None = None) -> int:
        """Evict idle adapters, least recently used first, until `pages_needed` pages were
        freed or none is left; returns the number of pages freed."""
        freed = 0
        for adapter_id in list(self._idle()):
            if freed >= pages_needed:
                break
            if adapter_id != keep:
                freed += self._drop(adapter_id)
        return freed

    def _evict_lru_idle(self) -> bool:
        victim = next(self._idle(), None)
        if victim is not None:
            self._drop(victim)
        return victim is not None

    def _drop(self, adapter_id: str, count: bool = True) -> int:
        """Free an adapter's pages and slot (an eviction when `count`)."""
        res = self._resident.pop(adapter_id)
        self.pool.free(res.pages)
        self.tables.clear_slot(res.slot)
        self._free_slots.append(res.slot)
        self.num_evictions += count
        return len(res.pages)

    # ---- introspection -----------------------------------------------------------------------
    def resident(self) -> list[str]:
        """Adapters holding pool pages (ready or loading), least recently used first."""
        return list(self._resident)

    def stats(self) -> dict[str, Any]:
        """Host cache counters plus the pool's (prefixed 'pool_')."""
        return {**self.host.stats(), "pool_resident": len(self._resident),
                "pool_loading": len(self._loading), "pool_loads": self.num_loads,
                "pool_evictions": self.num_evictions}
