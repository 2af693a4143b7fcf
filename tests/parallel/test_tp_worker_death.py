"""A tensor-parallel worker that dies mid-run: the requests in flight end with an INTERNAL
error naming the worker (promptly, no hang), the engine reports itself failed (`failure`,
which makes the engine core exit: tests/server/test_tensor_parallel.py) and refuses new
requests with UNAVAILABLE."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
from tp_helpers import engine_config, make_tp_model

from slora_backend import EngineError, EngineLoop, ErrorCode, LLMEngine, SamplingParams

TOKENS_BEFORE_KILL = 4
OUTPUT_TIMEOUT_S = 60.0
ERROR_TIMEOUT_S = 10.0


def test_killed_worker_fails_requests_and_engine(tmp_path) -> None:
    model, adapters = make_tp_model(tmp_path)
    engine = LLMEngine(engine_config(model, adapters, 2))
    outputs: queue.Queue = queue.Queue()
    loop = EngineLoop(engine, outputs.put)
    loop.start()
    try:
        params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        for rid, adapter in (("base", None), ("lora", "r4_all")):
            loop.add_request(rid, prompt_token_ids=list(range(10, 30)), params=params,
                             adapter_id=adapter)
        for _ in range(TOKENS_BEFORE_KILL):
            out = outputs.get(timeout=OUTPUT_TIMEOUT_S)
            assert out.error is None and not out.finished, out
        assert engine.failure is None
        (worker,) = engine.tp.pids()
        os.kill(worker, signal.SIGKILL)
        failed = {}
        deadline = time.monotonic() + ERROR_TIMEOUT_S
        while len(failed) < 2:
            out = outputs.get(timeout=max(0.0, deadline - time.monotonic()))
            if out.error is not None:
                assert out.finished
                failed[out.request_id] = out.error
        for error in failed.values():
            assert error.code is ErrorCode.INTERNAL
            assert error.message == (f"tensor-parallel worker rank 1 (pid {worker}) exited "
                                     f"(exit code {-signal.SIGKILL})")
        assert engine.failure is not None
        with pytest.raises(EngineError) as refused:
            loop.add_request("later", prompt_token_ids=[1, 2, 3])
        assert refused.value.code is ErrorCode.UNAVAILABLE
    finally:
        loop.shutdown()
