#!/usr/bin/env python3
"""Benchmark of the LoRA kernels (MBGMV decode, MBGMM prefill) against torch baselines.

Shape: one 4096 -> 4096 module (q_proj), fp16, adapters of ranks {8, 16, 32, 64} round-robin
packed as rows in scattered pages of a pool shaped like Llama-7B's (page = 16 tokens x 32 KV
heads x 128 x K/V = 131072 elements); slot tables sized for ``--max-rank`` (default 64, the
engine's default ``max_rank``).

- decode: M tokens in {1, 8, 32, 128, 256}, token i uses adapter i % 128 (each token a
  different adapter up to 128 distinct);
- prefill: 8 sequences x 256 tokens, sequence i on adapter i.

Compared in the same run:
- ours: ``add_lora`` as the engine calls it eagerly: MBGMM shrink + expand for prefill (the
  mixed-step CUDA graphs run prefill tokens through the grouped MBGMV instead, with the chunk
  plan built once per step: the prefill case's "grouped" column); for decode the
  per-token MBGMV (shrink + expand, two launches) below ``GROUPED_MIN_TOKENS`` tokens, the
  grouped MBGMV (one launch, each adapter read once) from there, with the chunk plan built
  beforehand (once per step in the engine). Decode also shows each of the two alone (the
  grouped one with its plan inside the call), and MBGMM over tokens sorted by adapter;
- torch "padded": gather the A/B rows of the batch's adapters padded to the batch's max rank,
  tokens grouped per adapter (padded to the largest group), two bmm, index_add into y;
- torch "loop": a loop over the batch's adapters gathering each one's true-rank rows;
- the byte floor: bytes of x, of y (read and written: y += delta), and of the true-rank A and B
  of the adapters touched, each once, over the measured device copy rate (bytes read + written
  by a 1 GiB device-to-device copy);
- the grouped MBGMV with one phase made negligible (``x`` or ``y`` 16 wide): the time of its
  shrink alone and of its expand alone;
- the latency floor: one launch of a kernel that only walks the chain of dependent loads in
  front of a LoRA program's first byte of A (slot -> rank -> row pointer -> row, one program
  per token, L2 flushed): what no one-launch kernel avoids before its bytes stream;
- two references for the floor's bytes on the same timer: a device-to-device copy moving as
  many bytes (no kernel moves them faster: its fixed launch, ramp and drain costs included),
  and a "row stream", a Triton kernel that only reads the true-rank A and B rows of the
  touched adapters, 16 rows per program, pipelined like the LoRA kernels.

Times: device time, median of 100 runs, each after a 256 MB L2 flush and a 0.1 ms device
sleep that lets the host launch ahead (``slora_testing.kernel_pools.gpu_time_us``: CUDA events; the
launch overhead of the Python launchers is not in it). A second table gives the wall time per
call of back-to-back eager calls (host overhead included, L2 warm). Each implementation is
checked against the float64 reference first. Prints markdown tables; saves a PNG and a JSON
under --out (default bench/results). ``--sweep`` first searches launch configurations and keeps
the fastest: ``grouped`` (the grouped MBGMV, coordinate search over decode batches of one
module and q,k,v-fused batches shaped like the engine's), ``mbgmm-expand`` (the prefill expand,
coordinate search) and ``shrink-expand`` (a fixed list for the per-token and MBGMM shrink /
per-token expand); a comma list, all three by default.

    python bench/bench_lora_kernels.py [--out DIR] [--sweep [KINDS]] [--max-rank R]
        [--cases decode,prefill]
Without CUDA it runs a small correctness pass of the same code paths under the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():  # before triton is imported: it reads the switch once
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from slora_kernels import (  # noqa: E402
    add_lora,
    add_lora_grouped,
    add_lora_ref,
    decode_chunks,
    lora_chunks,
    lora_expand,
    lora_shrink,
    make_lora_segments,
)
from slora_testing.kernel_pools import call_time_us, gpu_time_us, make_lora_pool, measure_copy_rate  # noqa: E402

# the launchers' modules (the package re-exports functions of the same names)
SHRINK_MOD = sys.modules["slora_kernels.lora_shrink"]
EXPAND_MOD = sys.modules["slora_kernels.lora_expand"]
GROUPED_MOD = sys.modules["slora_kernels.lora_grouped"]

RANKS = (8, 16, 32, 64)
MAX_RANK = 64  # the engine's default max_rank (slot tables [slots, 7, max_rank])


def build_pool(n_adapters, hidden, page_elems, dtype, device, max_rank, seed=0, n_modules=1):
    """Adapters of ranks RANKS round robin on the first ``n_modules`` modules (hidden -> hidden)."""
    gen = torch.Generator().manual_seed(seed)
    slot_ranks = [[RANKS[i % len(RANKS)]] * n_modules + [0] * (7 - n_modules)
                  for i in range(n_adapters)]  # fmt: skip
    dims = [(hidden, hidden)] * 7
    pool = make_lora_pool(
        slot_ranks, dims, page_elems=page_elems, dtype=dtype, device=device, gen=gen,
        max_rank=max_rank, extra_pages=2 * n_adapters,
    )  # fmt: skip
    return gen, pool


class TorchPadded:
    """Gather each adapter's rows padded to the batch's max rank, bmm over adapters."""

    def __init__(self, slots, a_ptr, b_ptr, ranks, scales, hidden, device):
        slots = slots.tolist()
        uniq = sorted({s for s in slots if s >= 0})
        groups = [[t for t, s in enumerate(slots) if s == u] for u in uniq]
        G = max(len(g) for g in groups)
        R = max(int(ranks[u, 0]) for u in uniq)
        x_idx = torch.zeros(len(uniq), G, dtype=torch.int64)
        valid = torch.zeros(len(uniq), G, dtype=torch.bool)
        for i, g in enumerate(groups):
            x_idx[i, : len(g)] = torch.tensor(g)
            valid[i, : len(g)] = True
        u_t = torch.tensor(uniq)
        self.a_rows = (a_ptr[u_t, 0, :R].cpu() // hidden).to(device)
        self.b_rows = (b_ptr[u_t, 0, :R].cpu() // hidden).to(device)
        rk = ranks[u_t, 0].cpu().to(torch.int64)
        vscale = (torch.arange(R)[None, :] < rk[:, None]).float() * scales[u_t].cpu()[:, None]
        self.vscale = vscale[:, None, :].to(device)  # mask past the rank and LoRA scale, [U, 1, R]
        self.x_idx = x_idx.to(device)
        self.valid = valid.to(device)
        self.out_tok = x_idx[valid].to(device)
        self.hidden = hidden

    def __call__(self, y, x, flat):
        rows = flat.view(-1, self.hidden)
        A = rows[self.a_rows]  # [U, R, H]
        B = rows[self.b_rows]
        X = x[self.x_idx]  # [U, G, H]
        V = (torch.bmm(X, A.transpose(1, 2)).float() * self.vscale).to(x.dtype)
        Yd = torch.bmm(V, B)  # [U, G, H]
        y.index_add_(0, self.out_tok, Yd[self.valid])
        return y


class TorchLoop:
    """A loop over the batch's adapters with each one's true-rank rows."""

    def __init__(self, slots, a_ptr, b_ptr, ranks, scales, hidden, device):
        slots = slots.tolist()
        self.groups = []
        for u in sorted({s for s in slots if s >= 0}):
            toks = [t for t, s in enumerate(slots) if s == u]
            r = int(ranks[u, 0])
            if toks == list(range(toks[0], toks[-1] + 1)):
                sel = slice(toks[0], toks[-1] + 1)
            else:
                sel = torch.tensor(toks, device=device)
            self.groups.append(
                (
                    sel,
                    (a_ptr[u, 0, :r] // hidden).to(device),
                    (b_ptr[u, 0, :r] // hidden).to(device),
                    float(scales[u]),
                )
            )
        self.hidden = hidden

    def __call__(self, y, x, flat):
        rows = flat.view(-1, self.hidden)
        for sel, ar, br, sc in self.groups:
            y[sel] += ((x[sel] @ rows[ar].T) @ rows[br]) * sc
        return y


@triton.jit
def _chain_kernel(slots_ptr, ranks_ptr, aptr_ptr, flat_ptr, out_ptr, stride_rs, stride_ps):
    """The dependent loads in front of any LoRA program's first byte of A (slot -> rank -> row
    pointer -> row), and nothing else: one program per token."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    rank = tl.load(ranks_ptr + slot * stride_rs)
    row = tl.load(aptr_ptr + slot * stride_ps + rank - 1)
    tl.store(out_ptr + t, tl.load(flat_ptr + row))


def latency_floor_us(slots_d, pool):
    """Device time of ``_chain_kernel``: a launch plus four dependent memory round trips from a
    flushed L2, a lower bound for any one-launch MBGMV before its bytes stream."""
    flat, a_ptr, _, ranks, _ = pool
    out = torch.empty(slots_d.shape[0], dtype=flat.dtype, device=flat.device)
    return gpu_time_us(lambda: _chain_kernel[(slots_d.shape[0],)](
        slots_d, ranks, a_ptr, flat, out, ranks.stride(0), a_ptr.stride(0)))  # fmt: skip


STREAM_ROWS = 16  # rows per program of the row stream: the grouped MBGMV's narrow rank tile
STREAM_BLOCK_K = 512


@triton.jit
def _row_stream_kernel(flat_ptr, rows_ptr, out_ptr, n_rows, row_len,
                       BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Read whole pool rows and nothing else (a sum keeps the loads): one program per
    BLOCK_ROWS rows, the k loop pipelined as the LoRA kernels' are."""
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r_mask = offs_r < n_rows
    rows = tl.multiple_of(tl.load(rows_ptr + offs_r, mask=r_mask, other=0), 8)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, row_len, BLOCK_K, num_stages=3):
        offs_k = k + tl.arange(0, BLOCK_K)
        acc += tl.load(flat_ptr + rows[:, None] + offs_k[None, :],
                       mask=r_mask[:, None] & (offs_k < row_len)[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_r, tl.sum(acc, axis=1), mask=r_mask)


def row_stream(slots, pool, hidden):
    """A launcher of ``_row_stream_kernel`` over the true-rank A and B rows of the adapters
    ``slots`` touch (module 0), checked once against torch."""
    flat, a_ptr, b_ptr, ranks, _ = pool
    uniq = sorted({s for s in slots.tolist() if s >= 0})
    rows = torch.cat([torch.cat([a_ptr[u, 0, : int(ranks[u, 0])], b_ptr[u, 0, : int(ranks[u, 0])]])
                      for u in uniq])  # fmt: skip
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=flat.device)
    grid = (triton.cdiv(rows.shape[0], STREAM_ROWS),)

    def launch():
        _row_stream_kernel[grid](flat, rows, out, rows.shape[0], hidden, BLOCK_ROWS=STREAM_ROWS,
                                 BLOCK_K=min(STREAM_BLOCK_K, triton.next_power_of_2(hidden)))

    launch()
    want = flat[rows[:, None] + torch.arange(hidden, device=flat.device)].float().sum(1)
    if not torch.allclose(out, want, rtol=1e-3, atol=1e-2):
        raise SystemExit("the row stream did not read the adapters' rows")
    return launch


def byte_references_us(slots, pool, hidden, nbytes):
    """Two references for the bytes a case must move, on the same timer as the kernels:
    (a device-to-device copy moving ``nbytes`` in all (half read, half written): no kernel
    moves them faster; ``row_stream``: what only reading the adapters' pool rows costs)."""
    src = torch.empty(nbytes // 4, dtype=torch.float16, device=pool[0].device)
    dst = torch.empty_like(src)
    return gpu_time_us(lambda: dst.copy_(src)), gpu_time_us(row_stream(slots, pool, hidden))


PHASE_DIM = 16  # an x or y this narrow makes the shrink or the expand negligible


def grouped_phases_us(slots_d, pool, hidden, dtype, gen):
    """Device time of the grouped MBGMV with one phase made negligible: (shrink alone: in
    hidden -> out 16, expand alone: in 16 -> out hidden), the chunk plan built beforehand."""
    flat, a_ptr, b_ptr, ranks, scales = pool
    M = slots_d.shape[0]
    chunks = lora_chunks(slots_d)
    times = []
    for i, o in ((hidden, PHASE_DIM), (PHASE_DIM, hidden)):
        x = torch.randn(M, i, generator=gen).to(flat.device, dtype)
        y = torch.randn(M, o, generator=gen).to(flat.device, dtype)
        times.append(gpu_time_us(lambda x=x, y=y, o=o: add_lora_grouped(
            y, x, flat, a_ptr, b_ptr, ranks, scales, (0,), [o], lora_slots=slots_d,
            chunks=chunks)))  # fmt: skip
    return times


def floor_bytes(slots, ranks, hidden, elem):
    uniq = {s for s in slots.tolist() if s >= 0}
    ab = sum(2 * int(ranks[u, 0]) * hidden for u in uniq) * elem
    M = slots.shape[0]
    return M * hidden * elem * 3 + ab  # x once, y read + written, true-rank A and B once


def run_case(name, slots, pool, hidden, device, dtype, gen, timed, results, rate):
    flat, a_ptr, b_ptr, ranks, scales = pool
    M = slots.shape[0]
    slots_d = slots.to(device)
    x = torch.randn(M, hidden, generator=gen).to(device, dtype)
    y0 = torch.randn(M, hidden, generator=gen).to(device, dtype)
    mods, outs = (0,), [hidden]
    seg = make_lora_segments(slots, sort=True, device=device)
    impls = {}
    chunks = decode_chunks(slots_d) if name.startswith("decode") else None
    if name.startswith("decode"):
        impls["ours"] = lambda y: add_lora(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, lora_slots=slots_d,
            chunks=chunks,
        )  # fmt: skip
        impls["ours_mbgmm_sorted"] = lambda y: add_lora(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, segments=seg
        )
        impls["ours_per_token"] = lambda y: add_lora(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, lora_slots=slots_d,
            grouped=False,
        )  # fmt: skip
        impls["ours_grouped"] = lambda y: add_lora_grouped(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, lora_slots=slots_d,
            chunks=lora_chunks(slots_d),
        )  # fmt: skip
    else:
        impls["ours"] = lambda y: add_lora(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, segments=seg
        )
        # what the engine's mixed-step CUDA graphs run: per-token slots, the chunk plan built
        # once per step beforehand
        prefill_chunks = lora_chunks(slots_d)
        impls["ours_grouped"] = lambda y: add_lora_grouped(
            y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, lora_slots=slots_d,
            chunks=prefill_chunks,
        )  # fmt: skip
    padded = TorchPadded(slots, a_ptr, b_ptr, ranks, scales, hidden, device)
    loop = TorchLoop(slots, a_ptr, b_ptr, ranks, scales, hidden, device)
    impls["torch_padded"] = lambda y: padded(y, x, flat)
    impls["torch_loop"] = lambda y: loop(y, x, flat)

    ref = add_lora_ref(y0, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs, None, slots_d)
    if not timed:  # the CPU pass checks the timed reference kernels too
        row_stream(slots, pool, hidden)
    delta = (ref - y0.double()).norm()
    row = {"case": name, "M": M, "adapters": len({s for s in slots.tolist() if s >= 0})}
    for k, fn in impls.items():
        out = fn(y0.clone())
        err = ((out.double() - ref).norm() / delta).item()
        row[f"{k}_err"] = err
        if not err < 2e-2:
            raise SystemExit(f"{name}: {k} is wrong (relative error {err:.3e})")
    if timed:
        for k, fn in impls.items():
            y = y0.clone()
            row[f"{k}_us"] = gpu_time_us(lambda fn=fn, y=y: fn(y))
            y = y0.clone()
            iters = 50 if k == "torch_loop" else 200
            row[f"{k}_call_us"] = call_time_us(lambda fn=fn, y=y: fn(y), iters=iters)
        # the same version timed twice: the spread is the noise level
        y = y0.clone()
        row["ours_us_again"] = gpu_time_us(lambda: impls["ours"](y))
        kw = {"lora_slots": slots_d} if name.startswith("decode") else {"segments": seg}
        v = lora_shrink(x, flat, a_ptr, ranks, mods, **kw)
        row["split_k"] = v.shape[1]
        row["shrink_us"] = gpu_time_us(lambda: lora_shrink(x, flat, a_ptr, ranks, mods, **kw))
        y = y0.clone()
        row["expand_us"] = gpu_time_us(
            lambda: lora_expand(y, v, flat, b_ptr, ranks, scales, mods, outs, **kw)
        )
        row["ours_unaligned_us"] = gpu_time_us(
            lambda: lora_expand(
                y, lora_shrink(x, flat, a_ptr, ranks, mods, aligned=False, **kw),
                flat, b_ptr, ranks, scales, mods, outs, aligned=False, **kw,
            )
        )  # fmt: skip
        nbytes = floor_bytes(slots, ranks, hidden, x.element_size())
        row["floor_bytes"] = nbytes
        row["floor_us"] = 1e6 * nbytes / rate
        row["ours_pct_floor"] = 100 * row["floor_us"] / row["ours_us"]
        row["latency_floor_us"] = latency_floor_us(slots_d, pool)
        row["copy_us"], row["row_stream_us"] = byte_references_us(slots, pool, hidden, nbytes)
        for k in ("ours", "ours_grouped"):
            if f"{k}_us" in row:
                row[f"{k}_pct_copy"] = 100 * row["copy_us"] / row[f"{k}_us"]
        if "ours_grouped_us" in row:
            row["grouped_pct_floor"] = 100 * row["floor_us"] / row["ours_grouped_us"]
            row["chunks_us"] = gpu_time_us(lambda: lora_chunks(slots_d))
            row["grouped_shrink_alone_us"], row["grouped_expand_alone_us"] = grouped_phases_us(
                slots_d, pool, hidden, dtype, gen)
    results.append(row)
    print(json.dumps(row), flush=True)


def markdown(results):
    head = (
        "| case | M | adapters | ours (us) | per-token MBGMV (us): shrink + expand "
        "| grouped MBGMV (us) | MBGMM sorted (us) "
        "| torch padded bmm (us) | torch loop (us) | byte floor (us) | ours % of floor "
        "| latency floor (us) | speedup vs best torch |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in results:
        best = min(r["torch_padded_us"], r["torch_loop_us"])
        sorted_us = f"{r['ours_mbgmm_sorted_us']:.1f}" if "ours_mbgmm_sorted_us" in r else "-"
        grouped_us = f"{r['ours_grouped_us']:.1f}" if "ours_grouped_us" in r else "-"
        per_token = f"{r['ours_per_token_us']:.1f}: " if "ours_per_token_us" in r else ""
        lines.append(
            f"| {r['case']} | {r['M']} | {r['adapters']} "
            f"| {r['ours_us']:.1f} (again {r['ours_us_again']:.1f}) "
            f"| {per_token}{r['shrink_us']:.1f} + {r['expand_us']:.1f} | {grouped_us} "
            f"| {sorted_us} "
            f"| {r['torch_padded_us']:.1f} | {r['torch_loop_us']:.1f} | {r['floor_us']:.2f} "
            f"| {r['ours_pct_floor']:.0f}% | {r['latency_floor_us']:.1f} "
            f"| {best / r['ours_us']:.1f}x |"
        )
    lines += [
        "",
        "Eager back-to-back calls, wall time per call (host launch overhead included, L2 warm); "
        "ours without the 16-byte row alignment hint (device time):",
        "",
        "| case | ours (us/call) | torch padded bmm (us/call) | torch loop (us/call) "
        "| ours, no alignment hint (us) | split_k | grouped: shrink alone / expand alone (us) "
        "| copy of the floor's bytes (us) | row stream (us) | ours % of copy speed "
        "| grouped % of copy speed |",
        "|" + "---|" * 11,
    ]
    for r in results:
        phases = (f"{r['grouped_shrink_alone_us']:.1f} / {r['grouped_expand_alone_us']:.1f}"
                  if "grouped_shrink_alone_us" in r else "-")  # fmt: skip
        lines.append(
            f"| {r['case']} | {r['ours_call_us']:.1f} | {r['torch_padded_call_us']:.1f} "
            f"| {r['torch_loop_call_us']:.1f} "
            f"| {r['ours_unaligned_us']:.1f} | {r['split_k']} | {phases} "
            f"| {r['copy_us']:.1f} | {r['row_stream_us']:.1f} | {r['ours_pct_copy']:.0f}% "
            f"| {r.get('ours_grouped_pct_copy', float('nan')):.0f}% |"
        )
    return "\n".join(lines)


def sweep(pool, hidden, device, dtype, gen, timer):
    """Time launch configurations of each kernel (decode M in {8, 32, 256}, the prefill).

    The fastest configuration (sum over the cases) of each kernel and mode is kept."""
    flat, a_ptr, b_ptr, ranks, scales = pool
    n_ad = ranks.shape[0]
    cases = [("gemv", torch.arange(M, dtype=torch.int32) % n_ad) for M in (8, 32, 256)]
    cases.append(("gemm", torch.arange(8, dtype=torch.int32).repeat_interleave(256)))
    spaces = {
        ("shrink", "gemv"): [
            dict(block_r=r, block_k=k, k_stages=st, warps=w, waves=wv, r_loop=rl)
            for r, k, st, w, wv, rl in (
                (16, 256, 3, 4, 4, False), (16, 256, 3, 8, 4, False), (16, 128, 3, 4, 4, False),
                (16, 128, 1, 4, 4, False), (16, 512, 2, 8, 4, False), (16, 256, 1, 8, 4, False),
                (16, 256, 3, 4, 8, False), (16, 256, 3, 4, 16, False), (32, 256, 3, 8, 8, False),
                (16, 256, 3, 4, 8, True), (8, 256, 3, 4, 8, False), (16, 128, 2, 4, 16, False),
            )
        ],
        ("expand", "gemv"): [
            dict(block_r=r, block_n=n, block_n_small=n, warps=w, n_iters=it)
            for r, n, w, it in ((32, 128, 4, 1), (32, 128, 8, 1), (32, 256, 8, 1), (16, 128, 4, 1),
                                (32, 64, 4, 1), (16, 64, 2, 1), (16, 256, 4, 1), (16, 128, 4, 2),
                                (64, 128, 4, 1), (16, 32, 1, 1))
        ],
        ("shrink", "gemm"): [
            dict(block_r=r, block_k=k, warps=w)
            for r, k, w in ((32, 128, 4), (32, 128, 8), (16, 128, 4))
        ],
    }  # fmt: skip
    mods = {"shrink": SHRINK_MOD, "expand": EXPAND_MOD}
    lines = [
        "| kernel | mode | config | " + " | ".join(f"{m} M={len(s)} (us)" for m, s in cases) + " |"
    ]
    lines.append("|" + "---|" * (3 + len(cases)))
    for (kern, mode), space in spaces.items():
        cfg_name = "GEMV_CONFIG" if mode == "gemv" else "GEMM_CONFIG"
        base = dict(getattr(mods[kern], cfg_name))
        best = None
        for change in space:
            cfg = {**base, **change}
            setattr(mods[kern], cfg_name, cfg)
            times = []
            for m, slots in cases:
                if m != mode:
                    continue
                M = slots.shape[0]
                x = torch.randn(M, hidden, generator=gen).to(device, dtype)
                y = torch.randn(M, hidden, generator=gen).to(device, dtype)
                kw = (
                    {"lora_slots": slots.to(device)}
                    if m == "gemv"
                    else {"segments": make_lora_segments(slots, device=device)}
                )
                v = lora_shrink(x, flat, a_ptr, ranks, (0,), **kw)
                if kern == "shrink":
                    args = (x, flat, a_ptr, ranks, (0,))
                    fn = lora_shrink
                else:
                    args = (y, v, flat, b_ptr, ranks, scales, (0,), [hidden])
                    fn = lora_expand
                times.append(timer(lambda fn=fn, args=args, kw=kw: fn(*args, **kw)))
            score = sum(times)
            cells = [f"{t:.1f}" for t in times]
            cells = cells + ["-"] if mode == "gemv" else ["-"] * 3 + cells
            lines.append(f"| {kern} | {mode} | {change} | " + " | ".join(cells) + " |")
            if best is None or score < best[0]:
                best = (score, cfg)
        setattr(mods[kern], cfg_name, best[1])
        lines.append(f"| **{kern} {mode} kept** | | {best[1]} |" + " |" * len(cases))
    return "\n".join(lines)


def coordinate_sweep(mod, attr, axes, cases, timer):
    """Greedy coordinate search over the launch configuration ``mod.<attr>``: each axis in turn
    takes the value with the smallest total time over ``cases`` (callables), the others fixed.
    The best configuration is kept in ``mod``; returns the markdown table of every timing."""
    best_cfg = dict(getattr(mod, attr))
    seen = {}

    def total(cfg):
        key = json.dumps(cfg, sort_keys=True)
        if key not in seen:
            setattr(mod, attr, cfg)
            seen[key] = (cfg, [timer(fn) for _, fn in cases])
        return sum(seen[key][1])

    best = total(best_cfg)
    for axis, values in axes.items():
        for value in values:
            cfg = {**best_cfg, axis: value}
            t = total(cfg)
            if t < best:
                best, best_cfg = t, cfg
    setattr(mod, attr, best_cfg)
    lines = ["| config | " + " | ".join(f"{name} (us)" for name, _ in cases) + " | total |"]
    lines.append("|" + "---|" * (2 + len(cases)))
    for cfg, times in sorted(seen.values(), key=lambda ct: sum(ct[1])):
        diff = {k: v for k, v in cfg.items() if best_cfg.get(k) != v} or "kept"
        lines.append(f"| {diff} | " + " | ".join(f"{t:.1f}" for t in times)
                     + f" | {sum(times):.1f} |")  # fmt: skip
    lines.append(f"\nkept: {best_cfg}")
    return "\n".join(lines)


def grouped_cases(pool, qkv_pool, hidden, device, dtype, gen):
    """Decode M in {8, 32, 128, 256} (one module, each token its own adapter up to 128) and
    the engine's shapes over 100 adapters: q,k,v fused and o at 200 tokens (two per adapter),
    q,k,v fused at 32-256 tokens. The chunk plan is built inside each timed call (its shape
    follows the swept block_m; in the engine it is built once per step, ~3.5 us)."""
    cases = []
    cuda = torch.device(device).type == "cuda"
    decode_ms, (qkv_m, qkv_ad) = ((8, 32, 128, 256), (200, 100)) if cuda else ((5,), (6, 3))
    qkv_ms = (32, 64, 96, 128, 160, 256) if cuda else (2,)
    for name, (flat, a_ptr, b_ptr, ranks, scales), M, n_ad, mods in (
        *((f"M={M}", pool, M, 128, (0,)) for M in decode_ms),
        (f"qkv M={qkv_m} / {qkv_ad} adapters", qkv_pool, qkv_m, qkv_ad, (0, 1, 2)),
        (f"o M={qkv_m} / {qkv_ad} adapters", qkv_pool, qkv_m, qkv_ad, (0,)),
        *((f"qkv M={m}", qkv_pool, m, qkv_ad, (0, 1, 2)) for m in qkv_ms),
    ):
        slots = (torch.arange(M, dtype=torch.int32) % min(n_ad, ranks.shape[0])).to(device)
        x = torch.randn(M, hidden, generator=gen).to(device, dtype)
        y = torch.randn(M, hidden * len(mods), generator=gen).to(device, dtype)
        outs = [hidden] * len(mods)

        def fn(flat=flat, a_ptr=a_ptr, b_ptr=b_ptr, ranks=ranks, scales=scales, slots=slots,
               x=x, y=y, mods=mods, outs=outs):  # fmt: skip
            add_lora_grouped(y, x, flat, a_ptr, b_ptr, ranks, scales, mods, outs,
                             lora_slots=slots, chunks=GROUPED_MOD.lora_chunks(slots))
        cases.append((name, fn))
    return cases


GROUPED_AXES = {
    "block_r": [32], "wide_block_r": [16, 64], "wide_above_rows": [128, 384],
    "tile_elems": [4096, 16384], "warps": [8], "k_stages": [2, 4], "n_stages": [2, 4],
    "n_split": [2], "few_tokens": [0, 1], "few_tile_elems": [4096], "few_max_modules": [3],
}  # fmt: skip
SWEEPS = ("grouped", "mbgmm-expand", "shrink-expand")
MBGMM_EXPAND_AXES = {"block_n": [64, 128], "block_r": [32, 64], "warps": [8], "stages": [1, 3]}


def sweep_grouped(pool, qkv_pool, hidden, device, dtype, gen, timer):
    """Coordinate search over the grouped MBGMV's launch configuration (``grouped_cases``)."""
    cases = grouped_cases(pool, qkv_pool, hidden, device, dtype, gen)
    return coordinate_sweep(GROUPED_MOD, "GROUPED_CONFIG", GROUPED_AXES, cases, timer)


def sweep_mbgmm_expand(pool, hidden, device, dtype, gen, timer):
    """Coordinate search over the MBGMM expand's launch configuration: the prefill case
    (8 x 256 tokens, 8 adapters) and 16 x 256 tokens on 16 adapters."""
    flat, a_ptr, b_ptr, ranks, scales = pool
    cases = []
    cuda = torch.device(device).type == "cuda"
    seq_len, seqs = (256, (8, 16)) if cuda else (6, (3, 5))
    for n_seq in seqs:
        slots = torch.arange(n_seq, dtype=torch.int32).repeat_interleave(seq_len)
        seg = make_lora_segments(slots, device=device)
        x = torch.randn(slots.shape[0], hidden, generator=gen).to(device, dtype)
        y = torch.randn(slots.shape[0], hidden, generator=gen).to(device, dtype)
        v = lora_shrink(x, flat, a_ptr, ranks, (0,), segments=seg)

        def fn(y=y, v=v, seg=seg):
            lora_expand(y, v, flat, b_ptr, ranks, scales, (0,), [hidden], segments=seg)
        cases.append((f"{n_seq}x{seq_len}", fn))
    return coordinate_sweep(EXPAND_MOD, "GEMM_CONFIG", MBGMM_EXPAND_AXES, cases, timer)


def plot_decode(ax1, dec):
    Ms = [r["M"] for r in dec]
    for key, label, style in (
        ("ours_per_token_us", "ours, per-token MBGMV (shrink + expand)", "o-"),
        ("ours_grouped_us", "ours, grouped MBGMV (plan included)", "D-"),
        ("ours_mbgmm_sorted_us", "ours (MBGMM, sorted)", "s--"),
        ("torch_padded_us", "torch gather + bmm, padded", "^-"),
        ("torch_loop_us", "torch loop over adapters", "v-"),
        ("floor_us", "byte floor", "k:"),
    ):
        ax1.plot(Ms, [r[key] for r in dec], style, label=label)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("decode tokens M (each its own adapter, up to 128)")
    ax1.set_ylabel("time per call (us, median)")
    ax1.set_title("LoRA 4096->4096 fp16, ranks {8,16,32,64}: decode")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in results if r["case"].startswith("decode")]
    pre = [r for r in results if not r["case"].startswith("decode")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    if dec:  # --cases prefill times no decode case: nothing to put on the log axes
        plot_decode(ax1, dec)
    else:
        ax1.set_axis_off()
    if pre:
        r = pre[0]
        keys = ["ours_us", "torch_padded_us", "torch_loop_us", "floor_us"]
        ax2.bar(
            ["ours", "padded bmm", "loop", "floor"],
            [r[k] for k in keys],
            color=["C0", "C2", "C3", "k"],
        )
        ax2.set_ylabel("time (us, median)")
        ax2.set_title("prefill 8 x 256 tokens, 8 adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(SWEEPS),
        help="time launch configurations first and keep the fastest: a comma list of "
        f"{', '.join(SWEEPS)} (default: all)",
    )
    ap.add_argument(
        "--max-rank",
        type=int,
        default=MAX_RANK,
        help=f"rank capacity of the slot tables (default {MAX_RANK}, the engine's max_rank)",
    )
    ap.add_argument("--cases", default="decode,prefill",
                    help="comma list: decode (M in 1..256), prefill (8 x 256 tokens)")
    ap.add_argument(
        "--profile-decode",
        type=int,
        metavar="M",
        help="only run shrink + expand of the decode case with M tokens a few times (for ncu)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if cuda:
        device, dtype, hidden, page_elems, n_ad = (
            "cuda",
            torch.float16,
            4096,
            2 * 16 * 32 * 128,
            128,
        )
        decode_ms, prefill = [1, 8, 32, 128, 256], (8, 256)
        rate = measure_copy_rate(device)
        print(
            f"device: {torch.cuda.get_device_name()}  "
            f"copy rate {rate / 1e12:.2f} TB/s (read + write)"
        )
    else:  # interpreter: the same code paths on tiny shapes, no timing
        device, dtype, hidden, page_elems, n_ad = "cpu", torch.float32, 256, 4096, 8
        decode_ms, prefill = [1, 5, 12], (3, 6)
        rate = None
    gen, pool = build_pool(n_ad, hidden, page_elems, dtype, device, max_rank=args.max_rank)
    if args.profile_decode:
        flat, a_ptr, b_ptr, ranks, scales = pool
        M = args.profile_decode
        slots = (torch.arange(M, dtype=torch.int32) % n_ad).to(device)
        x = torch.randn(M, hidden, generator=gen).to(device, dtype)
        y = torch.randn(M, hidden, generator=gen).to(device, dtype)
        for _ in range(3):
            add_lora(y, x, flat, a_ptr, b_ptr, ranks, scales, (0,), [hidden], lora_slots=slots)
        if cuda:
            torch.cuda.synchronize()
        return
    sweep_table = None
    if args.sweep:
        timer = (lambda fn: gpu_time_us(fn, reps=40)) if cuda else (lambda fn: (fn(), 0.0)[1])
        try:
            tables = []
            for kind in args.sweep.split(","):
                if kind not in SWEEPS:
                    raise SystemExit(f"--sweep: unknown {kind!r} (choose from {SWEEPS})")
                if kind == "grouped":
                    qkv_pool = build_pool(100 if cuda else 3, hidden, page_elems, dtype, device,
                                          max_rank=args.max_rank, seed=1, n_modules=3)[1]
                    tables.append(sweep_grouped(pool, qkv_pool, hidden, device, dtype, gen,
                                                timer))
                elif kind == "mbgmm-expand":
                    tables.append(sweep_mbgmm_expand(pool, hidden, device, dtype, gen, timer))
                else:
                    tables.append(sweep(pool, hidden, device, dtype, gen, timer))
            sweep_table = "\n\n".join(tables)
        except Exception:  # keep the main results even if a configuration breaks
            import traceback

            traceback.print_exc()
            sweep_table = "sweep failed"
        print(sweep_table, flush=True)
    results = []
    cases = args.cases.split(",")
    for M in decode_ms if "decode" in cases else ():
        slots = torch.arange(M, dtype=torch.int32) % n_ad
        run_case(f"decode M={M}", slots, pool, hidden, device, dtype, gen, cuda, results, rate)
    if "prefill" in cases:
        n_seq, seq_len = prefill
        slots = torch.arange(n_seq, dtype=torch.int32).repeat_interleave(seq_len)
        run_case(f"prefill {n_seq}x{seq_len}", slots, pool, hidden, device, dtype, gen, cuda,
                 results, rate)
    if not cuda:
        print("no CUDA: correctness pass only (interpreter)")
        return
    configs = {
        "shrink": {"gemv": SHRINK_MOD.GEMV_CONFIG, "gemm": SHRINK_MOD.GEMM_CONFIG},
        "expand": {"gemv": EXPAND_MOD.GEMV_CONFIG, "gemm": EXPAND_MOD.GEMM_CONFIG},
        "grouped": GROUPED_MOD.GROUPED_CONFIG,
    }
    (out / "lora_kernels.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "copy_rate": rate,
                "max_rank": args.max_rank,
                "configs": configs,
                "sweep": sweep_table,
                "results": results,
            },
            indent=1,
        )
    )
    plot(results, out / "lora_kernels.png")
    print()
    print(
        f"Device: {torch.cuda.get_device_name()}; "
        f"copy rate {rate / 1e12:.2f} TB/s (read + write, 1 GiB copy)"
    )
    print(f"Launch configurations: {json.dumps(configs)}")
    print(markdown(results))


if __name__ == "__main__":
    main()
