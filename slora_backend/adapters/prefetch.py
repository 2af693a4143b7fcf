"""S-LoRA's lookahead for the host cache: which prefetches may load now, which wait.

`HostCache.prefetch` is called for every queued request, in arrival order. The prefetches
loading ("promised") plus the adapters they loaded that no `get` has claimed yet (the
admission of their request: "unclaimed") stay within the cache's capacity; a prefetch beyond
that waits, in order, until claims make room ("deferred"). HostCache evicts claimed adapters
before unclaimed ones, so loading ahead never evicts what a queued request awaits. Not
thread-safe: HostCache calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator


class PrefetchWindow:
    """Promised, unclaimed and deferred prefetches, each with its footprint in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._promised: dict[str, int] = {}
        self._unclaimed: dict[str, int] = {}
        self._deferred: OrderedDict[str, int] = OrderedDict()
        self._demanded: set[str] = set()  # loads a get started: unclaimed once loaded

    def _has_room(self, size: int) -> bool:
        # always room for a first one: an adapter that fits alone is never deferred forever
        ahead = sum(self._promised.values()) + sum(self._unclaimed.values())
        return ahead == 0 or ahead + size <= self.capacity_bytes

    def offer(self, adapter_id: str, size: int) -> bool:
        """A prefetch of an adapter neither resident nor loading: True = load it now (it is
        promised), False = it waits behind the deferred ones (or already does)."""
        if adapter_id in self._deferred:
            return False
        if self._deferred or not self._has_room(size):
            self._deferred[adapter_id] = size
            return False
        self._promised[adapter_id] = size
        return True

    def is_deferred(self, adapter_id: str) -> bool:
        return adapter_id in self._deferred

    def is_unclaimed(self, adapter_id: str) -> bool:
        return adapter_id in self._unclaimed

    def demand(self, adapter_id: str) -> None:
        """A get that may load: the adapter is wanted now (the head of the queue), it waits
        for no room any more, and a load of it commits as unclaimed until its claim (the head
        may wait for room in the pool; loads for the requests behind it must not evict it
        meanwhile)."""
        self._deferred.pop(adapter_id, None)
        if adapter_id not in self._promised and adapter_id not in self._unclaimed:
            self._demanded.add(adapter_id)

    def cancel(self, adapter_id: str) -> None:
        """A promised prefetch whose load did not start (resident meanwhile, or refused)."""
        self._promised.pop(adapter_id, None)

    def loaded(self, adapter_id: str, size: int) -> None:
        """A load committed: a promised prefetch or a demanded load becomes unclaimed."""
        promised = self._promised.pop(adapter_id, None)
        if promised is not None or adapter_id in self._demanded:
            self._demanded.discard(adapter_id)
            self._unclaimed[adapter_id] = size if promised is None else promised

    def requeue(self, adapter_id: str) -> None:
        """An unclaimed adapter evicted for room (the head's demanded load): its prefetch
        waits again, first in line; the room it leaves is not new room for another."""
        size = self._unclaimed.pop(adapter_id, None)
        if size is not None:
            self._deferred[adapter_id] = size
            self._deferred.move_to_end(adapter_id, last=False)

    def release(self, adapter_id: str) -> bool:
        """Claimed, evicted, or its load failed: True if that made room."""
        self._demanded.discard(adapter_id)
        return (self._unclaimed.pop(adapter_id, None) is not None
                or self._promised.pop(adapter_id, None) is not None)

    def startable(self) -> Iterator[str]:
        """Deferred prefetches that fit now, in order, each promised as it is yielded."""
        while self._deferred:
            adapter_id, size = next(iter(self._deferred.items()))
            if not self._has_room(size):
                return
            del self._deferred[adapter_id]
            self._promised[adapter_id] = size
            yield adapter_id
