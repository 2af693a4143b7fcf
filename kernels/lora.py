"""One call site for the LoRA delta of 1-3 modules: shrink then expand (two launches).

``add_lora(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, ...)`` adds
``scales[s] * (x[t] @ A^T) @ B^T`` of each token's adapter into ``y`` in place, reading A and B
rows where they live in the pool (``flat = storage[l].view(-1)``) through the slot tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_common import LoraSegments
from .lora_expand import lora_expand, lora_expand_ref
from .lora_shrink import lora_shrink, lora_shrink_ref


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    flat: torch.Tensor,
    a_ptr: torch.Tensor,
    b_ptr: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    modules: Sequence[int],
    out_dims: Sequence[int],
    y_offsets: Sequence[int] | None = None,
    *,
    lora_slots: torch.Tensor | None = None,
    segments: LoraSegments | None = None,
    split_k: int | None = None,
    aligned: bool | None = None,
) -> torch.Tensor:
    """MBGMV with ``lora_slots`` (decode), MBGMM with ``segments`` (prefill); returns ``y``.

    ``aligned``: every row offset is a multiple of 8 elements (None: checked on the device once
    per table version, a sync that CUDA-graph capture cannot have)."""
    v = lora_shrink(
        x, flat, a_ptr, ranks, modules, lora_slots=lora_slots, segments=segments,
        split_k=split_k, aligned=aligned,
    )
    return lora_expand(
        y,
        v,
        flat,
        b_ptr,
        ranks,
        scales,
        modules,
        out_dims,
        y_offsets,
        lora_slots=lora_slots,
        segments=segments,
        aligned=aligned,
    )


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    flat: torch.Tensor,
    a_ptr: torch.Tensor,
    b_ptr: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    modules: Sequence[int],
    out_dims: Sequence[int],
    y_offsets: Sequence[int] | None,
    lora_slots: torch.Tensor,
) -> torch.Tensor:
    """float64 reference of :func:`add_lora` (returns a new tensor, ``y`` is not modified)."""
    v = lora_shrink_ref(x, flat, a_ptr, ranks, modules, lora_slots)
    return lora_expand_ref(
        y, v, flat, b_ptr, ranks, scales, modules, out_dims, y_offsets, lora_slots
    )
