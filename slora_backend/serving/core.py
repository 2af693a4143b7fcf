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

An add the engine refuses comes back at once as a finished RequestOutput carrying the error,
in a "step" message of its own; every output of a failed step (fail_all) in the step's.

Two threads: a reader applies each message as it arrives, while a step runs (the engine's
add_request and abort are thread-safe), and the loop steps. So a request's adapter starts
loading from disk (the prefetch at add_request) during the step in flight, not after it: a cold
request then usually joins the next step, as a warm one does (docs/DESIGN.md "Serving path").
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from slora_backend.config import EngineConfig
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.serving.server_watch import start_server_watch

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle loop sleeps this long (or until a message) before re-checking
EXIT_ENGINE_FAILED = 3  # a tensor-parallel worker died: the stub sees the core exit
STATS_INTERVAL_S = 0.05  # engine stats travel with a step message at most this often
CALLS = ("list_adapters", "resident_adapters")  # engine methods the stub may call


def core_main(config: EngineConfig, conn: Connection, server_pid: int | None = None) -> None:
    """Process entry point: build the engine, report ready (or why not), serve the pipe.
    `server_pid`: the tritonserver whose stub started this core (watched: server_watch.py)."""
    logging.basicConfig(level=logging.INFO, format="[slora core] %(levelname)s %(message)s")
    if server_pid is not None:
        start_server_watch(server_pid)
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
    """The reader thread applies messages as they come; the loop steps and sends each step's
    outputs in one message."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._stopping = False
        self._stats_at = 0.0
        self._wake = threading.Event()  # a message arrived: an idle loop looks again
        self._send_lock = threading.Lock()  # the reader sends refusals, the loop the rest
        self._calls: deque[tuple] = deque()  # answered by the loop between steps

    def run(self) -> None:
        from slora_backend.device import use_device

        use_device(self.engine.device)
        threading.Thread(target=self.read, name="slora-core-messages",
                         daemon=True).start()
        try:
            while True:
                if not self.engine.has_unfinished() and not self._calls:
                    self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()  # before looking: a message after this wakes the next wait
                self._answer_calls()
                self._publish(self._step() if self.engine.has_unfinished() else [])
                if self.engine.failure is not None:
                    self._fail()
                    return
                if self._stopping and not self.engine.has_unfinished():
                    self._send(("closed",))
                    return
        except (EOFError, OSError):  # the stub went away mid-send: nobody left to serve
            log.warning("the stub closed the pipe; engine core exits")

    def read(self) -> None:
        """The reader thread: apply each message as it arrives until the pipe closes."""
        try:
            while True:
                self.handle(self.conn.recv())
                self._wake.set()
        except (EOFError, OSError):  # the stub is gone: nobody to serve, wind down
            pass
        except Exception:  # a bug (a message it cannot read): the loop must not wait forever
            log.exception("engine core reader failed; the core winds down")
        self._stopping = True
        self.engine.abort_all()
        self._wake.set()

    def handle(self, msg: tuple) -> None:
        """Apply one message. A refused add's final (error) output is sent at once."""
        kind = msg[0]
        if kind == "add":
            _, request_id, prompt, token_ids, params, adapter_id = msg
            try:
                self.engine.add_request(request_id, prompt, token_ids, params, adapter_id)
            except EngineError as exc:
                self._send(("step", [_error_output(request_id, exc)], None))
            except Exception as exc:  # a bug: this request fails, the others go on
                log.exception("add of %s failed", request_id)
                self._send(("step", [_error_output(request_id, EngineError(
                    ErrorCode.INTERNAL, f"add failed: {exc!r}"))], None))
        elif kind == "abort":
            for request_id in msg[1]:
                self.engine.abort(request_id)
        elif kind == "call" and msg[2] in CALLS:
            self._calls.append(msg)  # the engine's state is the loop's: read between steps
        elif kind == "shutdown":
            self._stopping = True
            self.engine.abort_all()

    def _answer_calls(self) -> None:
        while self._calls:
            _, call_id, method = self._calls.popleft()
            self._send(("reply", call_id, getattr(self.engine, method)()))

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
            self._send(("step", outputs, stats))

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)


def _error_output(request_id: str, exc: EngineError) -> Any:
    """The refused request's final output. The error is detached from its traceback: the
    frames it holds include the reader's (`handle`, whose locals hold the request), a cycle
    that kept each refused request's inputs (16 MB for 2^20 ids) until a rare full gc."""
    from slora_backend.engine.engine import RequestOutput

    return RequestOutput(request_id, [], "", True, None, 0, 0, error=exc.detached())
