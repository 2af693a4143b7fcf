#!/usr/bin/env python3
"""Experiment: does the decode LoRA hide behind the base GEMMs on a side CUDA stream?

Per layer of a Llama-7B shape (fp16, decode batch M, 100 adapters of ranks 8-64 on q,k,v,o):
RMS norm, qkv GEMM (+ LoRA q,k,v), o GEMM (+ LoRA o), gate_up and down GEMMs; attention left
out. 32 layers with their own weights, captured in one CUDA graph, timed by replays.

- base: GEMMs only;
- serial: the grouped MBGMV adds into each GEMM's output after it (what the engine does);
- overlap: the grouped MBGMV adds into a zeroed delta on a side stream while the GEMM runs,
  the delta is added after the join (a fork and a join per LoRA site inside the graph).

Prints us per layer for each, and how far the overlap output is from the serial one.

    python bench/bench_lora_overlap.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_lora_kernels import build_pool  # noqa: E402
from slora_kernels import add_lora_grouped, decode_chunks  # noqa: E402

HIDDEN, INTER, LAYERS, N_ADAPTERS, MAX_RANK = 4096, 11008, 32, 100, 64
PAGE_ELEMS = 2 * 16 * 32 * 128  # a Llama-7B pool page: 16 tokens x 32 KV heads x 128 x K/V
MODES = ("base", "serial", "overlap")
BATCHES = (32, 64, 128, 200, 256)
REPLAYS = 20


class Layers:
    """The per-layer work of one decode batch, in one of MODES."""

    def __init__(self, pool, weights, slots):
        self.pool, self.weights, self.slots = pool, weights, slots
        M = slots.shape[0]
        dev, dt = slots.device, torch.float16
        self.x0 = torch.randn(M, HIDDEN, device=dev, dtype=dt)
        self.d_qkv = torch.empty(M, 3 * HIDDEN, device=dev, dtype=dt)
        self.d_o = torch.empty(M, HIDDEN, device=dev, dtype=dt)
        self.side = torch.cuda.Stream()

    def lora(self, y, x, mods, chunks):
        flat, a_ptr, b_ptr, ranks, scales = self.pool
        add_lora_grouped(y, x, flat, a_ptr, b_ptr, ranks, scales, mods, [HIDDEN] * len(mods),
                         lora_slots=self.slots, chunks=chunks, aligned=True)  # fmt: skip

    def linear(self, mode, x, w, delta, mods, chunks):
        """x @ w^T with the LoRA delta of ``mods`` added as ``mode`` says."""
        if mode == "overlap":
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                delta.zero_()
                self.lora(delta, x, mods, chunks)
        y = F.linear(x, w)
        if mode == "serial":
            self.lora(y, x, mods, chunks)
        elif mode == "overlap":
            torch.cuda.current_stream().wait_stream(self.side)
            y += delta
        return y

    def forward(self, mode):
        x = self.x0.clone()
        chunks = decode_chunks(self.slots) if mode != "base" else None
        for w in self.weights:
            qkv = self.linear(mode, rms(x), w["qkv"], self.d_qkv, (0, 1, 2), chunks)
            attn = qkv[:, :HIDDEN].contiguous()
            x = x + self.linear(mode, attn, w["o"], self.d_o, (0,), chunks)
            gu = F.linear(rms(x), w["gu"])
            x = x + F.linear(F.silu(gu[:, :INTER]) * gu[:, INTER:], w["down"])
        return x


def rms(x: torch.Tensor) -> torch.Tensor:
    """Unit-RMS rows (keeps 32 random layers finite in fp16)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def replay_us(fn) -> tuple[float, torch.Tensor]:
    """Median device time of one replay of ``fn`` captured in a CUDA graph, and its output."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    times = []
    for _ in range(REPLAYS):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    return sorted(times)[len(times) // 2], out.float()


def main() -> None:
    dev, dt = "cuda", torch.float16
    _, pool = build_pool(N_ADAPTERS, HIDDEN, PAGE_ELEMS, dt, dev, max_rank=MAX_RANK, seed=1,
                         n_modules=3)  # fmt: skip
    std = 0.01
    weights = [{name: torch.randn(*shape, device=dev, dtype=dt) * std for name, shape in (
        ("qkv", (3 * HIDDEN, HIDDEN)), ("o", (HIDDEN, HIDDEN)), ("gu", (2 * INTER, HIDDEN)),
        ("down", (HIDDEN, INTER)))} for _ in range(LAYERS)]  # fmt: skip
    print(f"device: {torch.cuda.get_device_name()}; us per layer ({LAYERS} layers per graph)")
    for M in BATCHES:
        slots = (torch.arange(M, dtype=torch.int32) % N_ADAPTERS).to(dev)
        layers = Layers(pool, weights, slots)
        res = {mode: replay_us(lambda mode=mode, lay=layers: lay.forward(mode)) for mode in MODES}
        us = {mode: t / LAYERS for mode, (t, _) in res.items()}
        serial, overlap = res["serial"][1], res["overlap"][1]
        err = ((serial - overlap).norm() / serial.norm()).item()
        print(f"M={M}: base {us['base']:.1f}, serial {us['serial']:.1f} "
              f"(+{us['serial'] - us['base']:.1f}), overlap {us['overlap']:.1f} "
              f"(+{us['overlap'] - us['base']:.1f}); |serial - overlap| / |serial| {err:.1e}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
