"""bench/bench_server_throughput.py (the multi-GPU throughput driver), a short run against the
session's real server on CPU: every request completes with exactly --max-tokens tokens across
the adapters, the figures add up, and a failing request makes the run fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from docker_files import REPO, demo_adapters

BENCH = REPO / "bench" / "bench_server_throughput.py"
pytestmark = pytest.mark.server


def _bench(triton_server, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--url", triton_server.grpc_url,
                           "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_bench_short_run(triton_server, tmp_path):
    adapters = demo_adapters()[:2] + [""]  # two demo adapters (when present) + base
    out = tmp_path / "bench.json"
    res = _bench(triton_server, out, "--concurrency", "3", "--procs", "2",
                 "--num-requests", "6", "--max-tokens", "5", "--input-tokens", "16",
                 "--adapters", ",".join(adapters))
    assert res.returncode == 0, res.stdout + res.stderr
    s = json.loads(out.read_text())
    assert (s["completed"], s["failed"], s["wrong_length"]) == (6, 0, 0)
    assert s["output_tokens"] == 6 * 5
    assert s["requests_per_s"] == pytest.approx(6 / s["elapsed_s"])
    assert s["output_tokens_per_s"] == pytest.approx(30 / s["elapsed_s"])
    assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] <= s["e2e_s"]["max"] < s["elapsed_s"] + 1
    per = s["per_adapter"]
    assert set(per) == {a or "<base>" for a in adapters}
    assert sum(v["completed"] for v in per.values()) == 6
    assert s["server_instance_groups"] and s["server_instance_groups"][0]["count"] >= 1
    assert "req/s" in res.stdout and "output tok/s" in res.stdout


def test_bench_reports_a_failing_adapter(triton_server, tmp_path):
    res = _bench(triton_server, tmp_path / "bench.json", "--concurrency", "1",
                 "--num-requests", "1", "--max-tokens", "2", "--adapters", "no-such-adapter")
    assert res.returncode == 1
    assert "no-such-adapter" in res.stderr
