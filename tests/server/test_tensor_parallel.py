"""Tensor parallelism through the real server on the CPU: an engine of 2 ranks (gloo) serving
SmolLM2 answers like the session's 1-rank server, the demo adapters included (greedy token
ids equal); then a worker killed under a streaming request ends it with INTERNAL and the
server stops answering ready. SmolLM2-135M's 9 query / 3 KV heads do not split 2 ways: the
engine pads them with zero heads to 12 / 4 (parallel/shard.py pad_heads), exact, and logs it."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from death_helpers import kill_under_stream, wait_for_log_line, wait_not_ready

from client import GenerateRequest

pytestmark = [pytest.mark.server, pytest.mark.slow]

TP = 2
ADAPTERS = (None, "uppercase", "signoff", "pirate")
PROMPT = "Why is the sky blue?"  # not among the demo adapters' training questions
MAX_TOKENS = 24  # each step is ~180 gloo collectives between processes: slow
PIRATE_OPENING = "Arr, Captain Lora here!"
WORKER_PID = re.compile(r"tensor-parallel worker rank \d+: pid (\d+)")
PADDED = ("9 query / 3 KV heads padded to 12 / 4 for tensor_parallel_size 2 (zero heads, "
          "exact): attention does 33% more work")


def _answers(server) -> dict[str | None, tuple[list[int], str]]:  # noqa: ANN001 (a Server)
    """Token ids and text of each adapter's (and the base model's) greedy answer."""

    def one(adapter: str | None) -> tuple[list[int], str]:
        chunks = server.stream(GenerateRequest(PROMPT, adapter_id=adapter, chat=True,
                                               max_tokens=MAX_TOKENS, temperature=0.0))
        return [t for c in chunks for t in c.token_ids], server.text(chunks)

    with ThreadPoolExecutor(len(ADAPTERS)) as pool:
        return dict(zip(ADAPTERS, pool.map(one, ADAPTERS)))


def test_two_ranks_answer_like_one_and_a_dead_worker_stops_the_server(
        srv, triton_server_factory, wrap_server) -> None:
    one_rank = _answers(srv)
    with triton_server_factory(env={"SLORA_TENSOR_PARALLEL_SIZE": str(TP)}) as server:
        two_ranks = _answers(wrap_server(server))
        assert two_ranks == one_rank
        pirate = two_ranks["pirate"][1]
        assert pirate.startswith(PIRATE_OPENING), pirate  # the adapters act
        log = server.log.read_text()
        assert log.count(PADDED) == 1, server.log_tail()  # once, by rank 0
        workers = WORKER_PID.findall(log)
        assert len(workers) == TP - 1, server.log_tail()
        message = kill_under_stream(server, int(workers[-1]))
        assert message.startswith("INTERNAL: "), message
        wait_not_ready(server)
        wait_for_log_line(server, "stopping tritonserver: the engine core is gone")
        log = server.log.read_text()  # the reason is logged before the line waited for
        assert f"tensor-parallel worker rank {TP - 1} (pid {workers[-1]}) exited" in log
