"""Adapters in a tensor-parallel engine's pools.

Rank 0's AdapterManager picks an adapter's pages and slot as on one device; its copier,
ShardedCopier, checks the values on the host (rank 0 holds the only host copy) and only queues
the load: no side stream at tp > 1, the adapter is ready at once. At the next step the load
travels in the step plan (`AdapterLoad`), rank 0 cuts the factors (every layer's of a module
at once, as HostAdapter stacks them) into every rank's share (parallel/shard.py,
ShardGeometry) packed one rank per row, one scatter hands each rank its row, and every rank
writes its share into the same pages of its own pool (executor.py), on its model's stream
before the step's forward. So the ranks' pools and slot tables stay identical in layout, and
only rank 0 reads adapters from disk or host memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import torch

from slora_backend.adapters.pool_copy import PoolCopier
from slora_backend.model.lora import RowPlan, plan_adapter_rows
from slora_backend.model.spec import ModelSpec

from .shard import ShardGeometry

if TYPE_CHECKING:
    from slora_backend.adapters.source import HostAdapter

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [L, r, in], B [L, out, r])


@dataclass(frozen=True)
class AdapterLoad:
    """One adapter to write into every rank's pool this step (`rank`: the padded table rank)."""

    slot: int
    rank: int
    scale: float
    modules: tuple[str, ...]
    pages: tuple[int, ...]


def row_plan(spec: ModelSpec, geometry: ShardGeometry, page_elems: int,
             modules: tuple[str, ...], rank: int) -> RowPlan:
    """The rows of one rank's share of an adapter of padded `rank` (the same on every rank)."""
    return plan_adapter_rows(spec, modules, rank, page_elems, geometry)


class ShardedCopier(PoolCopier):
    """Rank 0's PoolCopier: the rank is padded to a multiple of tp, rows are planned for one
    rank's share, the values checked on the host, and the write waits in `pending` for the
    next step plan (the copy is done at once: nothing is in flight on a side stream)."""

    def __init__(self, storage: torch.Tensor, spec: ModelSpec, geometry: ShardGeometry) -> None:
        super().__init__(storage, spec, max_slots=0, side_stream=False)
        self.geometry = geometry
        self.pending: list[tuple[AdapterLoad, HostAdapter]] = []

    def table_rank(self, rank: int) -> int:
        return self.geometry.padded_rank(rank)

    def plan(self, modules: tuple[str, ...], rank: int) -> RowPlan:
        return row_plan(self.spec, self.geometry, self.storage.shape[-1], tuple(modules),
                        self.geometry.padded_rank(rank))

    def _write(self, factors: Factors, host: HostAdapter, pages: Sequence[int], plan: RowPlan,
               slot: int) -> dict[str, tuple[list[int], list[int]]]:
        del factors  # the executor cuts the shares from `host` at the step
        load = AdapterLoad(slot, plan.rank, host.scale, tuple(host.modules), tuple(pages))
        self.pending.append((load, host))
        return plan.absolute(pages)

    def take(self) -> list[tuple[AdapterLoad, HostAdapter]]:
        """The loads queued since the last step, in order (and forget them)."""
        pending, self.pending = self.pending, []
        return pending


def _blocks(plan: RowPlan, num_layers: int) -> Iterator[tuple[str, tuple, int, tuple, int]]:
    """A share's layout: per module, its A block of every layer then its B^T block of every
    layer, back to back: (module, A shape, A offset, B^T shape, B^T offset)."""
    offset = 0
    for m, (a_rows, b_rows) in plan.offsets.items():
        a_len, b_len = plan.lengths[m]
        a_shape, bt_shape = (num_layers, len(a_rows), a_len), (num_layers, len(b_rows), b_len)
        yield m, a_shape, offset, bt_shape, offset + prod(a_shape)
        offset += prod(a_shape) + prod(bt_shape)


def share_size(plan: RowPlan, num_layers: int) -> int:
    """Elements of one rank's share of an adapter."""
    return sum(num_layers * (len(a) * a_len + len(b) * b_len)
               for (a, b), (a_len, b_len) in zip(plan.offsets.values(), plan.lengths.values()))


def share_factors(share: torch.Tensor, plan: RowPlan, num_layers: int) -> Factors:
    """One rank's share as the stacked (A, B) views write_adapter_factors takes."""
    out: Factors = {}
    for m, a_shape, a_off, bt_shape, bt_off in _blocks(plan, num_layers):
        a = share[a_off : a_off + prod(a_shape)].view(a_shape)
        bt = share[bt_off : bt_off + prod(bt_shape)].view(bt_shape)
        out[m] = (a, bt.transpose(1, 2))
    return out


def pack_shares(factors: Factors, plan: RowPlan, geometry: ShardGeometry, num_layers: int,
                like: torch.Tensor) -> torch.Tensor:
    """Every rank's share of an adapter, one rank per row: [tp, share_size] (dtype and device
    of `like`), from the whole stacked factors (HostAdapter.factors): two copies per module."""
    size = geometry.size
    out = like.new_empty(size, share_size(plan, num_layers))
    for m, a_shape, a_off, bt_shape, bt_off in _blocks(plan, num_layers):
        a_parts, bt_parts = geometry.split(m, *factors[m])
        out[:, a_off : a_off + prod(a_shape)].view(size, *a_shape).copy_(a_parts)
        out[:, bt_off : bt_off + prod(bt_shape)].view(size, *bt_shape).copy_(bt_parts)
    return out
