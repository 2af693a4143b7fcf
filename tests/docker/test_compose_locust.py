"""The Locust master and worker of docker/compose.yaml, run here as the compose file runs them
(its own commands and LOADTEST_* variables; the compose service names become localhost),
distributed over two processes, headless, against the session's real server."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from docker_files import COMPOSE, REPO, free_port, load_compose

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _locust_services() -> tuple[list[str], list[str]]:
    services = load_compose(COMPOSE)["services"]
    master = next(s for s in services.values() if "--master" in s.get("command", []))
    worker = next(s for s in services.values() if "--worker" in s.get("command", []))
    return list(master["command"]), list(worker["command"])


def _replace_value(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def test_compose_locust_master_and_worker_run_the_suite(triton_server, tmp_path):
    master, worker = _locust_services()
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    master = _replace_value(master, "--host", "localhost") + [
        "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--headless",
        "--expect-workers", "1", "-u", "2", "-r", "2", "-t", "12s", "--stop-timeout", "120",
        "--csv", str(tmp_path / "locust")]
    worker = _replace_value(worker, "--master-host", "127.0.0.1") + ["--master-port", port]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "HTTP_PORT": triton_server.http_url.rsplit(":", 1)[1],
           "GRPC_PORT": triton_server.grpc_url.rsplit(":", 1)[1],
           "LOADTEST_SCENARIO": "smoke", "LOADTEST_PROFILE": "cpu"}
    w = subprocess.Popen(worker, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        m = subprocess.run(master, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    finally:
        try:
            w.wait(timeout=60)  # the master tells it to quit
        except subprocess.TimeoutExpired:
            w.kill()
    worker_log = w.stdout.read()
    assert m.returncode == 0, m.stderr[-4000:] + worker_log[-2000:]
    with open(tmp_path / "locust_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    e2e = [r for (kind, _), r in rows.items() if kind == "E2E"]
    assert sum(int(r["Request Count"]) for r in e2e) >= 3, rows.keys()
    assert sum(int(r["Failure Count"]) for r in e2e) == 0
    assert "scenario smoke" in worker_log  # the worker ran the scenario the env var named
