"""The lora role of a tensor-parallel step on the triton backend (the CUDA path): the MBGMM /
MBGMV shrink kernel over this rank's A shares, the collective on its fp32 result, the expand
kernel over this rank's B shares (step.py says which collective where).

The shrink reads `a_ranks` (the slot tables' ranks, divided by tp at the column-parallel
modules, whose A share holds rank / tp rows) and returns fp32 split-K partials
[modules, split, T, tables' width]; they are summed, and the collective moves only the columns
up to the step's largest (padded) rank r: [modules, T, r / tp] per rank at a column-parallel
site (gathered) and [modules, T, r] at a row-parallel one (reduced), for every token of the
step (a base-model token's row is never read). The grouped one-launch MBGMV is not used: its
shrink and expand cannot be split by a collective.
"""

from __future__ import annotations

from typing import Any

import torch

import slora_kernels
from slora_backend.model.spec import MODULE_INDEX, MODULE_ORDER
from slora_kernels.lora_common import ROW_ALIGN_ELEMS

from .comm import Comm
from .shard import COLUMN_PARALLEL, ShardGeometry
from .step import Columns, interleave, is_row_parallel, rank_columns

COLUMN_INDEX = [MODULE_INDEX[m] for m in COLUMN_PARALLEL]


def shares_aligned(geometry: ShardGeometry, page_elems: int) -> bool:
    """Every row of a share starts on ROW_ALIGN_ELEMS (kernel_ops.rows_always_aligned, for the
    share's row lengths)."""
    lengths = [n for m in MODULE_ORDER for n in geometry.lengths(m)] + [page_elems]
    return all(n % ROW_ALIGN_ELEMS == 0 for n in lengths)


class KernelShardedLora:
    """Built once per step over the step's KernelStep (its slots / segments and tables)."""

    def __init__(self, step: Any, slots: list[int], geometry: ShardGeometry, page_elems: int,
                 comm: Comm) -> None:
        self.step = step
        self.comm = comm
        self.aligned = shares_aligned(geometry, page_elems)
        self.a_ranks = None
        self.width = 0  # the step's largest rank (a multiple of tp, as every table rank)
        if step.tables is not None:
            self.a_ranks = step.tables.ranks.clone()
            self.a_ranks[:, COLUMN_INDEX] //= comm.size
            self.width = step.tables.max_rank_of(slots)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
                 modules: tuple[int, ...], columns: Columns) -> None:
        s, t = self.step, self.step.tables
        if t is None or s.lora_modules.isdisjoint(modules):
            return
        batch = dict(lora_slots=s.lora_slots, segments=s.segments, aligned=self.aligned)
        v = slora_kernels.lora_shrink(x, flat, t.a_ptr, self.a_ranks, modules, **batch)
        v = v.sum(1, keepdim=True)  # [modules, 1, T, tables' width]
        row = is_row_parallel(modules)
        if row:
            used = v[..., : self.width].contiguous()
            self.comm.all_reduce(used, "lora")
        else:
            share = v[..., : self.width // self.comm.size]
            used = interleave(self.comm.all_gather(share, "lora"))
        v[..., : self.width] = used  # columns past the ranks are never read
        out_cols = rank_columns(columns, row, self.comm)
        slora_kernels.lora_expand(y, v, flat, t.b_ptr, t.ranks, t.scales, modules,
                                  [dim for _, dim in out_cols], [off for off, _ in out_cols],
                                  **batch)
