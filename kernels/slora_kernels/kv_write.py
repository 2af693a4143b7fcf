"""Write the new tokens' K and V into their pool slots (``slot = page * block_size + offset``).

``kv_cache = storage[l].view(num_pages, 2, block_size, num_kv_heads, head_dim)``; token t goes
to ``kv_cache[slot // block_size, 0 (K) / 1 (V), slot % block_size]``. A slot of -1 (padding)
is skipped. One program per token, all KV heads at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import next_pow2


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_page,
    stride_kv,
    stride_blk,
    stride_kvh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    page = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = (
        kv_ptr
        + page * stride_page
        + off * stride_blk
        + offs_h[:, None] * stride_kvh
        + offs_d[None, :]
    )
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def kv_write(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``k``, ``v`` [T, num_kv_heads, head_dim] (unit last stride; cast to the pool dtype),
    ``slot_mapping`` int64 [T] (-1 = skip)."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or not kv_cache.is_contiguous():
        raise ValueError(
            "kv_cache must be the contiguous pool view "
            "[num_pages, 2, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    _, _, page, hkv, d = kv_cache.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (hkv, d) or t.stride(2) != 1:
            raise ValueError(
                f"{name} must be [T, {hkv}, {d}] with unit last stride, got {tuple(t.shape)}"
            )
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but kv_cache is on {kv_cache.device}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} dtype must be fp16/bf16/fp32, got {t.dtype}")
    T = k.shape[0]
    if v.shape[0] != T:
        raise ValueError(f"k has {T} tokens, v has {v.shape[0]}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1 or slot_mapping.shape[0] != T:
        raise ValueError(
            f"slot_mapping must be int64 [{T}], "
            f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != kv_cache.device or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous on {kv_cache.device}")
    if T == 0:
        return
    _kv_write_kernel[(T,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=hkv, HEAD_DIM=d,
        BLOCK_H=next_pow2(hkv), BLOCK_D=next_pow2(d), PAGE=page,
        num_warps=4,
    )  # fmt: skip


def kv_write_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """torch reference (in place)."""
    page = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_cache[slots // page, 0, slots % page] = k[keep].to(kv_cache.dtype)
    kv_cache[slots // page, 1, slots % page] = v[keep].to(kv_cache.dtype)
