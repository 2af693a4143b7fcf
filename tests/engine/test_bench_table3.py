"""bench/bench_table3.py (S-LoRA's Table 3) runs end to end on the CPU with a tiny random model:
every case of the table is there, each run served every request on the one engine from empty
tiers, cold runs read their adapters from disk while serving and preloaded runs before the
clock, the plot and the table are written; a deadline skips runs instead of overrunning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_table3.py"
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
NUM_REQUESTS = 8


def _bench(out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(BENCH), "--tokenizer", str(TOKENIZER), "--tiny", "--device", "cpu",
           "--num-requests", str(NUM_REQUESTS), "--lengths", "4,12", "--host-cache-gib", "1",
           "--host-cache-workers", "2", "--out", str(out), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def test_table3_cpu_run(tmp_path: Path) -> None:
    out = tmp_path / "table3.json"
    stdout = _bench(out, "--ns", "0,2,8")
    results = json.loads(out.read_text())
    runs = {(r["n"], r["mode"]): r for r in results["runs"]}
    assert [(r["n"], r["mode"]) for r in results["runs"]] == [
        (0, "base"), (2, "cold"), (8, "cold"), (2, "preloaded"), (8, "preloaded")]
    assert results["skipped"] == [] and "targets:" in stdout and "preloaded" in stdout
    for run in runs.values():
        assert run["requests"] == NUM_REQUESTS and run["requests_per_s"] > 0
    assert len({run["pool_pages"] for run in runs.values()}) == 1  # one engine
    assert runs[(0, "base")]["per_request"]["pool_loads"] == 0
    for n in (2, 8):
        cold, pre = runs[(n, "cold")], runs[(n, "preloaded")]
        used = cold["distinct_adapters"]
        assert 1 <= used <= n and pre["distinct_adapters"] == used  # same draws in both modes
        assert cold["host_loads"] == used and cold["preload"] is None
        assert pre["host_loads"] == 0 and pre["preload"]["adapters"] == used
        assert cold["per_request"]["pool_loads"] * NUM_REQUESTS == used
    assert out.with_suffix(".png").stat().st_size > 0


def test_table3_deadline_skips_runs(tmp_path: Path) -> None:
    out = tmp_path / "table3.json"
    _bench(out, "--ns", "0,2", "--deadline-s", "0.01")  # already past it after the start-up
    results = json.loads(out.read_text())
    assert results["runs"] == []
    assert [(s["n"], s["mode"]) for s in results["skipped"]] == [
        (0, "base"), (2, "cold"), (2, "preloaded")]
