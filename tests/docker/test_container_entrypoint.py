"""The container's entry point and health check, run here (no container needed):
docker/entrypoint.sh must start exactly what `make serve` starts, and docker/healthcheck.py
must tell a ready server from a missing one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from docker_files import DOCKER, REPO, free_port, make_serve_command

ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
# scripts/tritonserver.sh puts these first unless the command line has its own
LAUNCHER_DEFAULTS = ["--exit-timeout-secs", "5"]


def _entrypoint(*args: str, **env: str) -> list[str]:
    """What the entry point would exec as tritonserver: scripts/tritonserver.sh execs
    $TRITONSERVER when set, here /bin/echo, which prints the argv it was given. Run from
    another folder: the entry point must find the repo by itself."""
    res = subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=60,
                         cwd="/", env={**os.environ, "TRITONSERVER": "/bin/echo", **env})
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_entrypoint_runs_the_make_serve_command_with_the_port_variables():
    ports = {"HTTP_PORT": "18000", "GRPC_PORT": "18001", "METRICS_PORT": "18002"}
    make_argv = make_serve_command(**ports)
    assert make_argv[:3] == ["scripts/tritonserver.sh", "--model-repository", "model_repository"]
    assert _entrypoint(**ports) == LAUNCHER_DEFAULTS + make_argv[1:]


def test_entrypoint_defaults_are_the_makefile_defaults():
    env = {k: v for k, v in os.environ.items()
           if k not in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
    res = subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True, timeout=60,
                         env={**env, "TRITONSERVER": "/bin/echo"})
    assert res.returncode == 0, res.stderr
    default_make = subprocess.run(["make", "-n", "-s", "serve"], cwd=REPO, capture_output=True,
                                  text=True, env=env, timeout=60).stdout
    argv = res.stdout.split()
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        port = argv[argv.index(flag) + 1]
        assert f"{flag} {port}" in default_make.replace("\\\n", " ").replace("\t", " ")


def test_entrypoint_appends_options_and_runs_other_commands():
    assert _entrypoint("--log-verbose=1")[-1] == "--log-verbose=1"
    argv = _entrypoint("--exit-timeout-secs", "30")  # an explicit exit timeout wins
    assert argv.count("--exit-timeout-secs") == 1 and argv[-2:] == ["--exit-timeout-secs", "30"]
    res = subprocess.run([str(ENTRYPOINT), "python3", "-c", "import os; print(os.getcwd())"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == str(REPO), res.stderr


def test_healthcheck_fails_without_a_server():
    res = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "HTTP_PORT": str(free_port())})
    assert res.returncode == 1 and "/v2/health/ready" in res.stderr


@pytest.mark.server
def test_healthcheck_passes_on_the_ready_server(triton_server):
    port = triton_server.http_url.rsplit(":", 1)[1]
    res = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "HTTP_PORT": port})
    assert res.returncode == 0, res.stderr
