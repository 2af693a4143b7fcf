"""How far a measured run's decode-only steps are from their floor (issue 19).

A decode step must read every weight once and the K/V of every row's context, and run the
weight matmuls' FLOPs: its floor is max(weight bytes / copy rate, rows x FLOPs per token /
matmul rate) + K/V bytes / copy rate (at 256 rows the matmuls are compute-bound: ~4.4 ms of
FLOPs against ~3.2 ms of weight reads on an H200). The context a step's rows hold is not in the
engine's JSON, so the run's schedule is replayed on the CPU (sim_preemption.py: the real
Scheduler, no model; it reproduces the measured run's step counts) and each decode-only step
gets its floor, set per batch class of 16 rows against the run's measured decode-only step
(`mixed_bound.decode_ms_by_batch_class` of bench_engine_gpu.py's JSON; its matmul rate is the
JSON's `matmul_tflops`).

    python bench/decode_floor.py --engine-json docs/results/issue19_engine_new_h200.json \\
        [--run base] [--copy-rate 4.25e12] [--pool-pages 12968]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from sim_preemption import (  # noqa: E402
    FLOPS_PER_PROMPT_TOKEN,
    KV_BYTES_PER_TOKEN,
    WEIGHT_BYTES,
    simulate_steps,
)

CLASS_ROWS = 16  # bench_engine_gpu.py's batch classes of the decode-only steps
# the H200's device-copy rate, measured by bench_lora_kernels.py on 2026-12-07
# (docs/results/issue19_lora_prefill_h200.json "copy_rate")
H200_COPY_RATE = 4.25e12


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-json", type=Path, required=True)
    p.add_argument("--run", default="base", help="base or lora_resident")
    p.add_argument("--copy-rate", type=float, default=H200_COPY_RATE, help="bytes/s")
    p.add_argument("--pool-pages", type=int, default=None,
                   help="default: the JSON's pool_pages")
    return p.parse_args()


def batch_class(rows: int) -> int:
    return -(-rows // CLASS_ROWS) * CLASS_ROWS


def main() -> None:
    args = parse_args()
    measured_json = json.loads(args.engine_json.read_text())
    measured = {int(k): v for k, v in
                measured_json[args.run]["mixed_bound"]["decode_ms_by_batch_class"].items()}
    pages = args.pool_pages or measured_json["pool_pages"]
    steps, _, _ = simulate_steps(pages, {}, int(measured_json["args"]["num_requests"]), 0)
    matmul_rate = 1e12 * measured_json["matmul_tflops"]
    steps_of: dict[int, list] = defaultdict(list)
    for s in steps:
        if not s.prompt_tokens:
            steps_of[batch_class(s.decode_rows)].append(s)
    print("| rows | steps | K/V GB | weights ms (bytes, FLOPs) | floor ms | measured ms "
          "| floor / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    floor_all = ms_all = count = 0.0
    read_ms = 1e3 * WEIGHT_BYTES / args.copy_rate
    for cls in sorted(set(steps_of) & set(measured)):
        group = steps_of[cls]
        kv_bytes = KV_BYTES_PER_TOKEN * sum(s.kv_tokens_read for s in group) / len(group)
        rows = sum(s.decode_rows for s in group) / len(group)
        flops_ms = 1e3 * rows * FLOPS_PER_PROMPT_TOKEN / matmul_rate
        floor_ms = max(read_ms, flops_ms) + 1e3 * kv_bytes / args.copy_rate
        print(f"| {cls} | {len(group)} | {kv_bytes / 1e9:.1f} | {read_ms:.2f}, {flops_ms:.2f} | "
              f"{floor_ms:.2f} | {measured[cls]:.2f} | {floor_ms / measured[cls]:.0%} |")
        floor_all += len(group) * floor_ms
        ms_all += len(group) * measured[cls]
        count += len(group)
    print(f"all decode-only steps: floor {floor_all / count:.2f} ms, measured "
          f"{ms_all / count:.2f} ms per step: {floor_all / ms_all:.0%} of the floor's speed")


if __name__ == "__main__":
    main()
