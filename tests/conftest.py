"""Shared fixtures: one real tritonserver (scripts/tritonserver.sh) for the whole session.

`triton_server` starts `scripts/tritonserver.sh --model-repository model_repository` on free
ports, waits until /v2/health/ready answers (model load on 2 cores takes a while), yields the
URLs and stops the server at the end of the session. Set SLORA_TEST_SERVER=HTTP,GRPC,METRICS
(three localhost ports) to run the tests against a server that is already running instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from slora_testing.servers import STOP_TIMEOUT_S, free_ports, stop_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO_ROOT / "scripts" / "tritonserver.sh"
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
READY_TIMEOUT_S = float(os.environ.get("SLORA_TEST_READY_TIMEOUT", "900"))
POLL_S = 0.5
LOG_TAIL_CHARS = 6000
EXTERNAL_SERVER_ENV = "SLORA_TEST_SERVER"
OPENAI_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TritonServer:
    """Where a running server listens; `log` is its log file and `pid` the launcher's process
    (None for an external server)."""

    http_url: str  # host:port, for tritonclient.http / requests (prefix http://)
    grpc_url: str  # host:port, for tritonclient.grpc
    metrics_url: str  # full URL of the Prometheus endpoint
    log: Path | None = None
    pid: int | None = None

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def _answers(url: str) -> bool:
    """GET url answers 200."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _ready(server: TritonServer) -> bool:
    """Ready, metrics included: tritonserver starts its metrics service after the HTTP one,
    so /v2/health/ready can answer while /metrics still refuses connections (a test that read
    a counter first thing failed so in CI)."""
    return _answers(f"http://{server.http_url}/v2/health/ready") and _answers(server.metrics_url)


def start_triton_server(log: Path, env: dict[str, str] | None = None,
                        extra_args: list[str] | None = None,
                        repository: Path = MODEL_REPOSITORY,
                        ) -> tuple[subprocess.Popen, TritonServer]:
    """Start scripts/tritonserver.sh on free ports and wait until it is ready."""
    http, grpc, metrics = free_ports(3)
    cmd = [
        str(SERVER_SCRIPT), "--model-repository", str(repository),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        *(extra_args or []),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    server = TritonServer(f"localhost:{http}", f"localhost:{grpc}",
                          f"http://localhost:{metrics}/metrics", log, proc.pid)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ready(server):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"tritonserver did not become ready (exit {proc.returncode}):\n"
                        f"{server.log_tail()}")
        time.sleep(POLL_S)
    return proc, server


@pytest.fixture(scope="session")
def triton_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., contextlib.AbstractContextManager[TritonServer]]:
    """A second server with other settings: `with triton_server_factory(env={...}) as server:`
    (e.g. SLORA_MAX_WAITING=1 for queue-full tests), or another model repository
    (`repository=`); stopped when the block ends."""

    @contextlib.contextmanager
    def factory(env: dict[str, str] | None = None,
                repository: Path = MODEL_REPOSITORY) -> Iterator[TritonServer]:
        proc, server = start_triton_server(tmp_path_factory.mktemp("triton") / "server.log", env,
                                           repository=repository)
        try:
            yield server
        finally:
            stop_server(proc)

    return factory


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The session's real tritonserver serving model_repository/slora."""
    external = os.environ.get(EXTERNAL_SERVER_ENV)
    if external:
        http, grpc, metrics = external.split(",")
        yield TritonServer(f"localhost:{http}", f"localhost:{grpc}",
                           f"http://localhost:{metrics}/metrics")
        return
    proc, server = start_triton_server(tmp_path_factory.mktemp("triton") / "server.log")
    try:
        yield server
    finally:
        stop_server(proc)


@contextlib.contextmanager
def openai_api_server(grpc_url: str, log: Path, *args: str) -> Iterator[str]:
    """`python -m client.openai_api ARGS` in front of the Triton server at grpc_url, on a
    free port, until the block ends: its base URL (http://localhost:PORT)."""
    (port,) = free_ports(1)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "client.openai_api", "--port", str(port),
                                 "--triton-url", grpc_url, *args], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + OPENAI_READY_TIMEOUT_S
    try:
        while not _answers(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the OpenAI API server did not start:\n{log.read_text()}")
            time.sleep(POLL_S)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def openai_api(triton_server: TritonServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The OpenAI API server in front of `triton_server`: its base URL."""
    log = tmp_path_factory.mktemp("openai_api") / "server.log"
    with openai_api_server(triton_server.grpc_url, log) as url:
        yield url


@pytest.fixture(scope="session")
def openai_api_factory(tmp_path_factory: pytest.TempPathFactory
                       ) -> Callable[..., contextlib.AbstractContextManager[str]]:
    """Another OpenAI API server with other flags: `with openai_api_factory(grpc_url,
    "--max-in-flight", "1") as url:`."""

    def factory(grpc_url: str, *args: str) -> contextlib.AbstractContextManager[str]:
        log = tmp_path_factory.mktemp("openai_api") / "server.log"
        return openai_api_server(grpc_url, log, *args)

    return factory
