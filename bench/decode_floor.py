"""How far a measured run's decode-only steps are from their HBM floor (issue 19).

A decode step must read every weight once and the K/V of every row's context. The context a
step's rows hold is not in the engine's JSON, so the run's schedule is replayed on the CPU
(sim_preemption.py: the real Scheduler, no model; it reproduces the measured run's step counts)
and each decode-only step gets its floor: (weights + K/V bytes) / the device's copy rate. Per
batch class of 16 rows, the floor is set against the run's measured decode-only step
(`mixed_bound.decode_ms_by_batch_class` of bench_engine_gpu.py's JSON), and a least-squares
line through the classes splits the step into a fixed part (weights, launches) and a part per
K/V byte: the rate at which the step reads K/V.

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

from sim_preemption import KV_BYTES_PER_TOKEN, WEIGHT_BYTES, simulate_steps  # noqa: E402

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
    kv_tokens: dict[int, list[int]] = defaultdict(list)
    for s in steps:
        if not s.prompt_tokens:
            kv_tokens[batch_class(s.decode_rows)].append(s.kv_tokens_read)
    rows = []
    for cls in sorted(set(kv_tokens) & set(measured)):
        kv_bytes = KV_BYTES_PER_TOKEN * sum(kv_tokens[cls]) / len(kv_tokens[cls])
        floor_ms = 1e3 * (WEIGHT_BYTES + kv_bytes) / args.copy_rate
        rows.append((cls, len(kv_tokens[cls]), kv_bytes, floor_ms, measured[cls]))
    print("| rows | steps | K/V GB | floor ms | measured ms | floor / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cls, n, kv_bytes, floor_ms, ms in rows:
        print(f"| {cls} | {n} | {kv_bytes / 1e9:.1f} | {floor_ms:.2f} | {ms:.2f} | "
              f"{floor_ms / ms:.0%} |")
    steps_all = sum(n for _, n, *_ in rows)
    floor_all = sum(n * f for _, n, _, f, _ in rows)
    ms_all = sum(n * m for _, n, _, _, m in rows)
    print(f"all decode-only steps: floor {floor_all / steps_all:.2f} ms, measured "
          f"{ms_all / steps_all:.2f} ms per step: {floor_all / ms_all:.0%} of the floor's speed")
    fixed_ms, ms_per_byte = fit_line([(kv, ms) for _, _, kv, _, ms in rows])
    print(f"fit: {fixed_ms:.2f} ms fixed (weights alone at the copy rate: "
          f"{1e3 * WEIGHT_BYTES / args.copy_rate:.2f}) + K/V read at "
          f"{1e-9 / ms_per_byte:.2f} TB/s ({1e3 / ms_per_byte / args.copy_rate:.0%} "
          f"of the copy rate)")


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = (sum((x - mx) * (y - my) for x, y in points)
         / sum((x - mx) ** 2 for x, _ in points))
    return my - b * mx, b


if __name__ == "__main__":
    main()
