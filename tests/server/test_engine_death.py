"""A dead engine core (its own process, slora_backend/serving) through the real server: the
request in flight ends with an INTERNAL error instead of hanging, and Triton's readiness
endpoint stops answering ready (the model stops the server, docs/DESIGN.md "Serving path")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from death_helpers import kill_under_stream, wait_not_ready

from slora_testing.synthetic_adapters import make_tiny_model

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
CORE_PID = re.compile(r"engine core pid (\d+)")


def test_killed_engine_core_fails_requests_and_readiness(triton_server_factory,
                                                         tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny", TOKENIZER)
    with triton_server_factory(env={"SLORA_MODEL": str(model)}) as server:
        pids = CORE_PID.findall(server.log.read_text())
        assert len(pids) == 1, "the model logs its engine core's pid once"
        message = kill_under_stream(server, int(pids[0]))
        assert message.startswith("INTERNAL: engine core process exited"), message
        wait_not_ready(server)
        assert "stopping tritonserver: the engine core is gone" in server.log.read_text()
