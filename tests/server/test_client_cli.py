"""`python -m client` against the real server (subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Why is the sky blue?"
PIRATE_OPENING = "Arr, Captain Lora here!"
CLI_TIMEOUT_S = 300


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


@pytest.mark.parametrize("mode", [["--protocol", "grpc"], ["--protocol", "http"],
                                  ["--protocol", "http", "--no-stream"]])
def test_cli_generates(srv, mode: list[str]) -> None:
    url = srv.info.grpc_url if "grpc" in mode else srv.info.http_url
    done = run_cli(PROMPT, "--adapter", "pirate", "--chat", "--url", url, *mode)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(PIRATE_OPENING), done.stdout
    assert "[finish_reason: stop" in done.stdout or "[finish_reason: length" in done.stdout


def test_cli_error_exits_nonzero_with_server_message(srv) -> None:
    done = run_cli(PROMPT, "--adapter", "no-such-adapter", "--url", srv.info.grpc_url)
    assert done.returncode != 0
    assert "no-such-adapter" in done.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_list_adapters(srv, protocol: str) -> None:
    url = srv.info.grpc_url if protocol == "grpc" else srv.info.http_url
    done = run_cli("--list-adapters", "--protocol", protocol, "--url", url)
    assert done.returncode == 0, done.stderr
    assert '"available"' in done.stdout and "pirate" in done.stdout
