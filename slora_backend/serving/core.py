"""The engine core: `LLMEngine` stepping in a process of its own (vLLM V1's EngineCore).

Inside Triton the model's threads (request admission, one response send and one histogram
observation per token, cancellation polls) ran in the stub process beside the engine loop and
held its GIL about as long as the steps did (py-spy, docs/BENCHMARKS.md). Here the engine owns
a process: the stub only moves messages. One duplex pipe carries:

stub -> core: ("add", request_id, prompt, prompt_token_ids, params, adapter_id),
              ("abort", [request_id, ...]), ("call", call_id, method), ("shutdown",)
core -> stub: ("ready",) or ("failed", EngineError) once at start, then one
              ("step", [RequestOutput, ...], EngineStats | None) per step with news,
              ("reply", call_id, result), and ("closed",) last.

An add the engine refuses comes back as a finished RequestOutput carrying the error, in the
next "step" message; so does every output of a failed step (fail_all).
"""

from __future__ import annotations

import logging
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from slora_backend.config import EngineConfig
from slora_backend.errors import EngineError, ErrorCode

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle core blocks this long on its pipe before re-checking
EXIT_ENGINE_FAILED = 3  # a tensor-parallel worker died: the stub sees the core exit
STATS_INTERVAL_S = 0.05  # engine stats travel with a step message at most this often
CALLS = ("list_adapters", "resident_adapters")  # engine methods the stub may call


def core_main(config: EngineConfig, conn: Connection) -> None:
    """Process entry point: build the engine, report ready (or why not), serve the pipe."""
    logging.basicConfig(level=logging.INFO, format="[slora core] %(levelname)s %(message)s")
    from slora_backend.engine.engine import LLMEngine  # torch: only in this process

    try:
        engine = LLMEngine(config)
    except EngineError as exc:
        conn.send(("failed", exc))
        return
    except Exception as exc:  # a bug or a broken model file: the model must not load
        log.exception("engine start failed")
        conn.send(("failed", EngineError(ErrorCode.INTERNAL, f"engine start failed: {exc!r}")))
        return
    conn.send(("ready",))
    try:
        EngineCore(engine, conn).run()
    finally:
        engine.close()
    if engine.failure is not None:
        sys.exit(EXIT_ENGINE_FAILED)


class EngineCore:
    """The loop: take every queued message, step, send this step's outputs in one message."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._stopping = False
        self._stats_at = 0.0

    def run(self) -> None:
        from slora_backend.device import use_device

        use_device(self.engine.device)
        try:
            while True:
                busy = self.engine.has_unfinished()
                outputs = self._take_messages(0.0 if busy else IDLE_WAIT_S)
                if self.engine.has_unfinished():
                    outputs += self._step()
                self._publish(outputs)
                if self.engine.failure is not None:
                    self._fail()
                    return
                if self._stopping and not self.engine.has_unfinished():
                    self.conn.send(("closed",))
                    return
        except (EOFError, OSError):  # the stub went away mid-send: nobody left to serve
            log.warning("the stub closed the pipe; engine core exits")

    def _take_messages(self, timeout: float) -> list:
        outputs: list = []
        try:
            while self.conn.poll(timeout):
                timeout = 0.0
                error = self._handle(self.conn.recv())
                if error is not None:
                    outputs.append(error)
        except (EOFError, OSError):  # the stub is gone: nobody to serve, wind down
            self._stopping = True
            self.engine.abort_all()
        return outputs

    def _handle(self, msg: tuple) -> Any:
        """Apply one message; a refused add becomes its final (error) output."""
        kind = msg[0]
        if kind == "add":
            _, request_id, prompt, token_ids, params, adapter_id = msg
            try:
                self.engine.add_request(request_id, prompt, token_ids, params, adapter_id)
            except EngineError as exc:
                return _error_output(request_id, exc)
        elif kind == "abort":
            for request_id in msg[1]:
                self.engine.abort(request_id)
        elif kind == "call" and msg[2] in CALLS:
            self.conn.send(("reply", msg[1], getattr(self.engine, msg[2])()))
        elif kind == "shutdown":
            self._stopping = True
            self.engine.abort_all()
        return None

    def _step(self) -> list:
        try:
            return self.engine.step()
        except Exception as exc:  # keep serving: fail the running requests, not the core
            log.exception("engine step failed")
            return self.engine.fail_all(EngineError(ErrorCode.INTERNAL,
                                                    f"engine step failed: {exc}"))

    def _fail(self) -> None:
        """The engine cannot step any more (a tensor-parallel worker died): its requests end
        with the error, and the core exits, which the stub handles like its death (INTERNAL
        to whatever is left, then the server stops: Triton's health endpoints say so)."""
        log.error("engine failed: %s; the engine core exits", self.engine.failure.message)
        self._publish(self.engine.fail_all(self.engine.failure))

    def _publish(self, outputs: list) -> None:
        now = time.monotonic()
        stats = None
        if now - self._stats_at >= STATS_INTERVAL_S:
            stats, self._stats_at = self.engine.stats(), now
        if outputs or stats is not None:
            self.conn.send(("step", outputs, stats))


def _error_output(request_id: str, exc: EngineError) -> Any:
    """The refused request's final output. The error is detached from its traceback: the
    frames it holds include this loop's (`_take_messages`, whose locals hold the outputs), a
    cycle that kept each refused request's inputs (16 MB for 2^20 ids) until a rare full gc."""
    from slora_backend.engine.engine import RequestOutput

    return RequestOutput(request_id, [], "", True, None, 0, 0, error=exc.detached())
