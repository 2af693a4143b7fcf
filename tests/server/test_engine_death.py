"""A dead engine core (its own process, slora_backend/serving) through the real server: the
request in flight ends with an INTERNAL error instead of hanging, and Triton's readiness
endpoint stops answering ready (the model stops the server, docs/DESIGN.md "Serving path")."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
from death_helpers import kill_under_stream, wait_for_log_line, wait_not_ready

from slora_backend.serving.server_watch import SHM_DIR, SHM_PREFIX, WATCH_INTERVAL_S
from slora_testing.synthetic_adapters import make_tiny_model

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
CORE_PID = re.compile(r"engine core pid (\d+)")
ORPHAN_TIMEOUT_S = 10 * WATCH_INTERVAL_S


def test_killed_engine_core_fails_requests_and_readiness(triton_server_factory,
                                                         tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny", TOKENIZER)
    with triton_server_factory(env={"SLORA_MODEL": str(model)}) as server:
        pids = CORE_PID.findall(server.log.read_text())
        assert len(pids) == 1, "the model logs its engine core's pid once"
        message = kill_under_stream(server, int(pids[0]))
        assert message.startswith("INTERNAL: engine core process exited"), message
        wait_not_ready(server)
        wait_for_log_line(server, "stopping tritonserver: the engine core is gone")


def test_a_crashed_server_leaves_no_stub_core_or_shared_memory(triton_server_factory,
                                                                tmp_path: Path) -> None:
    """tritonserver SIGKILLed under a stream (as a crash would end it): its Python backend
    stub, which Triton 2.51 leaves running when a model thread waits on the dead server (a
    Metric update in flight: not every time), the engine core and the stub's shared-memory
    region are all gone within seconds (server_watch.py)."""
    model = make_tiny_model(tmp_path / "tiny", TOKENIZER)
    with triton_server_factory(env={"SLORA_MODEL": str(model)}) as server:
        launcher = psutil.Process(server.pid)
        tree = [launcher, *launcher.children(recursive=True)]
        (triton,) = [p for p in tree if p.name() == "tritonserver"]
        (stub,) = [p for p in triton.children() if "python_backend_stub" in p.name()]
        (core,) = [p for p in stub.children() if p.pid == int(CORE_PID.findall(
            server.log.read_text())[0])]
        regions = [SHM_DIR / a for a in stub.cmdline() if a.startswith(SHM_PREFIX)]
        assert len(regions) == 1 and regions[0].exists()
        kill_under_stream(server, triton.pid)  # its metrics are updated at every step
        gone, alive = psutil.wait_procs([stub, core], timeout=ORPHAN_TIMEOUT_S)
        assert not alive, f"still running {ORPHAN_TIMEOUT_S} s after the server died: {alive}"
        assert not regions[0].exists()
