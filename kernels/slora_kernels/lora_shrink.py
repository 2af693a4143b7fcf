"""LoRA shrink: ``v[t, :r] = x[t] @ A_slot(t)^T`` read in place from the unified pool.

One launch serves a whole batch: every token (MBGMV) or segment (MBGMM) reads the A rows of
its own adapter through ``a_ptr`` (no copy to a contiguous stack), with its adapter's TRUE rank:
the rank is split in tiles of BLOCK_R rows and a program whose tile starts at or past the rank
returns at once; the last tile masks the rows past the rank (masked rows are never fetched).
Up to three modules sharing the input (q/k/v, gate/up) run in the same launch (module index in
the grid). The reduction over ``in_dim`` may be split over ``split_k`` programs (more programs in
flight for small batches); the partial sums go to an fp32 buffer
``[n_modules, split_k, T, max_rank]`` that ``lora_expand`` sums while reading (no atomics, no
zero fill). Entries past a token's rank, and rows of tokens without adapter, are left unwritten
and are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_common import (
    ROW_ALIGN,
    ROW_ALIGN_ELEMS,
    LoraSegments,
    cdiv,
    check_batch,
    check_tables,
    check_x,
    load_pool_rows,
    next_pow2,
    num_sms,
    per_module3,
    pick_module,
    rows_aligned,
    shrink_dot_step,
)


# split_k varies per step: no variant when it becomes 1 (Triton's default specialisation of
# integers that are 1 or multiples of 16), which would compile mid-serving. k_per_split keeps
# its specialisation: always a multiple of BLOCK_K, it tells the compiler that each split's
# columns start 16-aligned (vector loads of A)
@triton.jit(do_not_specialize=["split_k"])
def _lora_shrink_kernel(
    x_ptr,
    flat_ptr,
    aptr_ptr,
    ranks_ptr,
    out_ptr,
    slots_ptr,  # MBGMV: lora_slots [T]; MBGMM: seg_slot [S]
    seg_start_ptr,  # MBGMM: [S+1]
    tok_idx_ptr,  # MBGMM with token permutation
    in_dim,
    k_per_split,
    split_k,
    n_rtiles,
    max_rank,
    stride_xt,
    stride_ps,
    stride_pm,
    stride_rs,
    stride_om,
    stride_ok,
    stride_ot,
    mod0,
    mod1,
    mod2,
    GEMM: tl.constexpr,
    HAS_TOK_IDX: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_STAGES: tl.constexpr,
    R_LOOP: tl.constexpr,
):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    pid2 = tl.program_id(2)
    mod_i = pid2 // split_k
    split = pid2 % split_k
    mod = pick_module(mod_i, mod0, mod1, mod2)

    if GEMM:
        seg = pid0 // n_rtiles
        rt = pid0 % n_rtiles
        slot = tl.load(slots_ptr + seg)
        m_begin = tl.load(seg_start_ptr + seg) + pid1 * BLOCK_M
        m_end = tl.load(seg_start_ptr + seg + 1)
        if (slot < 0) | (m_begin >= m_end):
            return
        offs_m = m_begin + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        if HAS_TOK_IDX:
            tok = tl.load(tok_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        else:
            tok = offs_m.to(tl.int64)
    else:
        tok = pid0.to(tl.int64)
        m_mask = tok >= 0  # unused
        rt = pid1
        slot = tl.load(slots_ptr + pid0)
        if slot < 0:
            return

    # the row pointers are fetched before the rank is known (masked by the table size only;
    # rows past the rank are masked below): the rank lookup adds no latency to the chain
    r_begin = rt * BLOCK_R
    offs_r = r_begin + tl.arange(0, BLOCK_R)
    p_row = aptr_ptr + slot * stride_ps + mod * stride_pm
    rows = tl.load(p_row + offs_r, mask=offs_r < max_rank, other=0)
    rank = tl.load(ranks_ptr + slot * stride_rs + mod)
    if r_begin >= rank:  # tile past this adapter's true rank (or module not targeted)
        return
    o_base = out_ptr + mod_i * stride_om + split * stride_ok
    k_begin = split * k_per_split
    _shrink_tile(x_ptr, flat_ptr, o_base, rows, offs_r, offs_r < rank, tok, m_mask, k_begin,
                 k_per_split, in_dim, stride_xt, stride_ot,
                 GEMM, ALIGNED, FP32, BLOCK_M, BLOCK_R, BLOCK_K, K_STAGES)  # fmt: skip
    if R_LOOP:  # one program walks all rank tiles of its token (grid without a rank axis)
        for r in range(BLOCK_R, rank, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            rows = tl.load(p_row + offs_r, mask=r_mask, other=0)
            _shrink_tile(x_ptr, flat_ptr, o_base, rows, offs_r, r_mask, tok, m_mask, k_begin,
                         k_per_split, in_dim, stride_xt, stride_ot,
                         GEMM, ALIGNED, FP32, BLOCK_M, BLOCK_R, BLOCK_K, K_STAGES)  # fmt: skip


@triton.jit
def _shrink_tile(x_ptr, flat_ptr, o_base, rows, offs_r, r_mask, tok, m_mask, k_begin,
                 k_per_split, in_dim, stride_xt, stride_ot,
                 GEMM: tl.constexpr, ALIGNED: tl.constexpr, FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 K_STAGES: tl.constexpr):  # fmt: skip
    """Partial sums over this split's in_dim range for one tile of rank rows; stores them."""
    if ALIGNED:
        rows = tl.multiple_of(rows, ROW_ALIGN)
    offs_k0 = tl.arange(0, BLOCK_K)
    if GEMM:
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k in tl.range(k_begin, k_begin + k_per_split, BLOCK_K, num_stages=K_STAGES):
        offs_k = k + offs_k0
        k_mask = offs_k < in_dim
        a = load_pool_rows(flat_ptr, rows, r_mask, offs_k, k_mask)
        if GEMM:
            acc = shrink_dot_step(acc, a, x_ptr, tok, m_mask, offs_k, k_mask, stride_xt, FP32)
        else:
            xv = tl.load(x_ptr + tok * stride_xt + offs_k, mask=k_mask, other=0.0)
            acc += a.to(tl.float32) * xv.to(tl.float32)[None, :]
    if GEMM:
        tl.store(
            o_base + tok[:, None] * stride_ot + offs_r[None, :],
            acc,
            mask=m_mask[:, None] & r_mask[None, :],
        )
    else:
        tl.store(o_base + tok * stride_ot + offs_r, tl.sum(acc, axis=1), mask=r_mask)


# Launch configurations (a benchmark sweep may override them). ``programs`` below estimates the
# working programs as 2 rank tiles per token/segment tile and module; ``waves`` is how many
# programs per multiprocessor the split of the in_dim reduction aims for.
# k_stages: software-pipelining depth of the in_dim loop (1 = none).
# r_loop (GEMV): one program per token and split walks all its rank tiles (no rank grid axis).
# (defaults: the fastest of bench_lora_kernels.py --sweep on an H100, docs/BENCHMARKS.md)
GEMV_CONFIG = {
    "block_r": 16, "block_k": 256, "warps": 4, "stages": 2, "waves": 4, "k_stages": 3,
    "r_loop": False,
}  # fmt: skip
GEMM_CONFIG = {"block_r": 16, "block_k": 128, "warps": 4, "stages": 3, "waves": 2, "k_stages": 2}
# MBGMM: the expand kernel holds a [split_k, BLOCK_M, BLOCK_R] fp32 tile of the partial sums in
# shared memory, so split_k * BLOCK_M is capped (at BLOCK_M 64, split 16 needed 276 KiB on an
# H200, whose limit is 227 KiB: a few short prefill segments asked for that much split)
GEMM_MAX_SPLIT_ROWS = 256


def mbgmm_block_m(max_seg_len: int) -> int:
    """MBGMM's token tile (BLOCK_M) for segments of at most `max_seg_len` tokens; the shrink
    and the expand of one launch must use the same (the partial-sum buffer is laid out by it)."""
    return 64 if max_seg_len > 32 else (32 if max_seg_len > 16 else 16)


def _pick_split_k(
    in_dim: int, block_k: int, programs: int, waves: int, device: torch.device
) -> int:
    """Split the in_dim reduction until about ``waves`` programs per SM are in flight."""
    max_split = cdiv(in_dim, block_k)
    want = cdiv(waves * num_sms(device), max(programs, 1))
    split = 1
    while split < want and split * 2 <= max_split and split < 32:
        split *= 2
    return split


def lora_shrink(
    x: torch.Tensor,
    flat: torch.Tensor,
    a_ptr: torch.Tensor,
    ranks: torch.Tensor,
    modules: Sequence[int],
    *,
    lora_slots: torch.Tensor | None = None,
    segments: LoraSegments | None = None,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    aligned: bool | None = None,
) -> torch.Tensor:
    """Shrink for 1-3 modules that share the input ``x`` [T, in_dim].

    MBGMV (decode) with ``lora_slots`` int32 [T] (-1 = no adapter), MBGMM (prefill) with
    ``segments`` (:func:`make_lora_segments`). Returns the fp32 partial-sum buffer
    ``[len(modules), split_k, T, max_rank]`` (``max_rank = a_ptr.shape[2]``) for
    :func:`lora_expand`. ``aligned``: rows start at multiples of 8 elements (None: checked once
    per table version, see ``rows_aligned``).
    """
    mods = check_tables(flat, a_ptr, ranks, modules)
    check_x(x, flat)
    T, in_dim = x.shape
    mode = check_batch(lora_slots, segments, T, x.device)
    max_rank = a_ptr.shape[2]
    gemm = mode == "gemm"
    if gemm:
        cfg = GEMM_CONFIG
        block_m = mbgmm_block_m(segments.max_seg_len)
        m_tiles = cdiv(max(segments.max_seg_len, 1), block_m)
        programs = segments.num_segments * m_tiles * len(mods) * 2
    else:
        cfg = GEMV_CONFIG
        block_m = 1
        programs = T * len(mods) * (1 if cfg.get("r_loop") else 2)
    block_r, block_k = cfg["block_r"], cfg["block_k"]
    block_k = min(block_k, max(16, next_pow2(in_dim)))
    if split_k is None:
        split_k = _pick_split_k(in_dim, block_k, programs, cfg["waves"], x.device)
    if gemm:
        split_k = min(split_k, max(1, GEMM_MAX_SPLIT_ROWS // block_m))
    k_per_split = cdiv(cdiv(in_dim, split_k), block_k) * block_k
    split_k = cdiv(in_dim, k_per_split)  # no empty splits
    r_loop = (not gemm) and cfg.get("r_loop", False)
    n_rtiles = 1 if r_loop else cdiv(max_rank, block_r)

    shape = (len(mods), split_k, T, max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 buffer of shape {shape}")
    if T == 0 or (gemm and segments.num_segments == 0):
        return out
    if aligned is None:
        aligned = in_dim % ROW_ALIGN_ELEMS == 0 and rows_aligned(flat, a_ptr)
    m3 = per_module3(mods)
    if gemm:
        grid = (segments.num_segments * n_rtiles, m_tiles, len(mods) * split_k)
        slots_t, seg_start = segments.seg_slot, segments.seg_start
        tok_idx = segments.token_idx if segments.token_idx is not None else seg_start
    else:
        grid = (T, n_rtiles, len(mods) * split_k)
        slots_t, seg_start, tok_idx = lora_slots, lora_slots, lora_slots
    _lora_shrink_kernel[grid](
        x, flat, a_ptr, ranks, out,
        slots_t, seg_start, tok_idx,
        in_dim, k_per_split, split_k, n_rtiles, max_rank,
        x.stride(0), a_ptr.stride(0), a_ptr.stride(1), ranks.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        m3[0], m3[1], m3[2],
        GEMM=gemm,
        HAS_TOK_IDX=gemm and segments.token_idx is not None,
        ALIGNED=bool(aligned),
        FP32=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        K_STAGES=cfg["k_stages"],
        R_LOOP=r_loop,
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# reference


def gather_rows(flat: torch.Tensor, ptrs: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``flat[p : p + length]`` for each p in ``ptrs`` -> [len(ptrs), length]."""
    idx = ptrs.to(torch.int64)[:, None] + torch.arange(length, device=flat.device)[None, :]
    return flat[idx]


def lora_shrink_ref(
    x: torch.Tensor,
    flat: torch.Tensor,
    a_ptr: torch.Tensor,
    ranks: torch.Tensor,
    modules: Sequence[int],
    lora_slots: torch.Tensor,
) -> torch.Tensor:
    """float64 reference: ``v[i, t, :r] = x[t] @ A^T`` of module ``modules[i]``.

    Returns [n_mod, T, max_rank].

    Entries past the rank and rows of tokens without adapter are 0.
    """
    T, in_dim = x.shape
    v = torch.zeros(len(modules), T, a_ptr.shape[2], dtype=torch.float64, device=x.device)
    slots = lora_slots.to(torch.int64)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        toks = torch.nonzero(slots == s).flatten()
        for i, m in enumerate(modules):
            r = int(ranks[s, m])
            if r == 0:
                continue
            a = gather_rows(flat, a_ptr[s, m, :r], in_dim).double()
            v[i, toks, :r] = x[toks].double() @ a.T
    return v
