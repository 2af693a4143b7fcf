"""The torch backend's per-step plan (TorchStep): the roles add_norm, rope_attention, lora and act
that every layer calls, over layers.py, torch_attention.py and torch_lora.py (the CPU path). Its
twin for CUDA is kernel_ops.KernelStep."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import apply_rope, rms_norm
from .lora import LoraTables
from .spec import ModelSpec
from .torch_attention import AttentionMeta, paged_attention, prepare_attention, write_kv
from .torch_lora import LoraBatchInfo, lora_shrink_expand, prepare_lora


@dataclass
class TorchStep:
    """One step's plan for the torch path, shared by all layers (the roles of
    kernel_ops.KernelStep: add_norm, rope_attention, lora, act)."""

    meta: AttentionMeta
    lora_info: LoraBatchInfo | None
    slot_mapping: torch.Tensor

    @classmethod
    def prepare(cls, batch, tables: LoraTables | None, spec: ModelSpec, block_size: int,
                device: torch.device, dtype: torch.dtype) -> TorchStep:
        info = prepare_lora(batch.lora_slots, tables, spec, device) if tables is not None else None
        return cls(prepare_attention(batch, block_size, device, dtype), info,
                   batch.slot_mapping.to(device))

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); without a residual (RMSNorm(x), x)."""
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x

    def rope_attention(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                       cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                       scale: float) -> torch.Tensor:
        """RoPE on the q and k heads of ``qkv`` [T, (H + 2 KVH) * D], their K/V written to the
        pool, attention over it: [T, H * D]."""
        T, hd = qkv.shape[0], kv_cache.shape[-1]
        qs, kvs = num_heads * hd, num_kv_heads * hd
        q = apply_rope(qkv[:, :qs].view(T, num_heads, hd), cos, sin)
        k = apply_rope(qkv[:, qs : qs + kvs].view(T, num_kv_heads, hd), cos, sin)
        v = qkv[:, qs + kvs :].view(T, num_kv_heads, hd)
        write_kv(kv_cache, k, v, self.slot_mapping)
        return paged_attention(q, k, v, kv_cache, self.meta, scale)

    def act(self, gu: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(gate) * up of the fused [T, 2 I] output."""
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def lora(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
             modules: tuple[int, ...], columns: tuple[tuple[int, int], ...]) -> None:
        """y[:, off:off+dim] += LoRA delta of module m, for each m, (off, dim) in columns."""
        if self.lora_info is not None:
            ys = tuple(y[:, off : off + dim] for off, dim in columns)
            lora_shrink_expand(x, ys, flat, self.lora_info, modules)
