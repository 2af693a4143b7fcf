"""Helpers for the server tests: a `srv` fixture wrapping the session's real tritonserver."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from client import Chunk, GenerateRequest, generate_http, stream_grpc, stream_grpc_values

METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? "
                         r"(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
WAIT_POLL_S = 0.1


@dataclass
class Server:
    """The running server plus small request / metrics helpers."""

    info: Any  # tests/conftest.py TritonServer: http_url, grpc_url, metrics_url, log_tail()

    def stream(self, request: GenerateRequest) -> list[Chunk]:
        """All responses of one gRPC streaming request."""
        return list(stream_grpc(self.info.grpc_url, request))

    def stream_values(self, values: dict[str, Any]) -> list[Chunk]:
        """Like stream() with raw input values (e.g. sampling_parameters, input_ids)."""
        return list(stream_grpc_values(self.info.grpc_url, values))

    @staticmethod
    def text(chunks: list[Chunk]) -> str:
        return "".join(c.text for c in chunks)

    def generate(self, request: GenerateRequest) -> Chunk:
        return generate_http(self.info.http_url, request)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """The Prometheus endpoint parsed: (name, labels) -> value."""
        text = requests.get(self.info.metrics_url, timeout=10).text
        values = {}
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match and not line.startswith("#"):
                labels = frozenset(LABEL.findall(match["labels"] or ""))
                values[(match["name"], labels)] = float(match["value"])
        return values

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the series `name` whose labels include `labels` (0 when absent)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= lab)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(WAIT_POLL_S)


@pytest.fixture(scope="session")
def srv(triton_server: Any) -> Server:
    return Server(triton_server)



@pytest.fixture(scope="session")
def wrap_server() -> type[Server]:
    """Server helpers for a server from `triton_server_factory`: `wrap_server(server)`."""
    return Server
