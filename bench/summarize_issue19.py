#!/usr/bin/env python3
"""The short table of bench/run_issue19_gpu.sh (issue 19), from the JSON files in OUT_DIR:
engine_new.json (this tree), engine_old.json (c9dfa4d) and engine_main.json (a1824fc) from
bench_engine_gpu.py, lora_kernels.json from bench_lora_kernels.py, tests.log from pytest.

    python bench/summarize_issue19.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUNS = (("base", "base"), ("lora_resident", "LoRA, 100 adapters resident"))
TARGET_SPEEDUP = 1.4
TARGET_COPY_PCT = 50


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def throughput(new: dict | None, olds: dict[str, dict | None]) -> list[str]:
    lines = ["| run | " + " | ".join(f"{k} tok/s" for k in olds) + " | new tok/s | "
             + " | ".join(f"new / {k}" for k in olds) + " |",
             "|" + "---|" * (2 + 2 * len(olds))]
    for key, label in RUNS:
        got = (new or {}).get(key, {}).get("output_tokens_per_s")
        cells, ratios = [], []
        for old in olds.values():
            ref = (old or {}).get(key, {}).get("output_tokens_per_s")
            cells.append(f"{ref:,.0f}" if ref else "-")
            if got and ref:
                mark = ">=" if got / ref >= TARGET_SPEEDUP else "<"
                ratios.append(f"**{got / ref:.2f}x** ({mark} {TARGET_SPEEDUP}x)")
            else:
                ratios.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {got or 0:,.0f} | "
                     + " | ".join(ratios) + " |")
    return lines


def step_kinds(name: str, result: dict | None) -> list[str]:
    """Per run: ms per step by kind (device time), paths, the mixed-step bound."""
    if not result:
        return [f"{name}: no result"]
    lines = [f"{name} ({result.get('device', '?')}, matmul {result.get('matmul_tflops', '?')} "
             f"TFLOP/s, engine start {result.get('engine_init_s', '?')} s)", "",
             "| run | kind | steps | device ms/step | host ms/step | paths | mixed bound ms/step "
             "| actual / bound (total) | within bound | JIT compiles |",
             "|" + "---|" * 10]
    for key, label in RUNS:
        run = result.get(key)
        if not run:
            continue
        bound = run.get("mixed_bound") or {}
        for kind, k in run.get("step_kinds", {}).items():
            mixed = kind == "mixed" and bound
            lines.append(
                f"| {label} | {kind} | {k['steps']} | {k['gpu_ms_per_step']:.1f} "
                f"| {k['host_ms_per_step']:.1f} | {k['paths']} "
                f"| {bound['bound_ms_per_step']:.1f} | {bound['actual_over_bound_total']:.2f} "
                f"| {bound['within_bound_pct']:.0f}% | {run.get('jit_compiles') or 0} |"
                if mixed else
                f"| {label} | {kind} | {k['steps']} | {k['gpu_ms_per_step']:.1f} "
                f"| {k['host_ms_per_step']:.1f} | {k['paths']} | - | - | - "
                f"| {run.get('jit_compiles') or 0} |")
    return lines


def old_phases(name: str, result: dict | None) -> list[str]:
    """Wall seconds per phase of an older bench (prefill = waiting requests or prompt left)."""
    if not result:
        return [f"{name}: no result"]
    lines = [f"{name}: wall s per phase (steps, seconds; 'prefill' = requests waiting or "
             f"prompt tokens left), engine start {result.get('engine_init_s', '?')} s"]
    for key, label in RUNS:
        run = result.get(key) or {}
        lines.append(f"- {label}: {run.get('steps_and_seconds_by_phase')}, "
                     f"jit {run.get('jit_compiles')}")
    return lines


def lora_kernels(result: dict | None) -> list[str]:
    rows = [r for r in (result or {}).get("results", []) if r["case"].startswith("prefill")]
    if not rows:
        return ["prefill LoRA kernels: no result"]
    r = rows[0]
    lines = ["| prefill LoRA, 8 x 256 tokens, 8 adapters | us | copy of its bytes (us) "
             "| % of copy speed (target >= 50%) |", "|---|---|---|---|"]
    for key, label in (("ours", "MBGMM shrink + expand (eager path)"),
                       ("ours_grouped", "grouped MBGMV, plan built once (mixed-step graphs)")):
        if f"{key}_us" in r:
            pct = 100 * r["copy_us"] / r[f"{key}_us"]
            lines.append(f"| {label} | {r[f'{key}_us']:.1f} | {r['copy_us']:.1f} | "
                         f"**{pct:.0f}%** |")
    sweep = (result or {}).get("sweep") or ""
    if sweep:  # the MBGMM expand sweep: each configuration's time, the kept one last
        lines += ["", "MBGMM expand sweep (the code's default is the first config tried; 'kept' "
                  "rows are relative to the fastest):", *sweep.splitlines()[-12:]]
    return lines


def tests(log: Path) -> str:
    try:
        text = log.read_text()
    except OSError:
        return "tests: no log"
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", text, re.M)
    return "tests: " + ("; ".join(found) if found else "no pytest summary (timed out?)")


def main() -> None:
    out = Path(sys.argv[1])
    new = load(out / "engine_new.json")
    olds = {"c9dfa4d": load(out / "engine_old.json"), "a1824fc": load(out / "engine_main.json")}
    olds = {k: v for k, v in olds.items() if v} or {"c9dfa4d": None}
    parts = [tests(out / "tests.log"), "", *throughput(new, olds), "",
             *step_kinds("new", new), ""]
    for name, old in olds.items():
        parts += [*old_phases(name, old), ""]
    parts += lora_kernels(load(out / "lora_kernels.json"))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
