"""EngineLoop: the engine on a background thread; every RequestOutput goes to `on_output`
(called on that thread). API: docs/DESIGN.md "Engine API"."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from slora_backend.device import use_device
from slora_backend.engine.engine import LLMEngine
from slora_backend.engine.outputs import RequestOutput
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop sleeps before re-checking


class EngineLoop:
    """Runs `engine.step()` on a background thread and hands every RequestOutput to
    `on_output` (called on that thread)."""

    def __init__(self, engine: LLMEngine, on_output: Callable[[RequestOutput], None]) -> None:
        self.engine = engine
        self.on_output = on_output
        self._wake = threading.Event()
        self._accepting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slora-engine-loop", daemon=True)

    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    def add_request(self, request_id: str, prompt: str | list[dict] | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, adapter_id: str | None = None) -> None:
        if not self._accepting:
            raise EngineError(ErrorCode.UNAVAILABLE, "engine is not running (shutting down)")
        self.engine.add_request(request_id, prompt, prompt_token_ids, params, adapter_id)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        """Ordered: stop accepting, abort everything (outputs 'cancelled'), join the thread."""
        self._accepting = False
        self.engine.abort_all()
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.engine.close()

    def _run(self) -> None:
        use_device(self.engine.device)
        while True:
            if self._stop.is_set():
                self.engine.abort_all()  # requests added while stopping
                if not self.engine.has_unfinished():
                    return
            if not self.engine.has_unfinished():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            self._step_and_emit()

    def _step_and_emit(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # keep serving: fail the running requests, not the loop
            log.exception("engine step failed")
            outputs = self.engine.fail_all(EngineError(ErrorCode.INTERNAL,
                                                       f"engine step failed: {exc}"))
        for out in outputs:
            try:
                self.on_output(out)
            except Exception:
                log.exception("on_output callback failed for %s", out.request_id)
