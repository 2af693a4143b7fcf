"""Rotary embedding of q and k fused with the write of K and V into the pool: one launch.

In torch this is ~15 launches per layer (each of q and k: two slices multiplied by cos and sin,
a subtraction, an addition and a cat; then the KV write). Here one program per token:
- rotates the token's query heads in place inside the fused ``qkv`` output (columns
  ``[0, H * D)``), where attention reads them;
- rotates its key heads and writes them, with its value heads, to its pool slot
  (``slot_mapping``; -1 = a padding row: no write). K and V are not written back to ``qkv``:
  the attention kernels read every key and value from the pool.

Rotate-half convention (HF): ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`` over the two halves of
a head, ``cos``/``sin`` [T, D/2] in the model's dtype. In fp16/bf16 each product and each
sum is rounded to that dtype, as torch's ops on those tensors round, so the result matches the
torch path bit for bit up to the rounding of the hardware's multiply.

KV layout: ``kv_cache = storage[l].view(num_pages, 2, block_size, num_kv_heads, head_dim)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import next_pow2

# dtypes whose torch ops round each product and sum: the kernel rounds as they do
_ROUNDED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _rotate(x1, x2, c, s, ROUND: tl.constexpr):
    """The two rotated halves, rounded op by op like torch's ops in the input dtype."""
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if ROUND:
        a = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
        b = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    else:
        a = x1 * c - x2 * s
        b = x2 * c + x1 * s
    return a.to(dt), b.to(dt)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    kv_ptr,
    slot_ptr,
    stride_t,
    stride_cos,
    stride_page,
    stride_kv,
    stride_blk,
    stride_kvh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    c = tl.load(cos_ptr + t * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    c = c[None, :]
    s = s[None, :]
    row = qkv_ptr + t * stride_t
    # queries: rotated in place
    offs_h = tl.arange(0, BLOCK_H)
    qm = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    qp = row + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    q1, q2 = _rotate(tl.load(qp, mask=qm), tl.load(qp + HALF, mask=qm), c, s, ROUND)
    tl.store(qp, q1, mask=qm)
    tl.store(qp + HALF, q2, mask=qm)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    # keys (rotated) and values: to the token's pool slot
    offs_kh = tl.arange(0, BLOCK_KVH)
    km = (offs_kh < NUM_KV_HEADS)[:, None] & d_mask[None, :]
    kp = row + NUM_HEADS * 2 * HALF + offs_kh[:, None] * (2 * HALF) + offs_d[None, :]
    k1, k2 = _rotate(tl.load(kp, mask=km), tl.load(kp + HALF, mask=km), c, s, ROUND)
    vp = kp + NUM_KV_HEADS * 2 * HALF
    v1 = tl.load(vp, mask=km)
    v2 = tl.load(vp + HALF, mask=km)
    dst = (kv_ptr + (slot // PAGE) * stride_page + (slot % PAGE) * stride_blk
           + offs_kh[:, None] * stride_kvh + offs_d[None, :])
    ty = kv_ptr.dtype.element_ty
    tl.store(dst, k1.to(ty), mask=km)
    tl.store(dst + HALF, k2.to(ty), mask=km)
    tl.store(dst + stride_kv, v1.to(ty), mask=km)
    tl.store(dst + stride_kv + HALF, v2.to(ty), mask=km)


def _check(qkv, cos, sin, kv_cache, slot_mapping, num_heads):
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be the contiguous pool view "
                         "[num_pages, 2, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    _, _, _, hkv, d = kv_cache.shape
    if d % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {d}")
    width = (num_heads + 2 * hkv) * d
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {width}] (q, k, v heads of {d}) with unit last "
                         f"stride, got {tuple(qkv.shape)}")
    if qkv.dtype not in _ROUNDED_DTYPES + (torch.float32,) or qkv.dtype != kv_cache.dtype:
        raise TypeError(f"qkv ({qkv.dtype}) and the pool ({kv_cache.dtype}) must share one of "
                        "fp16/bf16/fp32")
    T = qkv.shape[0]
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, d // 2) or not t.is_contiguous() or t.dtype != qkv.dtype:
            raise ValueError(f"{name} must be a contiguous [{T}, {d // 2}] {qkv.dtype}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (T,) \
            or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous int64 [{T}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("cos", cos), ("sin", sin), ("slot_mapping", slot_mapping),
                    ("kv_cache", kv_cache)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    return hkv, d


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> None:
    """Rotate the query heads of ``qkv`` [T, (H + 2 KVH) * D] in place and write the rotated
    keys and the values to their slots of ``kv_cache`` (slot -1: skipped)."""
    hkv, d = _check(qkv, cos, sin, kv_cache, slot_mapping, num_heads)
    T = qkv.shape[0]
    if T == 0:
        return
    half = d // 2
    _rope_kv_kernel[(T,)](
        qkv, cos, sin, kv_cache, slot_mapping,
        qkv.stride(0), cos.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_HEADS=num_heads, NUM_KV_HEADS=hkv, HALF=half, BLOCK_H=next_pow2(num_heads),
        BLOCK_KVH=next_pow2(hkv), BLOCK_HALF=next_pow2(half), PAGE=kv_cache.shape[2],
        ROUND=qkv.dtype in _ROUNDED_DTYPES,
        num_warps=4,
    )  # fmt: skip


def rope_kv_write_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      num_heads: int) -> torch.Tensor:
    """torch reference: returns the rotated queries [T, H, D] (``qkv`` is not modified) and
    writes the rotated keys and the values to their slots of ``kv_cache`` (-1 skipped)."""
    _, _, page, hkv, d = kv_cache.shape
    T = qkv.shape[0]
    half = d // 2
    c, s = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    q = rotate(qkv[:, :num_heads * d].reshape(T, num_heads, d))
    k = rotate(qkv[:, num_heads * d:(num_heads + hkv) * d].reshape(T, hkv, d))
    v = qkv[:, (num_heads + hkv) * d:].reshape(T, hkv, d)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_cache[slots // page, 0, slots % page] = k[keep]
    kv_cache[slots // page, 1, slots % page] = v[keep]
    return q
