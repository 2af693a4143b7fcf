"""The pool tier of the adapter hierarchy (disk -> host RAM -> pool; slora_backend/adapters).

An adapter is resident when its A rows and B^T rows (all layers) sit in pages of the SAME
PagePool the KV cache uses (kind "lora") and a slot of the slot tables points at them.
Running requests hold a reference; idle adapters (refcount 0) stay resident and are evicted
LRU when pages or slots are needed. The engine reaches the lower tiers only through here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.lora import LoraTables, RowPlan, plan_adapter_rows, write_adapter_rows
from slora_backend.model.spec import ModelSpec

if TYPE_CHECKING:
    from slora_backend.adapters.host_cache import HostCache
    from slora_backend.adapters.source import HostAdapter

LORA_KIND = "lora"


@dataclass
class _Resident:
    slot: int
    pages: list[int]
    refcount: int
    # of the host copy it was written from; not the copy itself, whose host memory the host
    # cache reuses once it is evicted there
    fingerprint: Any


class AdapterManager:
    def __init__(self, spec: ModelSpec, storage: PoolStorage, pool: PagePool, host: HostCache,
                 max_slots: int, max_rank: int) -> None:
        self.spec = spec
        self.storage = storage
        self.pool = pool
        self.host = host
        self.max_rank = max_rank
        self.tables = LoraTables.create(max_slots, max_rank, storage.tensor.device)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._plans: dict[tuple[tuple[str, ...], int], RowPlan] = {}
        self.num_loads = 0
        self.num_evictions = 0

    # ---- lower tiers ---------------------------------------------------------------------
    def pages_for(self, adapter_id: str) -> int:
        """Validate an adapter on disk (EngineError INVALID_ARG / NOT_FOUND, no weight read);
        the pool pages it occupies when resident."""
        settings = self.host.source.inspect(adapter_id).settings
        return self._plan(settings.modules, settings.rank).num_pages

    def prefetch(self, adapter_id: str) -> None:
        """Start the disk -> host load of an adapter that is not resident."""
        if adapter_id not in self._resident:
            self.host.prefetch(adapter_id)

    def ready(self, adapter_id: str) -> bool:
        """Resident, or its host copy is loaded. Raises the EngineError of a failed load."""
        if adapter_id in self._resident:
            return True
        return self._host_copy(adapter_id) is not None

    def _host_copy(self, adapter_id: str) -> HostAdapter | None:
        host = self.host.get(adapter_id)
        if host is None:
            err = self.host.error(adapter_id)
            if err is not None:
                raise err
            self.host.prefetch(adapter_id)  # no-op while loading; reloads an evicted copy
        return host

    # ---- the pool ---------------------------------------------------------------------------
    def acquire(self, adapter_id: str, reserve_pages: int = 0) -> int | None:
        """Take a reference and return the adapter's slot, making it resident if needed.

        None when it cannot happen now: host copy not loaded yet, no free slot, or fewer than
        (its pages + `reserve_pages`) pages can be freed by evicting idle adapters."""
        res = self._resident.get(adapter_id)
        if res is not None and res.refcount == 0 and self._rewritten(adapter_id, res):
            self._evict(adapter_id)
            res = None
        if res is not None:
            if not self._free_pages_for(reserve_pages, keep=adapter_id):
                return None
            return self._take(adapter_id, res)
        host = self._host_copy(adapter_id)
        if host is None:
            return None
        return self._load(adapter_id, host, reserve_pages)

    def _rewritten(self, adapter_id: str, res: _Resident) -> bool:
        """The files changed on disk since the resident copy was written. A stat, never a load:
        reloading the host copy of every resident adapter it admits would evict host entries
        that queued requests await (and race them)."""
        now = self.host.disk_fingerprint(adapter_id)
        return now is not None and now != res.fingerprint

    def _load(self, adapter_id: str, host: HostAdapter, reserve_pages: int) -> int | None:
        plan = self._plan(host.modules, host.rank)
        if not self._free_slots and not self._evict_lru_idle():
            return None
        if not self._free_pages_for(plan.num_pages + reserve_pages, keep=None):
            return None
        pages = self.pool.allocate(plan.num_pages, LORA_KIND)
        try:
            weights = host.weights_on(self.storage.tensor.device)
            pointers = write_adapter_rows(self.storage.tensor, pages, weights, self.spec,
                                          host.modules, host.rank, plan)
        except (ValueError, KeyError) as err:
            self.pool.free(pages)
            raise EngineError(ErrorCode.INVALID_ARG,
                              f"adapter {adapter_id!r} does not fit the model: {err}") from err
        slot = self._free_slots.pop()
        self.tables.set_slot(slot, host.rank, host.scale, pointers)
        res = _Resident(slot, pages, 0, host.fingerprint)
        self._resident[adapter_id] = res
        self.num_loads += 1
        return self._take(adapter_id, res)

    def _take(self, adapter_id: str, res: _Resident) -> int:
        res.refcount += 1
        self._resident.move_to_end(adapter_id)
        return res.slot

    def _plan(self, modules: tuple[str, ...], rank: int) -> RowPlan:
        key = (tuple(modules), int(rank))
        if key not in self._plans:
            self._plans[key] = plan_adapter_rows(self.spec, modules, rank,
                                                 self.storage.page_elems)
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

    def evict_idle(self, pages_needed: int, keep: str | None = None) -> int:
        """Evict idle adapters, least recently used first, until `pages_needed` pages were
        freed or none is left; returns the number of pages freed."""
        freed = 0
        for adapter_id in [a for a, r in self._resident.items() if r.refcount == 0]:
            if freed >= pages_needed:
                break
            if adapter_id != keep:
                freed += self._evict(adapter_id)
        return freed

    def _evict_lru_idle(self) -> bool:
        for adapter_id, res in self._resident.items():
            if res.refcount == 0:
                self._evict(adapter_id)
                return True
        return False

    def _evict(self, adapter_id: str) -> int:
        res = self._resident.pop(adapter_id)
        self.pool.free(res.pages)
        self.tables.clear_slot(res.slot)
        self._free_slots.append(res.slot)
        self.num_evictions += 1
        return len(res.pages)

    # ---- introspection -----------------------------------------------------------------------
    def resident(self) -> list[str]:
        """Resident adapter ids, least recently used first."""
        return list(self._resident)

    def stats(self) -> dict[str, Any]:
        """Host cache counters plus the pool's (prefixed 'pool_')."""
        return {**self.host.stats(), "pool_resident": len(self._resident),
                "pool_loads": self.num_loads, "pool_evictions": self.num_evictions}
