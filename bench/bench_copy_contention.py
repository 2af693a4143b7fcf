"""Does a step's small host -> device copy wait behind an adapter's large one? (issue 18)

At n=1,000 adapters the GPU idles before the steps that start pool loads (~1 ms per load on
an H100) and not before the others. A pool copy moves its adapter (16-134 MB for a 7B S2
adapter) host -> device on a side stream; the model's stream copies its step inputs and the
slot tables host -> device too (a few KB). If the copy engine runs them in the order they were
issued, the model's few KB wait for the adapters' megabytes. This times, on one GPU:
  - pinned host -> device GB/s of one copy per size (the floor of a pool copy);
  - a 4-KB copy on the model's stream issued right after BIG MB on a side stream, the big one
    issued whole or cut in chunks: the small copy's latency from issue to done, and the big
    one's time;
  - the host ms of emptying a slot-table entry while the model's stream is busy (~50 ms):
    `scales[slot] = 0.0` (a CPU scalar copied to the GPU) against `scales[slot].zero_()`.

    python bench/bench_copy_contention.py [--big-mb 64,256] [--chunks-mb 0,16,4] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slora_testing.step_timing import host_ms_while_busy  # noqa: E402

SMALL_BYTES = 4096  # a step's inputs or a slot-table row: a few KB
REPEATS = 5
MIB = 1 << 20


def h2d_gb_per_s(nbytes: int) -> float:
    """One pinned host -> device copy of nbytes (median of REPEATS)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def contention(big_mb: int, chunk_mb: int) -> dict:
    """The small copy's ms (issue -> done) behind BIG MB on a side stream, and the big one's
    ms; chunk_mb 0 = the big copy in one piece; big_mb 0 = the small copy alone."""
    side = torch.cuda.Stream()
    big_src = torch.empty(big_mb * MIB, dtype=torch.uint8, pin_memory=True)
    big_dst = torch.empty_like(big_src, device="cuda")
    small_src = torch.empty(SMALL_BYTES, dtype=torch.uint8, pin_memory=True)
    small_dst = torch.empty_like(small_src, device="cuda")
    step = max(chunk_mb or big_mb, 1) * MIB
    small, big = [], []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        b0, b1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            b0.record()
            for lo in range(0, big_src.numel(), step):
                big_dst[lo:lo + step].copy_(big_src[lo:lo + step], non_blocking=True)
            b1.record()
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        small_dst.copy_(small_src, non_blocking=True)
        s1.record()
        torch.cuda.synchronize()
        small.append(s0.elapsed_time(s1))
        big.append(b0.elapsed_time(b1))
    return {"big_mb": big_mb, "chunk_mb": chunk_mb,
            "small_ms": round(statistics.median(small), 3),
            "big_ms": round(statistics.median(big), 3)}


BUSY_CYCLES = 100_000_000  # ~50 ms of one SM spinning: "the step in flight"


def host_block_ms() -> dict:
    """Host ms of each way of emptying a slot's scale while the current stream is busy."""
    scales = torch.ones(8, device="cuda")

    def assign() -> None:
        scales[3] = 0.0

    def zero() -> None:
        scales[3].zero_()

    ops = {"scales[slot] = 0.0": assign, "scales[slot].zero_()": zero}
    for op in ops.values():  # each kernel's first launch (lazy loading) outside the timing
        op()
    return host_ms_while_busy(ops, BUSY_CYCLES)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big-mb", default="64,256")
    p.add_argument("--chunks-mb", default="0,16,4")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.ones(1, device="cuda")  # the context, outside every timing
    alone = {mb: round(h2d_gb_per_s(mb * MIB), 2) for mb in (1, 4, 16, 64, 256)}
    print("pinned host -> device GB/s by MB:", alone)
    blocked = host_block_ms()
    print("host ms with the stream busy ~50 ms:", blocked)
    bigs = [int(v) for v in args.big_mb.split(",")]
    chunks = [int(v) for v in args.chunks_mb.split(",")]
    rows = [contention(0, 0)] + [contention(big, chunk) for big in bigs for chunk in chunks]
    print(f"{'big MB':>7} {'chunk MB':>9} {'small copy ms':>14} {'big copy ms':>12}")
    for r in rows:
        print(f"{r['big_mb']:>7} {r['chunk_mb']:>9} {r['small_ms']:>14} {r['big_ms']:>12}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "h2d_gb_per_s": alone, "contention": rows,
                                        "host_block_ms": blocked}, indent=1))


if __name__ == "__main__":
    main()
