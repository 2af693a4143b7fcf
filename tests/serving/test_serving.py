"""The engine core process (slora_backend/serving) without Triton: the same tokens as the
engine in-process, refusals as error outputs, shutdown delivers 'cancelled', a killed core is
reported; and response coalescing keeps the streaming contract."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest

from slora_backend import (
    EngineConfig,
    EngineError,
    ErrorCode,
    LLMEngine,
    RequestOutput,
    SamplingParams,
)
from slora_backend.logprobs import TokenLogprobs
from slora_backend.serving.client import EngineClient
from slora_backend.serving.coalesce import coalesce
from slora_backend.serving.core import EngineCore
from slora_testing import synthetic_adapters as synth

pytestmark = pytest.mark.slow  # each test spawns an engine core process

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
PROMPTS = ["Once upon a time", "The sky is", "One two three"]
MAX_TOKENS = 12
TIMEOUT_S = 60.0
HOLD_S = 10.0  # how long a held step waits for an add that a broken core never applies


def out(rid: str, ids: list[int], text: str, finished: bool = False,
        reason: str | None = None, n: int = 0) -> RequestOutput:
    return RequestOutput(rid, ids, text, finished, reason, 3, n)


def test_coalesce_merges_a_backlog_per_request_in_order() -> None:
    batches = [[out("a", [1], "h", n=1), out("b", [7], "x", n=1)],
               [out("a", [2], "é", n=2)],
               [out("b", [8], "", n=2), out("a", [3], "!", True, "length", 3)]]
    merged = coalesce(batches)
    assert [m.request_id for m in merged] == ["a", "b"]
    a, b = merged
    assert (a.new_token_ids, a.new_text, a.finished, a.finish_reason, a.num_output_tokens) == \
        ([1, 2, 3], "hé!", True, "length", 3)
    assert (b.new_token_ids, b.new_text, b.finished, b.num_output_tokens) == ([7, 8], "x", False, 2)
    assert coalesce([[out("c", [5], "y")]])[0] == out("c", [5], "y")  # alone: untouched


def test_coalesce_keeps_every_tokens_logprobs() -> None:
    def with_lp(token: int, finished: bool = False) -> RequestOutput:
        lp = TokenLogprobs(token, -0.5 * token, token, ((token, -0.5 * token),))
        return dataclasses.replace(out("a", [token], "t", finished), new_logprobs=[lp],
                                   cumulative_logprob=-float(token))

    merged = coalesce([[with_lp(1)], [with_lp(2)], [with_lp(3, True)]])[0]
    assert [lp.token_id for lp in merged.new_logprobs] == merged.new_token_ids == [1, 2, 3]
    assert merged.cumulative_logprob == -3.0 and merged.finished


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> EngineConfig:
    root = tmp_path_factory.mktemp("core")
    model = synth.make_tiny_model(root / "tiny", TOKENIZER)
    return EngineConfig(model=str(model), adapter_dir=str(root), device="cpu",
                        pool_bytes=64 << 20)


class Collector:
    """on_outputs / on_death of an EngineClient: outputs per request, the death reason."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.finished: queue.Queue = queue.Queue()
        self.died = threading.Event()
        self.reason = ""

    def on_outputs(self, batch: list[RequestOutput]) -> None:
        for o in batch:
            self.outputs.setdefault(o.request_id, []).append(o)
            if o.finished:
                self.finished.put(o)

    def on_death(self, reason: str) -> None:
        self.reason = reason
        self.died.set()


def in_process_tokens(config: EngineConfig, params: SamplingParams) -> dict[str, list[int]]:
    engine = LLMEngine(config)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params=params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.close()
    return tokens


def test_core_process_matches_in_process_and_refuses_bad_adds(config: EngineConfig) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    sink = Collector()
    core = EngineClient(config, sink.on_outputs, sink.on_death)
    try:
        for i, prompt in enumerate(PROMPTS):
            core.add_request(f"r{i}", prompt, None, params, None)
        core.add_request("bad", None, [10 ** 9], params, None)
        core.add_request("nope", "hi", None, params, "no-such-adapter")
        finals = {o.request_id: o for o in (sink.finished.get(timeout=TIMEOUT_S)
                                            for _ in range(len(PROMPTS) + 2))}
        assert finals["bad"].error.code == ErrorCode.INVALID_ARG
        assert finals["nope"].error.code == ErrorCode.NOT_FOUND
        served = {rid: [t for o in outs for t in o.new_token_ids]
                  for rid, outs in sink.outputs.items() if rid.startswith("r")}
        assert served == in_process_tokens(config, params)
        assert all(finals[f"r{i}"].finish_reason == "length" for i in range(len(PROMPTS)))
        assert core.call("resident_adapters") == []
    finally:
        core.shutdown()
    assert not sink.died.is_set()  # an ordered shutdown is no death


def test_shutdown_cancels_running_requests(config: EngineConfig) -> None:
    sink = Collector()
    core = EngineClient(config, sink.on_outputs, sink.on_death)
    core.add_request("long", "Hi", None, SamplingParams(max_tokens=1500, ignore_eos=True), None)
    core.shutdown()
    assert sink.finished.get(timeout=TIMEOUT_S).finish_reason == "cancelled"
    core.shutdown()  # again (finalize after SIGTERM): a no-op
    with pytest.raises(EngineError, match="UNAVAILABLE: server shutting down"):
        core.add_request("late", "Hi", None, SamplingParams(), None)
    assert not sink.died.is_set()


def test_killed_core_is_reported(config: EngineConfig) -> None:
    sink = Collector()
    core = EngineClient(config, sink.on_outputs, sink.on_death)
    os.kill(core.pid, signal.SIGKILL)
    assert sink.died.wait(TIMEOUT_S)
    assert sink.reason == f"engine core process exited (exit code {-signal.SIGKILL})"
    with pytest.raises(Exception, match="UNAVAILABLE: engine core is down"):
        core.add_request("late", "Hi", None, SamplingParams(), None)
    core.shutdown()


def test_a_refused_add_leaves_no_garbage(config: EngineConfig) -> None:
    """A refused add ends as an output carrying the error. With its traceback, the error kept
    the frames it was raised through, and the core loop's frame (whose locals hold the outputs)
    closed a cycle that only a rare full gc frees: the core grew by the refused request's token
    ids, 16 MB for 2^20 of them, per request (found by bench/soak_server.py's hostile mix)."""
    engine = LLMEngine(config)
    ours, theirs = multiprocessing.Pipe()
    core = EngineCore(engine, theirs)
    too_long = [1] * (engine.max_model_len + 1)
    gc.collect()
    gc.disable()  # only the collection below may find (and count) cycles
    try:
        core.handle(("add", "long", None, too_long, SamplingParams(max_tokens=1), None))
        kind, (output,), _ = ours.recv()  # sent at once, not with the next step
        assert kind == "step" and output.error.code == ErrorCode.INVALID_ARG and output.finished
        del output
        assert gc.collect() == 0, "the refused request left a reference cycle behind"
    finally:
        gc.enable()
        engine.close()


def test_an_add_that_hits_a_bug_fails_alone(config: EngineConfig,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception in add_request (a bug) ends that request with INTERNAL; the
    core's reader goes on with the next message."""
    engine = LLMEngine(config)
    ours, theirs = multiprocessing.Pipe()
    core = EngineCore(engine, theirs)
    add = engine.add_request
    try:
        monkeypatch.setattr(engine, "add_request", lambda *a: 1 / 0)
        core.handle(("add", "bug", "Hi", None, SamplingParams(max_tokens=1), None))
        kind, (output,), _ = ours.recv()
        assert output.request_id == "bug" and output.finished
        assert output.error.code == ErrorCode.INTERNAL and "ZeroDivisionError" in str(output.error)
        monkeypatch.setattr(engine, "add_request", add)
        core.handle(("add", "next", "Hi", None, SamplingParams(max_tokens=1), None))
        assert engine.scheduler.live_ids() == ["next"]
    finally:
        engine.close()

def test_an_add_is_applied_while_a_step_runs(config: EngineConfig) -> None:
    """The core's reader applies an add at once, while a step runs, and the add's prefetch
    starts its adapter's disk -> host load then. Before, the core read its pipe only between
    steps: a cold request waited for the step in flight, then its load, then one more step
    (+110-170 ms through the server on the CPU, docs/BENCHMARKS.md)."""
    adapter = "cold"
    recipe = synth.AdapterRecipe(8, ("q_proj", "v_proj"), 16.0, False, "list", seed=3)
    synth.write_adapter(Path(config.adapter_dir) / adapter, synth.adapter_config(recipe),
                        synth.adapter_tensors(recipe, synth.load_spec(config.model)))
    engine = LLMEngine(config)
    ours, theirs = multiprocessing.Pipe()
    core = EngineCore(engine, theirs)
    in_step, seen = threading.Event(), []
    step = engine.step

    def held_step() -> list:
        """The first step with a running request waits (up to HOLD_S) for the cold add."""
        if engine.scheduler.running and not in_step.is_set():
            in_step.set()
            deadline = time.monotonic() + HOLD_S
            while "late" not in engine.scheduler.seqs and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append(engine.host_cache.loading(adapter)
                        or adapter in engine.host_cache.resident())
        return step()

    engine.step = held_step
    loop = threading.Thread(target=core.run)
    loop.start()
    try:
        ours.send(("add", "first", "Hi", None, SamplingParams(max_tokens=3, ignore_eos=True),
                   None))
        assert in_step.wait(TIMEOUT_S)
        ours.send(("add", "late", "Hi", None, SamplingParams(max_tokens=1), adapter))
        finished = set()
        while finished != {"first", "late"}:
            assert ours.poll(TIMEOUT_S)
            msg = ours.recv()
            finished |= {o.request_id for o in msg[1] if msg[0] == "step" and o.finished
                         and o.error is None}
        assert seen == [True], "the add and its adapter's load waited for the step to end"
    finally:
        ours.send(("shutdown",))
        loop.join(TIMEOUT_S)
        engine.close()
    assert not loop.is_alive()
