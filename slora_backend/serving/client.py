"""EngineClient: the stub's side of the engine core process (serving/core.py).

Starts the core (multiprocessing spawn: a fresh interpreter, no state of the Triton stub
shared), waits for it to be ready, then a reader thread hands each step's outputs to
`on_outputs` as one list and keeps the latest EngineStats. When the core dies the pipe reaches
EOF and `on_death(reason)` runs once; calls after that raise UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from slora_backend.config import EngineConfig
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.serving.core import core_main

log = logging.getLogger(__name__)

START_POLL_S = 0.5  # how often start-up checks that the core is still alive
CALL_TIMEOUT_S = 30.0  # a control call (list_adapters) waits at most this long
JOIN_TIMEOUT_S = 60.0  # shutdown: how long the core may take to drain its requests


def _python_executable() -> str:
    """The interpreter to spawn. Inside Triton's stub sys.executable may be the stub binary;
    the stub's own Python is the first python3 on PATH (scripts/tritonserver.sh)."""
    exe = Path(sys.executable or "")
    if exe.name.startswith("python") and exe.is_file():
        return str(exe)
    found = shutil.which("python3")
    if found is None:
        raise EngineError(ErrorCode.INTERNAL, "no python3 on PATH to run the engine core")
    return found


class EngineClient:
    """add_request / abort / stats / call / shutdown against the engine core process."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[list], None],
                 on_death: Callable[[str], None], server_pid: int | None = None) -> None:
        """`server_pid`: the tritonserver this process (its Python backend stub) serves; the
        core ends this process and itself if that server dies abruptly (server_watch.py)."""
        self._on_outputs = on_outputs
        self._on_death = on_death
        self._send_lock = threading.Lock()  # execute, the watcher and finalize all send
        # shutdown runs once: on SIGTERM (the model's SignalWatcher) and again in finalize
        self._shutdown_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._stats: Any = None
        self._closing = False
        self.dead_reason: str | None = None
        ctx = mp.get_context("spawn")
        ctx.set_executable(_python_executable())
        if not hasattr(sys, "argv"):  # an embedded interpreter may have none; spawn reads it
            sys.argv = [""]
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=core_main, args=(config, child, server_pid),
                                 name="slora-engine-core", daemon=True)
        self._proc.start()
        child.close()  # only the core holds its end: its exit is EOF here
        self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="slora-core-reader",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _wait_ready(self) -> None:
        while not self._conn.poll(START_POLL_S):
            if not self._proc.is_alive():
                raise EngineError(ErrorCode.INTERNAL, "the engine core exited during start-up "
                                                      f"(exit code {self._proc.exitcode})")
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = ("failed", EngineError(ErrorCode.INTERNAL, "the engine core died at start-up"))
        if msg[0] == "failed":
            self._proc.join()
            raise msg[1]

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: Any, prompt_token_ids: list[int] | None,
                    params: Any, adapter_id: str | None) -> None:
        """Queue a request; a refusal arrives as its final output with the error."""
        self._send(("add", request_id, prompt, prompt_token_ids, params, adapter_id))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(("abort", list(request_ids)))

    def stats(self) -> Any:
        """The latest EngineStats the core sent (None before the first)."""
        return self._stats

    def call(self, method: str) -> Any:
        """A control call answered by the core between steps (list_adapters, ...)."""
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        self._send(("call", call_id, method))
        return future.result(timeout=CALL_TIMEOUT_S)

    def _send(self, msg: tuple) -> None:
        if self.dead_reason is not None:
            raise EngineError(ErrorCode.UNAVAILABLE, f"engine core is down: {self.dead_reason}")
        with self._send_lock:
            # checked under the lock: a message is either ahead of "shutdown" in the pipe (and
            # ended by the core's abort_all) or refused here, never left without an answer
            if self._closing:
                raise EngineError(ErrorCode.UNAVAILABLE, "server shutting down")
            try:
                self._conn.send(msg)
            except OSError as exc:
                raise EngineError(ErrorCode.UNAVAILABLE, f"engine core is down: {exc}") from exc

    # ---------------------------------------------------------------- reader
    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "step":
                    if msg[2] is not None:
                        self._stats = msg[2]
                    if msg[1]:
                        self._on_outputs(msg[1])
                elif msg[0] == "reply":
                    self._calls.pop(msg[1]).set_result(msg[2])
                elif msg[0] == "closed":
                    return
        except (EOFError, OSError):
            pass
        self._proc.join(timeout=JOIN_TIMEOUT_S)
        self.dead_reason = f"engine core process exited (exit code {self._proc.exitcode})"
        for future in list(self._calls.values()):
            future.set_exception(EngineError(ErrorCode.UNAVAILABLE, self.dead_reason))
        if not self._closing:
            log.error(self.dead_reason)
            self._on_death(self.dead_reason)

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Ordered: the core aborts everything (outputs 'cancelled' reach on_outputs), says
        'closed' and exits; then the reader and the process are joined. Idempotent: a second
        call (finalize after SIGTERM) waits for the first and returns."""
        with self._shutdown_lock:
            if self._closing:
                return
            self._send_shutdown()
            self._join()

    def _send_shutdown(self) -> None:
        with self._send_lock:
            self._closing = True  # later sends are refused (_send)
            if self.dead_reason is not None:
                return
            try:
                self._conn.send(("shutdown",))
            except OSError:
                pass  # already down: the reader sees EOF

    def _join(self) -> None:
        self._reader.join(timeout=JOIN_TIMEOUT_S)
        self._proc.join(timeout=JOIN_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
