"""LoRA expand: ``y[t, off:off+out] += scale_s * v[t, :r] @ B^T_s`` read in place from the pool.

``v`` is the fp32 partial-sum buffer of :func:`slora_kernels.lora_shrink.lora_shrink`
(``[n_modules, split_k, T, max_rank]``); the split partials are summed here while loading.
The loop over the rank stops at each adapter's TRUE rank (tiles of BLOCK_R, last one masked).
All split partials of a rank chunk are loaded at once (no serial chain of loads).
Up to three modules in one launch, each adding into its own column range of ``y`` (fused
q/k/v or gate/up output). Tokens with slot -1 (and modules with rank 0) leave ``y`` untouched.
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
    check_y_columns,
    load_pool_rows,
    next_pow2,
    per_module3,
    pick_module,
    rows_aligned,
)
from .lora_shrink import GEMM_MAX_SPLIT_ROWS, gather_rows, mbgmm_block_m


@triton.jit
def _v_chunk(v_base, tok, offs_r, load_mask, m_mask, split_k, stride_vk, stride_vt,
             GEMM: tl.constexpr, SPLIT_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_R: tl.constexpr):  # fmt: skip
    """Sum of the shrink's split partials for rank rows ``offs_r``: all splits in flight at once."""
    if GEMM:
        vp = v_base + tok[:, None] * stride_vt + offs_r[None, :]
        vm = m_mask[:, None] & load_mask[None, :]
        v = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in tl.static_range(SPLIT_PAD):
            s_ok = (offs_r * 0 + s) < split_k  # the split exists (as a tensor: a mask operand)
            v += tl.load(vp + s * stride_vk, mask=vm & s_ok[None, :], other=0.0)
    else:
        offs_s = tl.arange(0, SPLIT_PAD)
        vp = v_base + tok * stride_vt + offs_s[:, None] * stride_vk + offs_r[None, :]
        vm = (offs_s < split_k)[:, None] & load_mask[None, :]
        v = tl.sum(tl.load(vp, mask=vm, other=0.0), axis=0)
    return v


@triton.jit
def _b_chunk(acc, flat_ptr, rows, r_mask, v, offs_n, n_mask,
             GEMM: tl.constexpr, ALIGNED: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    """acc += v[:, r] @ Bt[r, n] for the rank rows of one chunk (rows past the rank masked)."""
    if ALIGNED:
        rows = tl.multiple_of(rows, ROW_ALIGN)
    bt = load_pool_rows(flat_ptr, rows, r_mask, offs_n, n_mask)
    if GEMM:
        v = tl.where(r_mask[None, :], v, 0.0)
        if FP32:
            acc += tl.dot(v, bt, input_precision="ieee")
        else:
            acc += tl.dot(v.to(bt.dtype), bt)
    else:
        v = tl.where(r_mask, v, 0.0)
        acc += tl.sum(bt.to(tl.float32) * v[:, None], axis=0)
    return acc


# per-step values: no recompilation when they become 1 or a multiple of 16 (Triton's
# default specialisation), which would compile new variants in the middle of serving
@triton.jit(do_not_specialize=["n_mtiles", "split_k"])
def _lora_expand_kernel(
    y_ptr,
    v_ptr,
    flat_ptr,
    bptr_ptr,
    ranks_ptr,
    scales_ptr,
    slots_ptr,
    seg_start_ptr,
    tok_idx_ptr,
    n_mtiles,
    split_k,
    max_rank,
    stride_yt,
    stride_ps,
    stride_pm,
    stride_rs,
    stride_vm,
    stride_vk,
    stride_vt,
    mod0,
    mod1,
    mod2,
    out0,
    out1,
    out2,
    yoff0,
    yoff1,
    yoff2,
    GEMM: tl.constexpr,
    HAS_TOK_IDX: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP32: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_ITERS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid1 = tl.program_id(1)
    pid2 = tl.program_id(2)
    if GEMM:
        mod_i = pid2 // n_mtiles
        mt = pid2 % n_mtiles
    else:
        mod_i = pid2
    mod = pick_module(mod_i, mod0, mod1, mod2)
    out_dim = pick_module(mod_i, out0, out1, out2)
    y_off = pick_module(mod_i, yoff0, yoff1, yoff2)
    n_begin = pid_n * (BLOCK_N * N_ITERS)
    if n_begin >= out_dim:
        return

    if GEMM:
        slot = tl.load(slots_ptr + pid1)
        m_begin = tl.load(seg_start_ptr + pid1) + mt * BLOCK_M
        m_end = tl.load(seg_start_ptr + pid1 + 1)
        if (slot < 0) | (m_begin >= m_end):
            return
        offs_m = m_begin + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        if HAS_TOK_IDX:
            tok = tl.load(tok_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        else:
            tok = offs_m.to(tl.int64)
    else:
        tok = pid1.to(tl.int64)
        m_mask = tok >= 0  # unused
        slot = tl.load(slots_ptr + pid1)
        if slot < 0:
            return

    # the first rank chunk's row pointers and v are fetched before the rank is known (masked by
    # the table size only; rows past the rank are masked below), so the rank lookup is not one
    # more latency in the chain slot -> rank -> pointers -> B. They serve all N_ITERS tiles.
    p_base = bptr_ptr + slot * stride_ps + mod * stride_pm
    v_base = v_ptr + mod_i * stride_vm
    offs_r = tl.arange(0, BLOCK_R)
    pre_mask = offs_r < max_rank
    rows0 = tl.load(p_base + offs_r, mask=pre_mask, other=0)
    v0 = _v_chunk(v_base, tok, offs_r, pre_mask, m_mask, split_k, stride_vk, stride_vt,
                  GEMM, SPLIT_PAD, BLOCK_M, BLOCK_R)  # fmt: skip
    rank = tl.load(ranks_ptr + slot * stride_rs + mod)
    scale = tl.load(scales_ptr + slot)
    if rank == 0:
        return
    r_mask0 = offs_r < rank
    for nt in tl.static_range(N_ITERS):
        offs_n = n_begin + nt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out_dim
        if GEMM:
            yp = y_ptr + tok[:, None] * stride_yt + y_off + offs_n[None, :]
            ym = m_mask[:, None] & n_mask[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            yp = y_ptr + tok * stride_yt + y_off + offs_n
            ym = n_mask
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        y = tl.load(yp, mask=ym, other=0.0).to(tl.float32)  # independent of B: loads overlap
        acc = _b_chunk(acc, flat_ptr, rows0, r_mask0, v0, offs_n, n_mask, GEMM, ALIGNED, FP32)
        for r in range(BLOCK_R, rank, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            rows = tl.load(p_base + offs_r, mask=r_mask, other=0)
            v = _v_chunk(v_base, tok, offs_r, r_mask, m_mask, split_k, stride_vk, stride_vt,
                         GEMM, SPLIT_PAD, BLOCK_M, BLOCK_R)  # fmt: skip
            acc = _b_chunk(acc, flat_ptr, rows, r_mask, v, offs_n, n_mask, GEMM, ALIGNED, FP32)
        tl.store(yp, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=ym)


# Launch configurations (a benchmark sweep may override them). GEMV: BLOCK_N is block_n_small
# when a batch has fewer than 16 tokens, so that few tokens still get many programs;
# n_iters (GEMV): output tiles per program, sharing the program's table lookups.
# (defaults: the fastest of bench_lora_kernels.py --sweep on an H100 (GEMV) and an H200
# (GEMM: --sweep mbgmm-expand), docs/BENCHMARKS.md)
GEMV_CONFIG = {
    "block_r": 16, "block_n": 128, "block_n_small": 128, "n_iters": 1, "warps": 4, "stages": 2
}  # fmt: skip
GEMM_CONFIG = {"block_r": 16, "block_n": 256, "warps": 4, "stages": 2}
# MBGMM unrolls its split-partial loads to the largest split the shrink may use at that BLOCK_M
# (GEMM_MAX_SPLIT_ROWS // BLOCK_M; loads past the real split are masked): one compiled variant
# per BLOCK_M, not one per split of the step, so serving does not hit JIT compiles mid-run


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    flat: torch.Tensor,
    b_ptr: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    modules: Sequence[int],
    out_dims: Sequence[int],
    y_offsets: Sequence[int] | None = None,
    *,
    lora_slots: torch.Tensor | None = None,
    segments: LoraSegments | None = None,
    aligned: bool | None = None,
) -> torch.Tensor:
    """Add the LoRA delta into ``y`` [T, N] in place (and return it).

    Module ``modules[i]`` writes columns ``y_offsets[i] : y_offsets[i] + out_dims[i]``
    (default offsets: out_dims packed from column 0, i.e. the fused q|k|v layout). ``v`` is the
    buffer returned by ``lora_shrink`` for the same modules and the same batch description
    (``lora_slots`` or ``segments``).
    """
    mods = check_tables(flat, b_ptr, ranks, modules, name="b_ptr")
    out_dims, y_offsets = check_y_columns(y, flat, b_ptr, scales, len(mods), out_dims, y_offsets)
    T = y.shape[0]
    if v.device != flat.device:
        raise ValueError("v and the pool must be on the same device")
    if (
        v.dtype != torch.float32
        or v.dim() != 4
        or v.shape[0] != len(mods)
        or v.shape[2] != T
        or v.shape[3] != b_ptr.shape[2]
        or not v.is_contiguous()
    ):
        raise ValueError(
            f"v must be the contiguous fp32 buffer [{len(mods)}, split_k, {T}, {b_ptr.shape[2]}] "
            f"from lora_shrink, got {v.dtype} {tuple(v.shape)}"
        )
    mode = check_batch(lora_slots, segments, T, y.device)
    if T == 0:
        return y
    gemm = mode == "gemm"
    split_k = v.shape[1]
    max_out = max(out_dims)
    if gemm:
        if segments.num_segments == 0:
            return y
        cfg = GEMM_CONFIG
        block_m = mbgmm_block_m(segments.max_seg_len)
        if split_k > GEMM_MAX_SPLIT_ROWS // block_m:
            raise ValueError(f"v has {split_k} splits; MBGMM at BLOCK_M {block_m} takes at most "
                             f"{GEMM_MAX_SPLIT_ROWS // block_m} (lora_shrink caps it)")
        block_n = cfg["block_n"]
        n_mtiles = cdiv(max(segments.max_seg_len, 1), block_m)
        n_rows = segments.num_segments
        slots_t, seg_start = segments.seg_slot, segments.seg_start
        tok_idx = segments.token_idx if segments.token_idx is not None else seg_start
    else:
        cfg = GEMV_CONFIG
        block_m, n_mtiles, n_rows = 1, 1, T
        block_n = cfg["block_n_small"] if T < 16 else cfg["block_n"]
        slots_t, seg_start, tok_idx = lora_slots, lora_slots, lora_slots
    block_n = min(block_n, max(16, next_pow2(max_out)))
    n_iters = 1 if gemm else cfg["n_iters"]
    grid = (cdiv(max_out, block_n * n_iters), n_rows, len(mods) * n_mtiles)
    if aligned is None:
        aligned = all(d % ROW_ALIGN_ELEMS == 0 for d in out_dims) and rows_aligned(flat, b_ptr)
    m3 = per_module3(mods)
    d3 = per_module3(out_dims)
    o3 = per_module3(y_offsets)
    _lora_expand_kernel[grid](
        y, v, flat, b_ptr, ranks, scales,
        slots_t, seg_start, tok_idx,
        n_mtiles, split_k, b_ptr.shape[2],
        y.stride(0), b_ptr.stride(0), b_ptr.stride(1), ranks.stride(0),
        v.stride(0), v.stride(1), v.stride(2),
        m3[0], m3[1], m3[2], d3[0], d3[1], d3[2], o3[0], o3[1], o3[2],
        GEMM=gemm,
        HAS_TOK_IDX=gemm and segments.token_idx is not None,
        ALIGNED=bool(aligned),
        FP32=y.dtype == torch.float32,
        SPLIT_PAD=GEMM_MAX_SPLIT_ROWS // block_m if gemm else next_pow2(split_k),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=cfg["block_r"],
        N_ITERS=n_iters,
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )  # fmt: skip
    return y


def lora_expand_ref(
    y: torch.Tensor,
    v: torch.Tensor,
    flat: torch.Tensor,
    b_ptr: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    modules: Sequence[int],
    out_dims: Sequence[int],
    y_offsets: Sequence[int] | None,
    lora_slots: torch.Tensor,
) -> torch.Tensor:
    """float64 reference; ``v`` [n_mod, T, max_rank] (summed over splits). Returns a new y."""
    if y_offsets is None:
        y_offsets = [sum(out_dims[:i]) for i in range(len(out_dims))]
    out = y.double().clone()
    slots = lora_slots.to(torch.int64)
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        toks = torch.nonzero(slots == s).flatten()
        for i, (m, d, o) in enumerate(zip(modules, out_dims, y_offsets)):
            r = int(ranks[s, m])
            if r == 0:
                continue
            bt = gather_rows(flat, b_ptr[s, m, :r], d).double()
            out[toks, o : o + d] += float(scales[s]) * (v[i, toks, :r].double() @ bt)
    return out
