"""A tensor-parallel rank's per-step plan: the backend's own step (norms, RoPE, KV write and
attention over this rank's KV heads) with the LoRA role replaced by S-LoRA's sharded one.

At each LoRA call site: shrink with this rank's share of A, one collective of the [T, r]
intermediate, expand with this rank's share of B:
- column-parallel sites (q,k,v; gate,up): all-gather the [T, r/tp] shrink results (A is cut
  along the rank, rank i holding rows i, i + tp, ...: interleaving the gathered columns gives
  the [T, r] shrink in row order), expand into this rank's output columns;
- row-parallel sites (o; down): all-reduce the [T, r] partial shrink (A is cut along the input
  like the base weight), expand into this rank's slice of the hidden columns of the partial
  sum, which the base model's all-reduce then carries (LlamaModel.all_reduce).
The collective and its size depend only on the batch and the slot tables, which every rank
has alike, so all ranks always meet at the same collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slora_backend.model.batch import BatchInput
from slora_backend.model.llama import TORCH_BACKEND, LlamaModel
from slora_backend.model.lora import LoraTables
from slora_backend.model.spec import MODULE_ORDER
from slora_backend.model.torch_lora import LoraBatchInfo, expand, prepare_lora

from .comm import Comm
from .shard import ROW_PARALLEL, ShardGeometry

if TYPE_CHECKING:
    from slora_backend.model.torch_lora import GroupModule, LoraGroup

Columns = tuple[tuple[int, int], ...]


def is_row_parallel(modules: tuple[int, ...]) -> bool:
    """The call site of o or down (a call site's modules share one parallel style)."""
    return MODULE_ORDER[modules[0]] in ROW_PARALLEL


def rank_columns(columns: Columns, row: bool, comm: Comm) -> Columns:
    """Where this rank's share of each module's LoRA output goes in y: at a row-parallel site
    (y is the whole hidden width) this rank's slice of it; else the columns as given."""
    if not row:
        return columns
    return tuple((off + comm.rank * dim // comm.size, dim // comm.size) for off, dim in columns)


def interleave(gathered: torch.Tensor) -> torch.Tensor:
    """[tp, ..., w] from all ranks -> [..., w * tp] with column j * tp + i from rank i: A's rows
    are dealt out round robin, so this is the [.., r] shrink result in row order."""
    dims = gathered.dim()
    return gathered.permute(*range(1, dims), 0).reshape(*gathered.shape[1:-1], -1)


class ShardedStep:
    """The roles of a step (add_norm, rope_attention, act: the backend's own; lora: S-LoRA's
    sharded one), for one tensor-parallel rank."""

    def __init__(self, inner: Any, lora: Any) -> None:
        self.inner = inner
        self.lora = lora

    @classmethod
    def prepare(cls, model: LlamaModel, batch: BatchInput, storage: torch.Tensor,
                tables: LoraTables | None, geometry: ShardGeometry, comm: Comm) -> ShardedStep:
        block_size = model.check_storage(storage)
        if model.backend == TORCH_BACKEND:
            info = (prepare_lora(batch.lora_slots, tables, model.spec, model.device, geometry)
                    if tables is not None else None)
            return cls(model.prepare_step(batch, storage, block_size, None),
                       TorchShardedLora(info, comm))
        from .kernel_lora import KernelShardedLora

        inner = model.prepare_step(batch, storage, block_size, tables)
        return cls(inner, KernelShardedLora(inner, batch.lora_host(), geometry, storage.shape[2],
                                            comm))

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.add_norm(x, residual, weight, eps)

    def rope_attention(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                       cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                       scale: float) -> torch.Tensor:
        return self.inner.rope_attention(qkv, num_heads, num_kv_heads, cos, sin, kv_cache, scale)

    def act(self, gu: torch.Tensor) -> torch.Tensor:
        return self.inner.act(gu)


class TorchShardedLora:
    """The lora role on the torch backend (the CPU path): per group of tokens of one adapter,
    the same matmuls as torch_lora.lora_shrink_expand on this rank's shares, with the step's
    collective between the shrinks and the expands."""

    def __init__(self, info: LoraBatchInfo | None, comm: Comm) -> None:
        self.info = info
        self.comm = comm

    def __call__(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
                 modules: tuple[int, ...], columns: Columns) -> None:
        info = self.info
        if info is None:
            return
        used = [(mi, cols) for mi, cols in zip(modules, columns) if mi in info.modules]
        if not used:
            return
        row = is_row_parallel(modules)
        batches = [info.modules[mi] for mi, _ in used]
        rows = [mb.rows(flat) for mb in batches]
        xs = info.token_rows(x)
        width = max(use.a_rank for mb in batches for use in mb.uses.values())
        v = xs.new_zeros(len(batches), info.num_tokens, width)  # [modules, tokens, A rows]
        for k, mb in enumerate(batches):
            for gi, g in enumerate(info.groups):
                use = mb.uses.get(gi)
                if use is not None:
                    a, _ = mb.factors(flat, rows[k], use)
                    v[k, g.start : g.end, : use.a_rank] = xs[g.start : g.end] @ a.t()
        if row:
            self.comm.all_reduce(v, "lora")
        else:
            v = interleave(self.comm.all_gather(v, "lora"))
        out_cols = rank_columns(tuple(cols for _, cols in used), row, self.comm)
        for k, (mb, (off, dim)) in enumerate(zip(batches, out_cols)):

            def shrunk(g: LoraGroup, use: GroupModule, a: torch.Tensor,
                       k: int = k) -> torch.Tensor:
                return v[k, g.start : g.end, : use.rank]

            expand(y[:, off : off + dim], info, mb, flat, rows[k], shrunk)
