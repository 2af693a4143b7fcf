"""Grouped MBGMV: the decode LoRA delta in ONE launch that reads each adapter once per call.

``y[t, off:off+out] += scale_s * (x[t] @ A_s^T) @ B_s^T`` for every token t of a decode batch,
``s = lora_slots[t]`` (-1: no adapter), A and B read in place from the unified pool through the
slot tables (layout: ``kernels/lora_common.py``).

Why grouped and fused: in a decode batch several requests often share an adapter, and the
per-token MBGMV (``lora_shrink`` + ``lora_expand``) reads that adapter's A and B once per token,
in two dependent launches. Here one program owns one adapter's tokens (a chunk of up to
BLOCK_M of them), one module and one tile of BLOCK_R rank rows: it reduces ``x @ A_tile^T``
over the whole input dimension for all its tokens at once (a [BLOCK_M, BLOCK_R] tile that
stays in registers), then streams the tile's B^T rows through ``v @ B^T`` into ``y``. A and B
cross HBM once per adapter and chunk, and the rank is never padded: tiles past an adapter's
true rank exit at once, rows past it in the last tile are masked and never fetched.

Which tokens form a chunk comes from a plan built once per engine step (``lora_chunks``, one
small launch shared by every layer and module): row t lists the tokens of the chunk of t's
adapter that starts at t (-1 padded), or is all -1 when none starts there; only the programs of
a chunk's first token work. Nothing is sorted: a plan program counts the earlier tokens of its
adapter in the per-token slots.

Rank tiles spread a large adapter over several programs (a single program streams at a few
tens of GB/s, so one program per rank-64 adapter would bound the whole launch). Programs add
their part into ``y`` with fire-and-forget atomic adds: a plain read-modify-write would wait a
full memory latency on each output tile's load (7-15% slower on an H200). When an adapter's
rank fits one tile its program is the only writer of its outputs and the result is
deterministic; above that, the order of the tiles' additions, hence the last bits of ``y``, may
vary from run to run. The tile height trades program count against program length: narrow
tiles (``block_r``) while a launch has few (chunk, module) pairs, wider ones (``wide_block_r``)
above ``wide_above_rows`` tokens x modules, where narrow tiles would queue in a second wave.

A chunk of one or two tokens (most chunks, when a batch spreads over many adapters) has its
shrink on CUDA cores instead (``few_tokens``): a tensor-core tile needs 16 rows of x, so it
would stage, load and multiply 15 or 14 rows of padding per tile of A; the lighter loop streams
A alone. Only launches of one module take it (``few_max_modules``): on an H200 it made the o
launch of a 200-token step 13% faster and smaller one-module launches 2-8%, but the q,k,v
launches, whose many programs need the occupancy its accumulators cost, up to 27% slower.

``n_split`` > 1 gives each tile that many programs, each redoing the shrink (A is then read
from L2) and writing its share of the output columns: more programs in flight when a batch has
few adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_common import (
    ROW_ALIGN,
    ROW_ALIGN_ELEMS,
    cdiv,
    check_batch,
    check_tables,
    check_x,
    check_y_columns,
    load_pool_rows,
    next_pow2,
    per_module3,
    pick_module,
    rows_aligned,
    shrink_dot_step,
)


# the batch size varies per step: no variant per value (Triton specialises integers that are 1
# or multiples of 16 by default), so steps never wait on a JIT compile
@triton.jit(do_not_specialize=["num_tokens"])
def _lora_chunks_kernel(slots_ptr, chunks_ptr, num_tokens, T_PAD: tl.constexpr,
                        BLOCK_M: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    offs = tl.arange(0, T_PAD)
    same = tl.load(slots_ptr + offs, mask=offs < num_tokens, other=-1) == slot
    index = tl.sum((same & (offs < t)).to(tl.int32), axis=0)  # t's index among its adapter's
    pos = tl.cumsum(same.to(tl.int32), axis=0) - 1  # each token's index within its adapter
    want = index + tl.arange(0, BLOCK_M)
    hit = same[None, :] & (pos[None, :] == want[:, None])  # [BLOCK_M, T_PAD], <= 1 per row
    tok = tl.sum(tl.where(hit, offs[None, :], 0), axis=1)
    valid = (tl.max(hit.to(tl.int32), axis=1) > 0) & (slot >= 0) & (index % BLOCK_M == 0)
    tl.store(chunks_ptr + t * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(valid, tok, -1))


@triton.jit
def _chunk(chunks_ptr, slots_ptr, t, BLOCK_M: tl.constexpr):
    """The chunk starting at token t: (its first token, -1 if none; its token ids; which of
    them exist; its slot)."""
    first = tl.load(chunks_ptr + t * BLOCK_M)
    tok = tl.load(chunks_ptr + t * BLOCK_M + tl.arange(0, BLOCK_M))
    slot = tl.load(slots_ptr + t)
    return first, tok.to(tl.int64), tok >= 0, slot


@triton.jit
def _shrink_dot(x_ptr, flat_ptr, a_rows, r_mask, tok, m_mask, in_dim, stride_xt,
                FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr, K_STAGES: tl.constexpr):
    """x[chunk] @ A_tile^T on tensor cores: fp32 [BLOCK_M, BLOCK_R]."""
    v = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in tl.range(0, in_dim, BLOCK_K, num_stages=K_STAGES):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_dim
        a = load_pool_rows(flat_ptr, a_rows, r_mask, offs_k, k_mask)
        v = shrink_dot_step(v, a, x_ptr, tok, m_mask, offs_k, k_mask, stride_xt, FP32)
    return v


@triton.jit
def _shrink_few(x_ptr, flat_ptr, a_rows, r_mask, tok, in_dim, stride_xt, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_STAGES: tl.constexpr,
                FEW_TOKENS: tl.constexpr):
    """x[chunk] @ A_tile^T for a chunk of at most FEW_TOKENS (1 or 2) tokens, on CUDA cores:
    fp32 [BLOCK_M, BLOCK_R], rows past the chunk zero. The tensor-core shrink stages and
    multiplies 16 rows of x for one or two real ones; this loop streams the A tile alone."""
    rows = tl.arange(0, BLOCK_M)
    t0 = tl.sum(tl.where(rows == 0, tok, 0), axis=0)
    t1 = tl.sum(tl.where(rows == 1, tok, 0), axis=0)  # -1: a one-token chunk
    acc0 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, in_dim, BLOCK_K, num_stages=K_STAGES):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_dim
        a = load_pool_rows(flat_ptr, a_rows, r_mask, offs_k, k_mask).to(tl.float32)
        x0 = tl.load(x_ptr + t0 * stride_xt + offs_k, mask=k_mask, other=0.0)
        acc0 += a * x0.to(tl.float32)[None, :]
        if FEW_TOKENS > 1:
            x1 = tl.load(x_ptr + t1 * stride_xt + offs_k, mask=tl.where(t1 >= 0, k_mask, False),
                         other=0.0)
            acc1 += a * x1.to(tl.float32)[None, :]
    v0 = tl.sum(acc0, axis=1)
    v1 = tl.sum(acc1, axis=1)
    return tl.where(rows[:, None] == 0, v0[None, :], tl.where(rows[:, None] == 1, v1[None, :], 0.0))


# n_per_split keeps its specialisation: it is always a multiple of 16, and it tells the
# compiler that the B and y columns of a split start 16-aligned (vector loads)
@triton.jit
def _lora_grouped_kernel(
    y_ptr,
    x_ptr,
    flat_ptr,
    aptr_ptr,
    bptr_ptr,
    ranks_ptr,
    scales_ptr,
    slots_ptr,
    chunks_ptr,
    in_dim,
    n_split,
    n_per_split,
    stride_xt,
    stride_yt,
    stride_ps,
    stride_pm,
    stride_rs,
    mod0,
    mod1,
    mod2,
    out0,
    out1,
    out2,
    yoff0,
    yoff1,
    yoff2,
    ALIGNED: tl.constexpr,
    FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    K_STAGES: tl.constexpr,
    N_STAGES: tl.constexpr,
    FEW_TOKENS: tl.constexpr,
):
    t = tl.program_id(0)
    mod_i = tl.program_id(1)
    r_begin = (tl.program_id(2) // n_split) * BLOCK_R
    n_begin = (tl.program_id(2) % n_split) * n_per_split
    mod = pick_module(mod_i, mod0, mod1, mod2)
    out_dim = pick_module(mod_i, out0, out1, out2)
    y_off = pick_module(mod_i, yoff0, yoff1, yoff2)
    first, tok, m_mask, slot = _chunk(chunks_ptr, slots_ptr, t, BLOCK_M)
    if (first < 0) | (n_begin >= out_dim):  # no chunk of an adapter starts at this token
        return
    rank = tl.load(ranks_ptr + slot * stride_rs + mod)
    if r_begin >= rank:  # past this adapter's true rank (or module not targeted)
        return
    offs_r = r_begin + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    p_rows = slot * stride_ps + mod * stride_pm + offs_r
    a_rows = tl.load(aptr_ptr + p_rows, mask=r_mask, other=0)
    b_rows = tl.load(bptr_ptr + p_rows, mask=r_mask, other=0)
    if ALIGNED:
        a_rows = tl.multiple_of(a_rows, ROW_ALIGN)
        b_rows = tl.multiple_of(b_rows, ROW_ALIGN)
    scale = tl.load(scales_ptr + slot)

    # shrink: v = x[chunk] @ A_tile^T over the whole input dimension (A read once per chunk)
    if FEW_TOKENS == 0:
        v = _shrink_dot(x_ptr, flat_ptr, a_rows, r_mask, tok, m_mask, in_dim, stride_xt, FP32,
                        BLOCK_M, BLOCK_R, BLOCK_K, K_STAGES)
    elif tl.sum(m_mask.to(tl.int32), axis=0) <= FEW_TOKENS:
        v = _shrink_few(x_ptr, flat_ptr, a_rows, r_mask, tok, in_dim, stride_xt, BLOCK_M,
                        BLOCK_R, BLOCK_KC, K_STAGES, FEW_TOKENS)
    else:
        v = _shrink_dot(x_ptr, flat_ptr, a_rows, r_mask, tok, m_mask, in_dim, stride_xt, FP32,
                        BLOCK_M, BLOCK_R, BLOCK_K, K_STAGES)
    if not FP32:
        v = v.to(flat_ptr.dtype.element_ty)

    # expand: y[chunk, cols] += scale * v @ B_tile^T, column tile by column tile
    n_end = tl.minimum(n_begin + n_per_split, out_dim)
    for n in tl.range(n_begin, n_end, BLOCK_N, num_stages=N_STAGES):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        bt = load_pool_rows(flat_ptr, b_rows, r_mask, offs_n, n_mask)
        if FP32:
            d = tl.dot(v, bt, input_precision="ieee") * scale
        else:
            d = tl.dot(v, bt) * scale
        yp = y_ptr + tok[:, None] * stride_yt + y_off + offs_n[None, :]
        ym = m_mask[:, None] & n_mask[None, :]
        tl.atomic_add(yp, d.to(y_ptr.dtype.element_ty), mask=ym, sem="relaxed")


# Launch configuration (a benchmark sweep may override it). block_m: tokens of one adapter per
# program (16: the smallest tensor-core tile); block_r: rank rows per program (capped by the
# slot tables' max rank), wide_block_r once tokens x modules exceed wide_above_rows; A and B
# tiles are block_r x block_k and block_r x block_n, with tile_elems capping their elements
# (registers and shared memory per pipeline stage). Launches of at most few_max_modules modules
# run the shrink of chunks of at most few_tokens tokens on CUDA cores, over block_r x
# (few_tile_elems / block_r) tiles of A (0 tokens: always tensor cores); in q,k,v launches the
# extra registers of that path cost more occupancy than its lighter loop saves.
# (defaults: the fastest of bench_lora_kernels.py --sweep on an H200, docs/BENCHMARKS.md)
GROUPED_CONFIG = {
    "block_m": 16, "block_r": 16, "tile_elems": 8192, "max_block_k": 1024,
    "max_block_n": 1024, "warps": 4, "k_stages": 3, "n_stages": 3, "n_split": 1,
    "wide_block_r": 32, "wide_above_rows": 256,
    "few_tokens": 2, "few_tile_elems": 8192, "few_max_modules": 1,
}  # fmt: skip
MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16
MAX_FEW_TOKENS = 2  # the CUDA-core shrink keeps one accumulator per token: at most this many
# the slot vector the plan scans is padded to at least this many tokens: every batch up to it
# (all decode graph sizes by default) shares one compiled variant; the scan is a few KiB
MIN_T_PAD = 256


def lora_chunks(lora_slots: torch.Tensor) -> torch.Tensor:
    """The chunk plan of a decode batch (int32 [T, block_m]; see the module docstring): one
    launch, no host sync; build it once per step and pass it to every ``add_lora_grouped``."""
    T = int(lora_slots.shape[0]) if lora_slots.dim() == 1 else -1
    check_batch(lora_slots, None, T, lora_slots.device)
    block_m = GROUPED_CONFIG["block_m"]
    chunks = torch.empty((T, block_m), dtype=torch.int32, device=lora_slots.device)
    if T:
        _lora_chunks_kernel[(T,)](lora_slots, chunks, T, T_PAD=max(MIN_T_PAD, next_pow2(T)),
                                  BLOCK_M=block_m)  # fmt: skip
    return chunks


def add_lora_grouped(
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
    lora_slots: torch.Tensor,
    chunks: torch.Tensor | None = None,
    aligned: bool | None = None,
) -> torch.Tensor:
    """Add the LoRA delta of 1-3 modules sharing the input ``x`` [T, in_dim] into ``y`` [T, N]
    in place (and return it); ``lora_slots`` int32 [T], -1 = no adapter. Module ``modules[i]``
    writes columns ``y_offsets[i] : y_offsets[i] + out_dims[i]`` (default: packed from 0, the
    fused q|k|v layout). ``chunks``: ``lora_chunks(lora_slots)``, built once per step (None:
    built here). ``aligned``: every row offset is a multiple of 8 elements (None: checked on
    the device once per table version, a sync that graph capture cannot have)."""
    mods = check_tables(flat, a_ptr, ranks, modules)
    check_tables(flat, b_ptr, ranks, modules, name="b_ptr")
    if b_ptr.shape != a_ptr.shape or b_ptr.stride() != a_ptr.stride():
        raise ValueError("a_ptr and b_ptr must have the same shape and strides")
    check_x(x, flat)
    out_dims, y_offsets = check_y_columns(y, flat, b_ptr, scales, len(mods), out_dims, y_offsets)
    T, in_dim = x.shape
    if y.shape[0] != T:
        raise ValueError(f"y has {y.shape[0]} rows but x has {T}")
    check_batch(lora_slots, None, T, x.device)
    cfg = GROUPED_CONFIG
    if not 0 <= cfg["few_tokens"] <= MAX_FEW_TOKENS:
        raise ValueError(f"few_tokens must be 0..{MAX_FEW_TOKENS}, got {cfg['few_tokens']}")
    if chunks is None:
        chunks = lora_chunks(lora_slots)
    elif (chunks.dtype != torch.int32 or tuple(chunks.shape) != (T, cfg["block_m"])
          or chunks.device != x.device or not chunks.is_contiguous()):  # fmt: skip
        raise ValueError(f"chunks must be lora_chunks(lora_slots): contiguous int32 "
                         f"[{T}, {cfg['block_m']}], got {chunks.dtype} {tuple(chunks.shape)}")
    if T == 0:
        return y
    tile_r = cfg["wide_block_r"] if T * len(mods) > cfg["wide_above_rows"] else cfg["block_r"]
    block_r = max(MIN_DOT_DIM, min(tile_r, next_pow2(a_ptr.shape[2])))
    block_k = max(MIN_DOT_DIM, min(cfg["max_block_k"], cfg["tile_elems"] // block_r,
                                   next_pow2(in_dim)))  # fmt: skip
    block_kc = max(MIN_DOT_DIM, min(cfg["few_tile_elems"] // block_r, next_pow2(in_dim)))
    max_out = max(out_dims)
    want_split = max(1, min(cfg["n_split"], cdiv(max_out, MIN_DOT_DIM)))
    n_per_split = cdiv(cdiv(max_out, want_split), MIN_DOT_DIM) * MIN_DOT_DIM
    n_split = cdiv(max_out, n_per_split)  # after rounding up: no empty splits
    block_n = max(MIN_DOT_DIM, min(cfg["max_block_n"], cfg["tile_elems"] // block_r,
                                   next_pow2(n_per_split)))  # fmt: skip
    if aligned is None:
        aligned = (in_dim % ROW_ALIGN_ELEMS == 0 and all(d % ROW_ALIGN_ELEMS == 0 for d in out_dims)
                   and rows_aligned(flat, a_ptr) and rows_aligned(flat, b_ptr))  # fmt: skip
    m3 = per_module3(mods)
    d3 = per_module3(out_dims)
    o3 = per_module3(y_offsets)
    grid = (T, len(mods), cdiv(a_ptr.shape[2], block_r) * n_split)
    _lora_grouped_kernel[grid](
        y, x, flat, a_ptr, b_ptr, ranks, scales, lora_slots, chunks,
        in_dim, n_split, n_per_split,
        x.stride(0), y.stride(0), a_ptr.stride(0), a_ptr.stride(1), ranks.stride(0),
        m3[0], m3[1], m3[2], d3[0], d3[1], d3[2], o3[0], o3[1], o3[2],
        ALIGNED=bool(aligned),
        FP32=x.dtype == torch.float32,
        BLOCK_M=cfg["block_m"],
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        BLOCK_KC=block_kc,
        K_STAGES=cfg["k_stages"],
        N_STAGES=cfg["n_stages"],
        FEW_TOKENS=cfg["few_tokens"] if len(mods) <= cfg["few_max_modules"] else 0,
        num_warps=cfg["warps"],
    )  # fmt: skip
    return y
