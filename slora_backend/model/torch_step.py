"""The torch backend's per-step plan (TorchStep): the roles write_kv, attention and lora that
every layer calls, over torch_attention.py and torch_lora.py (the CPU path). Its twin for CUDA
is kernel_ops.KernelStep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora import LoraTables
from .spec import ModelSpec
from .torch_attention import AttentionMeta, paged_attention, prepare_attention, write_kv
from .torch_lora import LoraBatchInfo, lora_shrink_expand, prepare_lora


@dataclass
class TorchStep:
    """One step's plan for the torch path, shared by all layers (the roles of
    kernel_ops.KernelStep: write_kv, attention, lora)."""

    meta: AttentionMeta
    lora_info: LoraBatchInfo | None
    slot_mapping: torch.Tensor

    @classmethod
    def prepare(cls, batch, tables: LoraTables | None, spec: ModelSpec, block_size: int,
                device: torch.device, dtype: torch.dtype) -> TorchStep:
        info = prepare_lora(batch.lora_slots, tables, spec, device) if tables is not None else None
        return cls(prepare_attention(batch, block_size, device, dtype), info,
                   batch.slot_mapping.to(device))

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(kv_cache, k, v, self.slot_mapping)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache, self.meta, scale)

    def lora(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
             modules: tuple[int, ...], columns: tuple[tuple[int, int], ...]) -> None:
        """y[:, off:off+dim] += LoRA delta of module m, for each m, (off, dim) in columns."""
        if self.lora_info is not None:
            ys = tuple(y[:, off : off + dim] for off, dim in columns)
            lora_shrink_expand(x, ys, flat, self.lora_info, modules)
