"""The Locust suite against the real server (tests/conftest.py's `triton_server`), on CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from loadtest.report import load_records, parse_summary_line
from loadtest.scenarios import load_scenario

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.server, pytest.mark.slow]


def ports(server) -> tuple[str, str]:
    return server.http_url.rsplit(":", 1)[1], server.grpc_url.rsplit(":", 1)[1]


def run_loadtest(server, out: Path, *args: str) -> subprocess.CompletedProcess:
    http, grpc = ports(server)
    cmd = [sys.executable, "-m", "loadtest.run", "--host", "localhost", "--http-port", http,
           "--grpc-port", grpc, "--out", str(out), "--wait-ready", "120", "--drain", "120",
           *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_headless_run_streams_adapters_over_grpc_and_http(triton_server, tmp_path):
    out = tmp_path / "smoke"
    proc = run_loadtest(triton_server, out, "--scenario", "smoke", "--duration", "15s",
                        "--users", "4")
    log = f"{proc.stdout}\n{proc.stderr}\n{triton_server.log_tail()}"
    assert proc.returncode == 0, log

    summary = parse_summary_line(proc.stdout)
    assert summary["scenario"] == "smoke"
    assert summary["failures"] == 0 and summary["ok"] >= 6, log
    assert summary["tok_per_s"] > 0 and summary["req_per_s"] > 0
    assert summary["ttft_p50_s"] > 0 and summary["ttft_p99_s"] >= summary["ttft_p50_s"]
    assert 0.0 <= summary["slo_attainment"] <= 1.0

    records = [r for r in load_records(out) if not r["unfinished"]]
    assert len(records) == summary["requests"]
    assert {r["protocol"] for r in records} == {"grpc", "http"}
    demo = set(load_scenario("smoke").adapters)
    assert len({r["adapter"] for r in records} & demo) >= 2, "several adapters"
    for r in records:
        assert r["ok"], r
        # ignore_eos: exactly max_tokens tokens, one inter-token gap per token after the first
        assert r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length", r
        assert len(r["itl"]) == r["output_tokens"] - 1, r
        assert 0 < r["ttft"] <= r["e2e"], r
        assert abs(r["num_input_tokens"] - r["input_tokens_target"]) <= 3, r

    # Locust's own reports: the named request types, E2E failures none
    rows = list(csv.DictReader((out / "locust_stats.csv").open()))
    by_type = {(row["Type"], row["Name"]): row for row in rows}
    assert {t for t, _ in by_type} >= {"TTFT", "ITL", "E2E"}
    e2e = sum(int(row["Request Count"]) for (t, _), row in by_type.items() if t == "E2E")
    assert e2e == len(records)
    assert all(int(row["Failure Count"]) == 0 for row in rows)
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "summary.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "summary.json").read_text())
    assert saved["ok"] == summary["ok"] and saved["slo_ttft_s"] == 6.0


def max_in_flight(records) -> int:
    events = sorted([(r["t_send"], 1) for r in records] + [(r["t_end"], -1) for r in records])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_grpc_streams_run_concurrently_under_gevent(triton_server, tmp_path):
    # tritonclient's stream thread blocks in grpcio's C core: without grpc's gevent support one
    # stream would stall the others (or hang); with it 4 users keep 4 streams in flight.
    out = tmp_path / "burst"
    proc = run_loadtest(triton_server, out, "--scenario", "smoke", "--protocol", "grpc",
                        "--duration", "3s", "--users", "4", "--set", "rate=20",
                        "--set", "output_len=[8,8]")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    records = [r for r in load_records(out) if not r["unfinished"]]
    assert len(records) >= 4 and all(r["ok"] and r["protocol"] == "grpc" for r in records)
    assert max_in_flight(records) == 4


def test_openai_chat_user_streams_through_the_openai_api(triton_server, openai_api, tmp_path):
    out = tmp_path / "openai"
    port = openai_api.rsplit(":", 1)[1]
    proc = run_loadtest(triton_server, out, "--scenario", "smoke", "--protocol", "openai",
                        "--openai-port", port, "--duration", "8s", "--users", "3")
    log = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, log
    records = [r for r in load_records(out) if not r["unfinished"]]
    assert len(records) >= 3 and all(r["ok"] and r["protocol"] == "openai" for r in records)
    assert len({r["adapter"] for r in records}) >= 2, "adapters as `model`"
    for r in records:
        # ignore_eos through the API: exactly max_tokens tokens (the usage event counts them);
        # the chat template adds its tokens to the prompt
        assert r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length", r
        assert r["num_input_tokens"] > r["input_tokens_target"] and 0 < r["ttft"] <= r["e2e"]
        assert 1 <= len(r["itl"]) <= r["output_tokens"] - 1, r
    rows = list(csv.DictReader((out / "locust_stats.csv").open()))
    assert {row["Type"] for row in rows} >= {"TTFT", "ITL", "E2E"}


def test_server_errors_are_locust_failures_with_the_server_message(triton_server, tmp_path):
    out = tmp_path / "errors"
    proc = run_loadtest(triton_server, out, "--scenario", "smoke", "--duration", "5s",
                        "--users", "2", "--set", 'adapters=["no-such-adapter"]',
                        "--set", "num_adapters=1", "--set", "base_fraction=0.0",
                        "--set", "rate=2")
    log = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 1, log
    summary = parse_summary_line(proc.stdout)
    assert summary["ok"] == 0 and summary["failures"] >= 2, log
    records = [r for r in load_records(out) if not r["unfinished"]]
    assert {r["protocol"] for r in records} == {"grpc", "http"}
    assert all("no-such-adapter" in r["error"] for r in records), records
    failures = list(csv.DictReader((out / "locust_failures.csv").open()))
    assert failures and all(f["Method"] == "E2E" and f["Name"] == "no-such-adapter"
                            and "no-such-adapter" in f["Error"] for f in failures), failures


def test_web_ui_starts_a_run_with_form_options(triton_server, tmp_path):
    http, grpc = ports(triton_server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web = s.getsockname()[1]
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--web-host",
           "127.0.0.1", "--web-port", str(web), "--http-port", http, "--grpc-port", grpc]
    env = {**os.environ, "LOADTEST_SCENARIO": "smoke", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{web}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "web UI did not start"
            time.sleep(0.5)
        form = {"user_count": 2, "spawn_rate": 2, "host": "localhost", "protocol": "http",
                "overrides": "rate=2 output_len=[4,6]"}
        assert requests.post(f"{base}/swarm", data=form, timeout=10).json()["success"]
        deadline = time.monotonic() + 90
        while True:
            stats = requests.get(f"{base}/stats/requests", timeout=10).json()["stats"]
            e2e = [s for s in stats if s["method"] == "E2E"]
            if sum(s["num_requests"] for s in e2e) >= 2:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(1)
        assert all(s["num_failures"] == 0 for s in stats), stats
        assert {s["method"] for s in stats if s["name"] != "Aggregated"} >= {"TTFT", "E2E"}
        requests.get(f"{base}/stop", timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert "protocol http" in output and "HttpStreamUser" in output, output
