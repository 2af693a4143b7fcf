"""One call site for the LoRA delta of 1-3 modules.

``add_lora(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, ...)`` adds
``scales[s] * (x[t] @ A^T) @ B^T`` of each token's adapter into ``y`` in place, reading A and B
rows where they live in the pool (``flat = storage[l].view(-1)``) through the slot tables.

Which kernels run: a prefill batch (``segments``) takes MBGMM shrink then expand; a decode batch
(``lora_slots``) of at least GROUPED_MIN_TOKENS tokens takes the grouped MBGMV (one launch,
each adapter read once per chunk of its tokens, ``lora_grouped.py``; its chunk plan is built
once per step by ``decode_chunks``); a smaller one takes the per-token MBGMV shrink then expand,
whose split-K and column tiles put more programs in flight when there is little work (on the
H200 the grouped kernel is 1.3x faster at 32 tokens and 1.4-1.8x from 128, the per-token
kernels faster at 8: docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_common import LoraSegments
from .lora_expand import lora_expand, lora_expand_ref
from .lora_grouped import add_lora_grouped, lora_chunks
from .lora_shrink import lora_shrink, lora_shrink_ref

GROUPED_MIN_TOKENS = 32


def decode_chunks(lora_slots: torch.Tensor) -> torch.Tensor | None:
    """The grouped MBGMV's chunk plan when a decode batch of ``lora_slots`` takes it (None: the
    per-token MBGMV serves it). Build it once per step and pass it to every ``add_lora``."""
    return lora_chunks(lora_slots) if lora_slots.shape[0] >= GROUPED_MIN_TOKENS else None


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
    grouped: bool | None = None,
    chunks: torch.Tensor | None = None,
) -> torch.Tensor:
    """MBGMV with ``lora_slots`` (decode), MBGMM with ``segments`` (prefill); returns ``y``.

    ``aligned``: every row offset is a multiple of 8 elements (None: checked on the device once
    per table version, a sync that CUDA-graph capture cannot have). ``grouped`` (decode only):
    force the grouped (True) or per-token (False) MBGMV; None: by the batch size. ``chunks``:
    the step's ``decode_chunks`` (None: built per call when needed). ``split_k`` applies to the
    shrink of the per-token and MBGMM paths."""
    if grouped is None:
        grouped = lora_slots is not None and x.shape[0] >= GROUPED_MIN_TOKENS
    if grouped:
        if lora_slots is None:
            raise ValueError("the grouped MBGMV serves decode batches (lora_slots)")
        return add_lora_grouped(
            y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, y_offsets,
            lora_slots=lora_slots, chunks=chunks, aligned=aligned,
        )  # fmt: skip
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
