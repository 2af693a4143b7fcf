"""Triton Python-backend model `slora`: a thin adapter over the engine core process.

`initialize` reads the engine settings from config.pbtxt parameters and starts the engine in a
process of its own (slora_backend/serving: the stub's Triton I/O never takes the GIL from a
step), a response thread (fed one list of outputs per engine step; a backlog is coalesced per
request) and a watcher thread (cancellation polling in one message per round + gauges);
`execute` validates each request and hands it to the core (errors go back as a final error
response) and returns None (decoupled); `finalize` shuts down in order. If the core dies, the
requests in flight end with INTERNAL and the server is told to stop (health goes not-ready).
Request parsing lives in slora_backend/triton_io.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

REPO_ROOT = Path(__file__).resolve().parents[3]
# normally the repo is installed (editable) in the venv; this keeps a bare checkout working
# (the kernels' package slora_kernels sits in the folder kernels/)
for _path in (REPO_ROOT, REPO_ROOT / "kernels"):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

from slora_backend import EngineConfig, EngineError, ErrorCode  # noqa: E402
from slora_backend.serving.client import EngineClient  # noqa: E402
from slora_backend.serving.coalesce import coalesce  # noqa: E402
from slora_backend.serving.metrics import TritonMetrics  # noqa: E402
from slora_backend.shutdown_signal import SignalWatcher  # noqa: E402
from slora_backend.tokenizer import Tokenizer  # noqa: E402
from slora_backend.triton_io import (  # noqa: E402
    COMMAND_LIST_ADAPTERS,
    ParsedRequest,
    client_error,
    parse_command,
    parse_request,
    response_tensors,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
WATCH_INTERVAL_S = 0.05  # watcher period: gauge refresh, one slice of cancellation polls
# each round polls is_cancelled() (one IPC round trip each) on one slice of the requests, so
# a request is polled every WATCH_INTERVAL_S * CANCEL_POLL_SLICES = 200 ms; all of them every
# 50 ms was ~10% of the stub's time at 64 streams (docs/BENCHMARKS.md)
CANCEL_POLL_SLICES = 4
SHUTDOWN = object()  # response-queue marker
SUCCESS_REASONS = ("stop", "length")


@dataclass
class _Active:
    """Per-request state owned by the model (the engine keeps its own)."""

    sender: Any
    req: ParsedRequest
    arrival: float
    poll_slice: int  # the watcher round (mod CANCEL_POLL_SLICES) that polls is_cancelled()
    last_token_at: float | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # non-streaming: all tokens' logprobs
    echoed: bool = False
    # after the final response Triton frees the sender's response factory, and polling it
    # (is_cancelled) then crashes the server (use after free in the Python backend): the final
    # send and the watcher's poll take `guard`, and `closed` stops any poll after the final send
    closed: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)


class TritonPythonModel:
    """The Triton entry points; see the module docstring."""

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the slora model must be decoupled")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = EngineConfig.from_parameters(params)
        # Triton places instances (one per GPU, or on the CPU): the engine runs where its
        # instance is, whatever SLORA_DEVICE says
        if args.get("model_instance_kind") == "GPU":
            config = dataclasses.replace(config, device=f"cuda:{args['model_instance_device_id']}")
        elif args.get("model_instance_kind") == "CPU":
            config = dataclasses.replace(config, device="cpu")
        self.logger.log_info(f"[slora] {args['model_instance_name']}: {config}")
        self._config = config
        self._tokenizer: Tokenizer | None = None  # for logprobs' token texts (_decode_token)
        # GPU instances of one group share a name: the device label keeps their series apart
        device = f"{args['model_instance_kind'].lower()}:{args['model_instance_device_id']}"
        self._metrics = TritonMetrics(pb_utils, {"model": args["model_name"],
                                  "instance": args["model_instance_name"], "device": device})
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._responses: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        # the stub's parent is tritonserver: if it crashes, the core ends this stub and itself
        self._core = EngineClient(config, self._responses.put, self._on_core_death,
                                  server_pid=os.getppid())
        self.logger.log_info(f"[slora] {args['model_instance_name']}: engine core pid "
                             f"{self._core.pid}")
        self._response_thread = threading.Thread(target=self._response_loop, name="slora-resp")
        self._watch_thread = threading.Thread(target=self._watch_loop, name="slora-watch")
        self._response_thread.start()
        self._watch_thread.start()
        # on SIGTERM Triton unloads the model (finalize) only once nothing references it, and
        # every running request's response sender does: end them all at once when the signal
        # comes (scripts/tritonserver.sh passes it on) instead of generating on
        self._serving_lock = threading.Lock()
        self._serving = True
        self._signals = SignalWatcher(self._stop_serving)

    # ---------------------------------------------------------------- requests
    def execute(self, requests: list) -> None:
        for request in requests:
            self._admit(request)
        return None

    def _admit(self, request: Any) -> None:
        sender = request.get_response_sender()

        def get(name: str) -> np.ndarray | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        number = next(self._ids)
        rid = f"{request.request_id() or 'req'}-{number}"
        try:
            command = parse_command(get)
            if command is not None:
                self._run_command(command.command, sender)
                return
            parsed = parse_request(get)
            with self._lock:
                self._active[rid] = _Active(sender, parsed, time.monotonic(),
                                            number % CANCEL_POLL_SLICES)
            self._core.add_request(rid, parsed.prompt, parsed.prompt_token_ids, parsed.params,
                                   parsed.adapter_id)
        except EngineError as exc:
            self._fail(rid, sender, exc)
        except Exception as exc:  # a bug must not take the server down: report it
            self.logger.log_error(f"[slora] {rid}: {traceback.format_exc()}")
            self._fail(rid, sender, EngineError(ErrorCode.INTERNAL, repr(exc)))

    def _fail(self, rid: str, sender: Any, exc: EngineError) -> None:
        with self._lock:
            state = self._active.pop(rid, None)
        self._metrics.outcome["error"].increment(1.0)
        exc = client_error(exc)
        if state is None:
            self._send(sender, self._error_response(exc), FINAL)
        else:  # the watcher may be polling this sender
            self._finish(state, self._error_response(exc))

    def _run_command(self, command: str, sender: Any) -> None:
        if command == COMMAND_LIST_ADAPTERS:
            body = {"available": self._core.call("list_adapters"),
                    "resident": self._core.call("resident_adapters")}
            out = pb_utils.Tensor("text_output", np.array([json.dumps(body).encode()], np.object_))
            self._send(sender, pb_utils.InferenceResponse(output_tensors=[out]), FINAL)

    # ---------------------------------------------------------------- responses
    def _response_loop(self) -> None:
        """One engine step's outputs at a time; steps queued meanwhile (the thread fell
        behind) are merged per request, so a slow stream costs fewer sends, never waits."""
        while True:
            batches = [self._responses.get()]
            while True:
                try:
                    batches.append(self._responses.get_nowait())
                except queue.Empty:
                    break
            stopping = SHUTDOWN in batches
            try:
                outputs = coalesce(b for b in batches if b is not SHUTDOWN)
                for out in outputs:
                    self._on_output(out)
                # one counter update per batch, not per token (each is an IPC call)
                tokens = sum(len(out.new_token_ids) for out in outputs)
                if tokens:
                    self._metrics.tokens.increment(float(tokens))
            except Exception:  # keep serving the other requests
                self.logger.log_error(f"[slora] response thread: {traceback.format_exc()}")
            if stopping:
                return

    def _on_output(self, out: Any) -> None:
        with self._lock:
            state = self._active.get(out.request_id)
            if state is not None and out.finished:
                del self._active[out.request_id]
        if state is None:
            return
        if out.error is not None:
            self._metrics.outcome["error"].increment(1.0)
            self._finish(state, self._error_response(client_error(out.error)))
            return
        self._observe_tokens(state, len(out.new_token_ids))
        if state.req.stream:
            self._stream_response(state, out)
        else:
            state.text.append(out.new_text)
            state.ids.extend(out.new_token_ids)
            state.logprobs.extend(out.new_logprobs or [])
            if out.finished:
                text = state.req.echo_text + "".join(state.text)
                self._finish(state, self._response(state.req, text, state.ids,
                                                   state.logprobs, out))
        if out.finished:
            outcome = "success" if out.finish_reason in SUCCESS_REASONS else "cancelled"
            self._metrics.outcome[outcome].increment(1.0)

    def _stream_response(self, state: _Active, out: Any) -> None:
        text = out.new_text
        if not state.echoed:
            text = state.req.echo_text + text
        if not (text or out.new_token_ids or out.finished):
            return  # nothing new yet (e.g. half a UTF-8 character held back)
        state.echoed = True
        response = self._response(state.req, text, out.new_token_ids, out.new_logprobs, out)
        if out.finished:
            self._finish(state, response)
        else:
            self._send(state.sender, response, 0)

    def _observe_tokens(self, state: _Active, n: int) -> None:
        if n == 0:
            return
        now = time.monotonic()
        if state.last_token_at is None:
            self._metrics.ttft.observe(now - state.arrival)
        else:
            self._metrics.itl.observe((now - state.last_token_at) / n)
        state.last_token_at = now

    def _response(self, req: ParsedRequest, text: str, ids: list[int], logprobs: Any,
                  out: Any) -> Any:
        tensors = response_tensors(req, out, text, ids, logprobs, self._decode_token)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, arr) for name, arr in tensors])

    def _decode_token(self, token: int) -> str:
        """A token's text for the logprobs output; the stub's own tokenizer (the engine's is
        in the core process), loaded on the first request that asks for logprobs."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._config.model)
        return self._tokenizer.decode([token], skip_special_tokens=False)

    @staticmethod
    def _error_response(exc: EngineError) -> Any:
        """An error response; the message keeps the code (gRPC streams lose the status)."""
        # ErrorCode values are TritonError code names (TritonError exists only after import)
        code = getattr(pb_utils.TritonError, exc.code.value, pb_utils.TritonError.INTERNAL)
        error = pb_utils.TritonError(str(exc), code)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def _finish(self, state: _Active, response: Any) -> None:
        """Send a request's final response; its sender is never used again (see _Active)."""
        with state.guard:
            if state.closed:
                return
            state.closed = True
            self._send(state.sender, response, FINAL)

    def _send(self, sender: Any, response: Any, flags: int) -> None:
        try:
            sender.send(response, flags=flags)
        except Exception as exc:  # the client went away (cancelled): nothing to deliver to
            self.logger.log_verbose(f"[slora] send failed: {exc}")

    # ---------------------------------------------------------------- watcher
    def _watch_loop(self) -> None:
        """Abort requests whose client cancelled / disconnected; refresh gauges."""
        for rounds in itertools.count():
            if self._stop.wait(WATCH_INTERVAL_S):
                return
            try:
                with self._lock:
                    active = [(rid, state) for rid, state in self._active.items()
                              if state.poll_slice == rounds % CANCEL_POLL_SLICES]
                cancelled = []
                for rid, state in active:
                    with state.guard:
                        if not state.closed and state.sender.is_cancelled():
                            cancelled.append(rid)
                self._core.abort(cancelled)  # one message for the round
                stats = self._core.stats()
                if stats is not None:
                    self._metrics.refresh(stats)
            except Exception:
                self.logger.log_error(f"[slora] watcher: {traceback.format_exc()}")

    # ---------------------------------------------------------------- core death
    def _on_core_death(self, reason: str) -> None:
        """The engine core died: end every request in flight with INTERNAL, then stop the
        server. Triton 2.51 offers a Python model no way to mark itself not ready (a dead
        stub stays 'ready', each request failing), so SIGTERM to tritonserver (the stub's
        parent) is what turns /v2/health/ready to not-ready and lets an orchestrator restart
        the server (docs/DESIGN.md "Serving path")."""
        self.logger.log_error(f"[slora] {reason}: failing the requests in flight")
        with self._lock:
            leftover = list(self._active.values())
            self._active.clear()
        for state in leftover:
            self._metrics.outcome["error"].increment(1.0)
            self._finish(state, self._error_response(EngineError(ErrorCode.INTERNAL, reason)))
        self.logger.log_error("[slora] stopping tritonserver: the engine core is gone")
        os.kill(os.getppid(), signal.SIGTERM)

    # ---------------------------------------------------------------- shutdown
    def _stop_serving(self) -> None:
        """End every request (on SIGTERM, then again as finalize's first step: runs once).
        The core aborts all and its 'cancelled' outputs go out as final responses; requests
        still unanswered get UNAVAILABLE, and so does any request that comes later."""
        with self._serving_lock:
            if not self._serving:
                return
            self._serving = False
            self.logger.log_info("[slora] stopping: ending every request")
            self._core.shutdown()
            self._responses.put(SHUTDOWN)
            self._response_thread.join()
            with self._lock:
                leftover = list(self._active.values())
                self._active.clear()
            shutting_down = EngineError(ErrorCode.UNAVAILABLE, "server shutting down")
            for state in leftover:
                self._finish(state, self._error_response(shutting_down))

    def finalize(self) -> None:
        """Ordered: stop serving (if SIGTERM has not already), join the watcher."""
        self.logger.log_info("[slora] finalize: shutting down the engine")
        self._stop_serving()
        self._stop.set()
        self._watch_thread.join()
        self._signals.close()
        self.logger.log_info("[slora] finalize: done")
