#!/usr/bin/env python3
"""Benchmark of paged attention (prefill, decode) against torch SDPA on contiguous data.

Llama-7B shapes, fp16: 32 query heads, head_dim 128, with 32 KV heads (MHA) and 8 KV heads (GQA).
Our kernels read K/V through block tables from a pool whose pages are shuffled; SDPA
(``torch.nn.functional.scaled_dot_product_attention``, the backend torch picks) gets the same
K/V as contiguous [B, H_kv, L, D] tensors (for GQA both with ``enable_gqa=True`` and with K/V
expanded to 32 heads before timing).

- prefill: causal, B sequences of L new tokens (no earlier context, so SDPA's is_causal is the
  same mask); reported in TFLOP/s (4 B H L^2 D / 2 flops).
- decode: S sequences of one query over a context of C tokens; reported against the byte
  floor (K and V read once, over the measured device copy rate).

Times: device time, median of 100 runs, each after an L2 flush and a short device sleep that
hides the host's launch overhead (``slora_testing.kernel_pools.gpu_time_us``, CUDA events).
Prints a markdown table; saves a PNG and a JSON under --out (default bench/results).
``--sweep`` first times a few launch configurations and keeps the fastest. ``--graph-decode``
times only decode as the decode graphs run it (a fixed split-K factor, issue 19's contexts),
per launch configuration and split-K factor, against the K/V byte floor.
Without CUDA it runs a small correctness pass under the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from slora_kernels import paged_attention_decode, paged_attention_prefill  # noqa: E402
from slora_testing.kernel_pools import gpu_time_us, measure_copy_rate  # noqa: E402

ATTN_MOD = sys.modules["slora_kernels.paged_attention"]

BLOCK = 16


def to_pool(k, v, gen, extra_pages=64):
    """Contiguous k, v [B, Hkv, L, D] -> (kv_cache [P, 2, BLOCK, Hkv, D], block_tables).

    The pages of the sequences are shuffled in the pool."""
    B, hkv, L, D = k.shape
    nb = (L + BLOCK - 1) // BLOCK
    P = B * nb + extra_pages
    perm = torch.randperm(P, generator=gen)[: B * nb].view(B, nb).to(k.device)
    kv = torch.randn(P, 2, BLOCK, hkv, D, generator=gen).to(k.device, k.dtype)
    pad = nb * BLOCK - L
    for which, t in ((0, k), (1, v)):
        t = F.pad(t, (0, 0, 0, pad)).permute(0, 2, 1, 3).reshape(B, nb, BLOCK, hkv, D)
        kv[perm.reshape(-1), which] = t.reshape(B * nb, BLOCK, hkv, D)
    return kv, perm.to(torch.int32).contiguous()


def sdpa_variants(q, k, v, causal):
    h, hkv = q.shape[1], k.shape[1]
    out = {
        "sdpa": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=hkv != h
        )
    }
    if hkv != h:
        ke = k.repeat_interleave(h // hkv, dim=1)
        ve = v.repeat_interleave(h // hkv, dim=1)
        out["sdpa_kv_expanded"] = lambda: F.scaled_dot_product_attention(
            q, ke, ve, is_causal=causal
        )
    return out


def bench(fn, timed):
    return gpu_time_us(fn) if timed else None


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_prefill(name, B, L, h, hkv, d, dtype, device, gen, timed, rate):
    q = torch.randn(B, h, L, d, generator=gen).to(device, dtype)
    k = torch.randn(B, hkv, L, d, generator=gen).to(device, dtype)
    v = torch.randn(B, hkv, L, d, generator=gen).to(device, dtype)
    kv, bt = to_pool(k, v, gen)
    qp = q.permute(0, 2, 1, 3).reshape(B * L, h, d).contiguous()
    qsl = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
    ctx = torch.full((B,), L, dtype=torch.int32, device=device)
    ours = lambda: paged_attention_prefill(qp, kv, qsl, ctx, bt, max_query_len=L)  # noqa: E731
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=hkv != h
    )
    ref = ref.permute(0, 2, 1, 3).reshape(B * L, h, d)
    row = {
        "kind": "prefill",
        "case": name,
        "shape": f"B={B} L={L}",
        "heads": f"{h}/{hkv}",
        "err": rel(ours(), ref),
    }
    flops = 4 * B * h * L * L * d / 2
    row["ours_us"] = bench(ours, timed)
    for key, fn in sdpa_variants(q, k, v, True).items():
        row[f"{key}_err"] = rel(fn().permute(0, 2, 1, 3).reshape(B * L, h, d), ref)
        row[f"{key}_us"] = bench(fn, timed)
    if timed:
        row["ours_tflops"] = flops / row["ours_us"] / 1e6
        row["sdpa_tflops"] = flops / row["sdpa_us"] / 1e6
    return row


def run_decode(name, S, C, h, hkv, d, dtype, device, gen, timed, rate):
    q = torch.randn(S, h, 1, d, generator=gen).to(device, dtype)
    k = torch.randn(S, hkv, C, d, generator=gen).to(device, dtype)
    v = torch.randn(S, hkv, C, d, generator=gen).to(device, dtype)
    kv, bt = to_pool(k, v, gen)
    qp = q[:, :, 0].contiguous()
    ctx = torch.full((S,), C, dtype=torch.int32, device=device)
    ours = lambda: paged_attention_decode(qp, kv, ctx, bt, max_context_len=C)  # noqa: E731
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=hkv != h)[
        :, :, 0
    ]
    row = {
        "kind": "decode",
        "case": name,
        "shape": f"S={S} C={C}",
        "heads": f"{h}/{hkv}",
        "err": rel(ours(), ref),
    }
    row["ours_us"] = bench(ours, timed)
    for key, fn in sdpa_variants(q, k, v, False).items():
        row[f"{key}_err"] = rel(fn()[:, :, 0], ref)
        row[f"{key}_us"] = bench(fn, timed)
    if timed:
        nbytes = 2 * S * C * hkv * d * k.element_size() + 2 * qp.numel() * qp.element_size()
        row["floor_us"] = 1e6 * nbytes / rate
        row["ours_pct_floor"] = 100 * row["floor_us"] / row["ours_us"]
        row["sdpa_pct_floor"] = 100 * row["floor_us"] / row["sdpa_us"]
    return row


def sweep(dtype, device, gen):
    """Time launch configurations of prefill and decode on a few 7B shapes; keep the fastest."""
    d = 128
    pre_cases, dec_cases = [], []
    for h, hkv in ((32, 32), (32, 8)):
        B, L = 4, 1024
        q = torch.randn(B * L, h, d, generator=gen).to(device, dtype)
        k = torch.randn(B, hkv, L, d, generator=gen).to(device, dtype)
        kv, bt = to_pool(k, k, gen)
        qsl = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
        ctx = torch.full((B,), L, dtype=torch.int32, device=device)
        pre_cases.append(
            (f"prefill {h}/{hkv} B={B} L={L}", (q, kv, qsl, ctx, bt), {"max_query_len": L})
        )
    for h, hkv, S, C in ((32, 32, 1, 4096), (32, 8, 1, 4096), (32, 8, 16, 2048)):
        q = torch.randn(S, h, d, generator=gen).to(device, dtype)
        k = torch.randn(S, hkv, C, d, generator=gen).to(device, dtype)
        kv, bt = to_pool(k, k, gen)
        ctx = torch.full((S,), C, dtype=torch.int32, device=device)
        dec_cases.append(
            (f"decode {h}/{hkv} S={S} C={C}", (q, kv, ctx, bt), {"max_context_len": C})
        )
    spaces = [
        ("PREFILL_CONFIG", paged_attention_prefill, pre_cases, [
            dict(block_m=64, block_n=64, warps=8, stages=2),
            dict(block_m=64, block_n=64, warps=4, stages=3),
            dict(block_m=64, block_n=64, warps=8, stages=3),
            dict(block_m=128, block_n=64, warps=8, stages=2),
            dict(block_m=128, block_n=64, warps=8, stages=3),
            dict(block_m=128, block_n=32, warps=8, stages=3),
            dict(block_m=128, block_n=128, warps=8, stages=2),
        ]),
        ("DECODE_CONFIG", paged_attention_decode, dec_cases, [
            dict(block_n=64, warps=4, stages=3, waves=2, min_blocks_per_split=4),
            dict(block_n=64, warps=4, stages=3, waves=4, min_blocks_per_split=2),
            dict(block_n=64, warps=4, stages=3, waves=8, min_blocks_per_split=1),
            dict(block_n=128, warps=4, stages=3, waves=4, min_blocks_per_split=2),
            dict(block_n=64, warps=8, stages=3, waves=4, min_blocks_per_split=2),
            dict(block_n=32, warps=4, stages=4, waves=8, min_blocks_per_split=1),
        ]),
    ]  # fmt: skip
    lines = []
    for cfg_name, fn, cases, space in spaces:
        lines.append("| config | " + " | ".join(f"{c[0]} (us)" for c in cases) + " |")
        lines.append("|" + "---|" * (1 + len(cases)))
        base = dict(getattr(ATTN_MOD, cfg_name))
        best = None
        for change in space:
            cfg = {**base, **change}
            setattr(ATTN_MOD, cfg_name, cfg)
            times = []
            for _, args, kw in cases:
                times.append(gpu_time_us(lambda fn=fn, args=args, kw=kw: fn(*args, **kw), reps=30))
            lines.append(f"| {change} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
            if best is None or sum(times) < best[0]:
                best = (sum(times), cfg)
        setattr(ATTN_MOD, cfg_name, best[1])
        lines.append(f"| **kept {cfg_name}** {best[1]} |" + " |" * len(cases))
        lines.append("")
    return "\n".join(lines)


# the decode graphs' regime (model/cuda_graphs.py): a split-K factor fixed at capture, block
# tables as wide as max_model_len (Llama-7B: 2048), and issue 19's contexts (prompt and output
# lengths uniform in [8, 512]: a decoding row holds 16 to 1,024 tokens)
GRAPH_MAX_TOKENS = 2048
GRAPH_CONTEXTS = (16, 1024)
GRAPH_SPLITS = (4, 8, 16, 32)
GRAPH_ROWS = (32, 128, 256)
GRAPH_SPACE = [{}, {"block_n": 64}, {"stages": 2}, {"block_n": 64, "stages": 2},
               {"warps": 8}, {"block_n": 64, "warps": 8, "stages": 2}]


def graph_decode_case(S, dtype, device, gen):
    """MHA 32/32, d 128: q, the pool, contexts, block tables (graph width), K/V bytes read."""
    h = hkv = 32
    d = 128
    ctx = torch.randint(GRAPH_CONTEXTS[0], GRAPH_CONTEXTS[1] + 1, (S,), generator=gen)
    pages = (ctx + BLOCK - 1) // BLOCK
    P = int(pages.sum()) + 64
    kv = torch.randn(P, 2, BLOCK, hkv, d, device=device, dtype=dtype)
    perm = torch.randperm(P, generator=gen)
    bt = torch.zeros(S, GRAPH_MAX_TOKENS // BLOCK, dtype=torch.int32)
    first = torch.cumsum(pages, 0) - pages
    for s in range(S):
        bt[s, : pages[s]] = perm[first[s] : first[s] + pages[s]]
    q = torch.randn(S, h, d, device=device, dtype=dtype)
    nbytes = int(ctx.sum()) * 2 * hkv * d * kv.element_size()
    return q, kv, ctx.to(device, torch.int32), bt.to(device), nbytes


def graph_decode_sweep(dtype, device, gen, rate):
    """Decode as a captured graph runs it (num_splits fixed, max_context_len unknown: the
    contexts cut evenly over the table's width), per launch configuration and split-K factor;
    'auto' is the eager choice (max_context_len known).
    Returns a markdown table: us per call and % of the K/V byte floor at the copy rate."""
    base = dict(ATTN_MOD.DECODE_CONFIG)
    lines = ["| rows | config | splits | us | % of floor |", "|---|---|---|---|---|"]
    try:
        for S in GRAPH_ROWS:
            q, kv, ctx, bt, nbytes = graph_decode_case(S, dtype, device, gen)
            qsl = torch.arange(S + 1, dtype=torch.int32, device=device)
            ref = ATTN_MOD.paged_attention_ref(q, kv, qsl, ctx, bt)
            floor_us = 1e6 * nbytes / rate
            for change in GRAPH_SPACE:
                ATTN_MOD.DECODE_CONFIG = {**base, **change}
                variants = [(str(n), {"num_splits": n}) for n in GRAPH_SPLITS]
                for splits, kw in (*variants, ("auto", {"max_context_len": int(ctx.max())})):
                    fn = partial(paged_attention_decode, q, kv, ctx, bt, **kw)
                    if not rel(fn(), ref) < 1e-2:
                        raise SystemExit(f"graph decode {change} {splits}: wrong result")
                    us = gpu_time_us(fn, reps=30)
                    lines.append(f"| {S} | {change or 'kept'} | {splits} | {us:.1f} | "
                                 f"{100 * floor_us / us:.0f} |")
                    print(lines[-1], flush=True)
    finally:
        ATTN_MOD.DECODE_CONFIG = base
    return "\n".join(lines)


def markdown(rows):
    lines = [
        "| kind | heads q/kv | shape | ours (us) | SDPA (us) | SDPA, K/V expanded (us) "
        "| ours / SDPA | ours | SDPA |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        exp = f"{r['sdpa_kv_expanded_us']:.1f}" if "sdpa_kv_expanded_us" in r else "-"
        if r["kind"] == "prefill":
            a, b = f"{r['ours_tflops']:.0f} TFLOP/s", f"{r['sdpa_tflops']:.0f} TFLOP/s"
        else:
            a, b = f"{r['ours_pct_floor']:.0f}% of floor", f"{r['sdpa_pct_floor']:.0f}% of floor"
        lines.append(
            f"| {r['kind']} | {r['heads']} | {r['shape']} | {r['ours_us']:.1f} "
            f"| {r['sdpa_us']:.1f} | {exp} "
            f"| {r['ours_us'] / r['sdpa_us']:.2f} | {a} | {b} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    labels = [f"{r['kind']}\n{r['heads']} {r['shape']}" for r in rows]
    xs = range(len(rows))
    w = 0.27
    ax.bar([x - w for x in xs], [r["ours_us"] for r in rows], w, label="ours (paged, Triton)")
    ax.bar(list(xs), [r["sdpa_us"] for r in rows], w, label="SDPA (contiguous)")
    ax.bar(
        [x + w for x in xs],
        [r.get("sdpa_kv_expanded_us", 0) for r in rows],
        w,
        label="SDPA, K/V expanded",
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("time (us, median)")
    ax.set_title("paged attention vs SDPA, fp16, head_dim 128")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--sweep", action="store_true", help="time launch configurations first")
    ap.add_argument("--graph-decode", action="store_true",
                    help="only decode as the decode graphs run it: configurations x split-K")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    if cuda:
        device, dtype, d = "cuda", torch.float16, 128
        heads = [(32, 32), (32, 8)]
        prefill = [(4, 1024), (1, 4096)]
        decode = [(1, 4096), (16, 2048), (64, 2048)]
        rate = measure_copy_rate(device)
        print(
            f"device: {torch.cuda.get_device_name()}  "
            f"copy rate {rate / 1e12:.2f} TB/s (read + write)"
        )
    else:
        device, dtype, d = "cpu", torch.float32, 64
        heads = [(4, 4), (4, 1)]
        prefill = [(2, 40)]
        decode = [(3, 50)]
        rate = None
    if cuda and args.graph_decode:
        torch.manual_seed(0)
        table = graph_decode_sweep(dtype, device, gen, rate)
        (out / "attention_graph_decode.md").write_text(table + "\n")
        print(table)
        return
    sweep_table = None
    if cuda and args.sweep:
        try:
            sweep_table = sweep(dtype, device, gen)
        except Exception:  # keep the main results even if a configuration breaks
            import traceback

            traceback.print_exc()
            sweep_table = "sweep failed"
        print(sweep_table, flush=True)
    rows = []
    for h, hkv in heads:
        name = "MHA" if h == hkv else "GQA"
        for B, L in prefill:
            rows.append(run_prefill(name, B, L, h, hkv, d, dtype, device, gen, cuda, rate))
            print(json.dumps(rows[-1]), flush=True)
        for S, C in decode:
            rows.append(run_decode(name, S, C, h, hkv, d, dtype, device, gen, cuda, rate))
            print(json.dumps(rows[-1]), flush=True)
    tol = 1e-2 if cuda else 1e-4
    bad = [r for r in rows if not r["err"] < tol]
    if bad:
        raise SystemExit(f"paged attention disagrees with the reference: {bad}")
    if not cuda:
        print("no CUDA: correctness pass only (interpreter)")
        return
    name = torch.cuda.get_device_name()
    configs = {"prefill": ATTN_MOD.PREFILL_CONFIG, "decode": ATTN_MOD.DECODE_CONFIG}
    summary = {"device": name, "copy_rate": rate, "configs": configs, "sweep": sweep_table}
    (out / "attention.json").write_text(json.dumps({**summary, "results": rows}, indent=1))
    plot(rows, out / "attention.png")
    print()
    print(f"Device: {name}; copy rate {rate / 1e12:.2f} TB/s (read + write, 1 GiB copy)")
    print(f"Launch configurations: {json.dumps(configs)}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
