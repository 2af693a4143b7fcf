"""bench/bench_lora_kernels.py stays runnable: without CUDA it runs its correctness pass
under the interpreter (every implementation against the float64 reference, and the row-stream
reference kernel against torch), the same code paths its GPU run times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_lora_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark times: run by hand")
def test_bench_correctness_pass(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=BENCH.parents[1])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "correctness pass only" in res.stdout
    assert res.stdout.count('"ours_err"') == 4  # three decode cases and the prefill
