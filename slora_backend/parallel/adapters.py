"""Adapters in a tensor-parallel engine's pools.

Rank 0's AdapterManager picks an adapter's pages and slot as on one device; its writer,
ShardedWriter, only queues the load. At the next step the load travels in the step plan
(`AdapterLoad`), rank 0 cuts the factors into every rank's share (parallel/shard.py,
ShardGeometry) packed one rank per row, one scatter hands each rank its row, and every rank
writes its share into the same pages of its own pool (executor.py). So the ranks' pools and
slot tables stay identical in layout, and only rank 0 reads adapters from disk or host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import torch

from slora_backend.adapters.adapter_manager import PoolWriter
from slora_backend.memory_pool import PoolStorage
from slora_backend.model.lora import RowPlan, plan_adapter_rows
from slora_backend.model.spec import ModelSpec

from .shard import ShardGeometry

if TYPE_CHECKING:
    from slora_backend.adapters.source import HostAdapter

Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A, B)


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


class ShardedWriter(PoolWriter):
    """Rank 0's PoolWriter: the rank is padded to a multiple of tp, rows are planned for one
    rank's share, and the write waits in `pending` for the next step plan."""

    def __init__(self, spec: ModelSpec, storage: PoolStorage, geometry: ShardGeometry) -> None:
        super().__init__(spec, storage)
        self.geometry = geometry
        self.pending: list[tuple[AdapterLoad, HostAdapter]] = []

    def table_rank(self, rank: int) -> int:
        return self.geometry.padded_rank(rank)

    def plan(self, modules: tuple[str, ...], rank: int) -> RowPlan:
        return row_plan(self.spec, self.geometry, self.storage.page_elems, tuple(modules),
                        self.geometry.padded_rank(rank))

    def write(self, slot: int, pages: list[int], host: HostAdapter,
              plan: RowPlan) -> dict[str, tuple[list[int], list[int]]]:
        load = AdapterLoad(slot, plan.rank, host.scale, tuple(host.modules), tuple(pages))
        self.pending.append((load, host))
        return plan.absolute(pages)

    def take(self) -> list[tuple[AdapterLoad, HostAdapter]]:
        """The loads queued since the last step, in order (and forget them)."""
        pending, self.pending = self.pending, []
        return pending


def _blocks(plan: RowPlan, num_layers: int) -> Iterator[tuple[int, str, tuple, int, tuple, int]]:
    """A share's layout: per layer and module, its A block then its B^T block, back to back:
    (layer, module, A shape, A offset, B^T shape, B^T offset); the last offset is the size."""
    offset = 0
    for layer in range(num_layers):
        for m, (a_rows, b_rows) in plan.offsets.items():
            a_len, b_len = plan.lengths[m]
            a_shape, bt_shape = (len(a_rows), a_len), (len(b_rows), b_len)
            yield layer, m, a_shape, offset, bt_shape, offset + prod(a_shape)
            offset += prod(a_shape) + prod(bt_shape)


def share_size(plan: RowPlan, num_layers: int) -> int:
    """Elements of one rank's share of an adapter."""
    return sum(num_layers * (len(a) * a_len + len(b) * b_len)
               for (a, b), (a_len, b_len) in zip(plan.offsets.values(), plan.lengths.values()))


def share_factors(share: torch.Tensor, plan: RowPlan, num_layers: int) -> Factors:
    """One rank's share as the (A, B) views write_adapter_rows takes."""
    out: Factors = {}
    for layer, m, a_shape, a_off, bt_shape, bt_off in _blocks(plan, num_layers):
        a = share[a_off : a_off + prod(a_shape)].view(a_shape)
        bt = share[bt_off : bt_off + prod(bt_shape)].view(bt_shape)
        out[(layer, m)] = (a, bt.t())
    return out


def pack_shares(weights: Factors, plan: RowPlan, geometry: ShardGeometry, num_layers: int,
                like: torch.Tensor) -> torch.Tensor:
    """Every rank's share of an adapter, one rank per row: [tp, share_size] (dtype and device
    of `like`), from the whole factors `weights`."""
    size = geometry.size
    out = like.new_empty(size, share_size(plan, num_layers))
    for layer, m, a_shape, a_off, bt_shape, bt_off in _blocks(plan, num_layers):
        a_parts, bt_parts = geometry.split(m, *weights[(layer, m)])
        out[:, a_off : a_off + prod(a_shape)].view(size, *a_shape).copy_(a_parts)
        out[:, bt_off : bt_off + prod(bt_shape)].view(size, *bt_shape).copy_(bt_parts)
    return out
