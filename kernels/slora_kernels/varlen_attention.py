"""Paged attention of a mixed step (prefill chunks and decode tokens) over a fixed grid.

``paged_attention_prefill`` sizes its grid from the step (longest query, number of sequences),
so a CUDA graph captured for one step cannot replay another. Here the step is described by a
**work list** in a device buffer, built on the host (``varlen_work``) and copied in before the
launch: one item per tile of up to BLOCK_M consecutive queries of one sequence,
``(sequence, first batch row, rows, position of the first row)``; items past the step's are
``-1`` and their programs exit at once. The grid is ``(capacity, query heads)`` with a capacity
fixed by the graph's token count (``varlen_capacity``), so one captured launch serves every
step up to that many tokens, prefill rows and decode rows alike. A decode token is an item of
one row; a prefill chunk of n tokens is ceil(n / BLOCK_M) items.

Each program is one causal tile of the prefill kernel (``paged_attention._causal_tile``): keys
before the tile's first query unmasked, the diagonal masked; K/V read from the pool (the new
tokens' K/V written there first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_common import cdiv, next_pow2
from .paged_attention import _LOG2E, _causal_tile

WORK_FIELDS = 4  # (sequence, first row, rows, first position)
PAD_ITEM = -1
# key tile on CUDA (the prefill kernel's), and on the interpreter
BLOCK_N_CUDA = 64
BLOCK_N_CPU = 32


@triton.jit(do_not_specialize=["stride_bts"])
def _varlen_kernel(
    q_ptr,
    kv_ptr,
    o_ptr,
    work_ptr,
    bt_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_page,
    stride_kv,
    stride_blk,
    stride_kvh,
    stride_bts,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32: tl.constexpr,
):
    item = work_ptr + tl.program_id(0) * 4
    h = tl.program_id(1)
    seq = tl.load(item)
    if seq < 0:
        return
    row0 = tl.load(item + 1)
    n_rows = tl.load(item + 2)
    pos0 = tl.load(item + 3)
    offs_m = tl.arange(0, BLOCK_M)
    _causal_tile(
        q_ptr, kv_ptr, o_ptr, bt_ptr + seq.to(tl.int64) * stride_bts,
        (row0 + offs_m).to(tl.int64), offs_m < n_rows, pos0 + offs_m, pos0, pos0 + n_rows, h,
        sm_scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_page, stride_kv,
        stride_blk, stride_kvh, GROUP, PAGE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, FP32,
    )  # fmt: skip


def varlen_capacity(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Work items enough for any step of at most ``num_tokens`` tokens over at most
    ``num_seqs`` sequences: each sequence adds at most one partial tile."""
    return cdiv(num_tokens, block_m) + min(num_seqs, num_tokens)


def varlen_work(query_start_loc: Sequence[int], context_lens: Sequence[int], block_m: int,
                capacity: int | None = None) -> torch.Tensor:
    """The work list of a step (host lists: ``query_start_loc`` [S+1], ``context_lens`` [S],
    the KV length after the step): int32 [capacity, 4] on the CPU, padded with -1 items
    (default capacity: exactly the step's items)."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int64)
    ctx = torch.as_tensor(context_lens, dtype=torch.int64)
    q_len = qsl[1:] - qsl[:-1]
    tiles = (q_len + block_m - 1) // block_m
    seq = torch.repeat_interleave(torch.arange(ctx.shape[0]), tiles)  # each item's sequence
    n = int(seq.shape[0])
    if capacity is None:
        capacity = n
    if n > capacity:
        raise ValueError(f"the step has {n} work items, the capacity is {capacity}")
    offset = (torch.arange(n) - (torch.cumsum(tiles, 0) - tiles)[seq]) * block_m  # in its chunk
    work = torch.full((capacity, WORK_FIELDS), PAD_ITEM, dtype=torch.int32)
    work[:n] = torch.stack((seq, qsl[seq] + offset, torch.clamp(q_len[seq] - offset, max=block_m),
                            (ctx - q_len)[seq] + offset), dim=1)
    return work


def paged_attention_varlen(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    work: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    block_m: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the queries ``q`` [T, H, D] over their sequences' paged KV, one
    program per (work item, query head); ``work`` int32 [capacity, 4] from ``varlen_work``
    with the same ``block_m``. Rows no item covers (padding) are left unwritten."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be the contiguous pool view "
                         f"[num_pages, 2, block_size, num_kv_heads, head_dim], got "
                         f"{tuple(kv_cache.shape)}")
    _, _, page, hkv, d = kv_cache.shape
    if q.dim() != 3 or q.shape[2] != d or q.stride(2) != 1 or q.shape[1] % hkv:
        raise ValueError(f"q must be [T, H, {d}] (H a multiple of {hkv}) with unit last "
                         f"stride, got {tuple(q.shape)}")
    if q.dtype != kv_cache.dtype:
        raise TypeError(f"q dtype {q.dtype} must match the pool dtype {kv_cache.dtype}")
    if work.dtype != torch.int32 or work.dim() != 2 or work.shape[1] != WORK_FIELDS \
            or not work.is_contiguous():
        raise ValueError(f"work must be a contiguous int32 [capacity, {WORK_FIELDS}], "
                         f"got {work.dtype} {tuple(work.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 \
            or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 [S, max_blocks] with unit last stride")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    for name, t in (("q", q), ("work", work), ("block_tables", block_tables)):
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device} but kv_cache is on {kv_cache.device}")
    h = q.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with unit last stride")
    if work.shape[0] == 0 or q.shape[0] == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    block_d = next_pow2(d)
    fp32 = q.dtype == torch.float32
    on_cuda = q.device.type == "cuda"
    block_n = BLOCK_N_CUDA if on_cuda and not fp32 and block_d <= 128 else BLOCK_N_CPU
    _varlen_kernel[(work.shape[0], h)](
        q, kv_cache, out, work, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=h // hkv, PAGE=page, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m,
        BLOCK_N=block_n, FP32=fp32,
        num_warps=4, num_stages=3 if on_cuda else 1,
    )  # fmt: skip
    return out
