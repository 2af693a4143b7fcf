"""LLMEngine (one step = schedule, run the model, sample, stream outputs) and EngineLoop
(the engine on a background thread). API: docs/DESIGN.md "Engine API"."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slora_backend.adapters.host_cache import HostCache
from slora_backend.adapters.source import AdapterSource
from slora_backend.config import DEFAULT_CPU_POOL_BYTES, EngineConfig
from slora_backend.device import resolve_device, use_device
from slora_backend.engine.adapter_manager import AdapterManager
from slora_backend.engine.kv_manager import KVManager, pages_for_tokens
from slora_backend.engine.memory_pool import PagePool, PoolStorage, pages_for_bytes
from slora_backend.engine.model_runner import ModelRunner, StepResult
from slora_backend.engine.scheduler import CANCELLED, Scheduler
from slora_backend.engine.sequence import PLACEHOLDER, Sequence
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model import (
    LlamaModel,
    ModelSpec,
    UnsupportedModelError,
    load_model,
    load_spec,
)
from slora_backend.model.llama import TRITON_BACKEND
from slora_backend.model.lora import plan_adapter_rows
from slora_backend.sampler import make_generator
from slora_backend.sampling_params import SamplingParams
from slora_backend.tokenizer import Tokenizer

if TYPE_CHECKING:
    from slora_backend.engine.cuda_graphs import DecodeGraphs

log = logging.getLogger(__name__)

STOP = "stop"
LENGTH = "length"
IDLE_WAIT_S = 0.05  # EngineLoop: how long an idle loop sleeps before re-checking
MIN_POOL_PAGES = 2


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    error: EngineError | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pool_pages_total: int
    pool_pages_free: int
    pool_pages_kv: int
    pool_pages_lora: int
    adapters_resident: int
    num_preemptions: int
    num_steps: int
    num_generated_tokens: int
    adapter_cache: dict[str, Any] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig,
                 model: tuple[ModelSpec, LlamaModel] | None = None) -> None:
        """`model`: an already built (spec, model) on the config's device and dtype (benchmarks
        build random Llama-7B-shaped weights on the GPU); default: loaded from config.model,
        which holds the tokenizer either way."""
        self.config = config
        self.device = resolve_device(config.resolved_device)
        use_device(self.device)  # kernels, graphs and events of this thread go to this GPU
        if self.device.type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)
        self.dtype = config.torch_dtype
        self.spec, self.model = model if model is not None else _load(config, self.dtype,
                                                                      self.device)
        if self.model.dtype != self.dtype or self.model.device.type != self.device.type:
            raise EngineError.invalid("model", f"built for {self.model.dtype} on "
                                               f"{self.model.device}, the engine runs "
                                               f"{self.dtype} on {self.device}")
        self.tokenizer = Tokenizer(config.model)
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)
        num_pages = self._num_pages()
        self.storage = PoolStorage(self.spec.num_layers, num_pages, config.block_size,
                                   self.spec.num_kv_heads, self.spec.head_dim, self.dtype,
                                   self.device)
        self.pool = PagePool(num_pages)
        self.source = AdapterSource(config.adapter_dir, self.spec, config.max_rank, self.dtype)
        self.host_cache = HostCache(self.source, config.host_cache_bytes,
                                    config.host_cache_workers, device=self.device)
        self.adapters = AdapterManager(self.spec, self.storage, self.pool, self.host_cache,
                                       config.max_loaded_adapters, config.max_rank)
        self.kv = KVManager(self.pool, config.block_size)
        self.scheduler = Scheduler(self.pool, self.kv, self.adapters, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.max_waiting)
        self.model.set_backend(config.kernel_backend)
        self.runner = ModelRunner(self.model, self.storage, self.kv, self.adapters.tables,
                                  self.device, self._decode_graphs())
        self._lock = threading.Lock()  # guards the pending queues and the live id set
        self._pending_adds: deque[Sequence] = deque()
        self._pending_aborts: deque[str] = deque()
        self._live_ids: set[str] = set()
        self._arrival = itertools.count()
        self._num_steps = 0
        self._num_generated = 0
        self.async_scheduling = config.resolved_async_scheduling
        self._in_flight: StepResult | None = None  # launched, tokens not read back yet
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(config.seed)

    def _num_pages(self) -> int:
        page_elems = self.spec.page_elems(self.config.block_size)
        pool_bytes = self.config.pool_bytes
        if pool_bytes is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            pool_bytes = int(free * self.config.pool_fraction)
        elif pool_bytes is None:
            pool_bytes = DEFAULT_CPU_POOL_BYTES
        pages = pages_for_bytes(pool_bytes, self.spec.num_layers, page_elems, self.dtype)
        if pages < MIN_POOL_PAGES:
            raise EngineError.invalid("pool_bytes", f"{pool_bytes} bytes hold only {pages} pages "
                                                    f"of {self.config.block_size} tokens")
        return pages

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps (triton backend on CUDA; see engine/cuda_graphs.py)."""
        max_batch = min(self.config.cuda_graph_max_batch, self.config.max_num_seqs)
        if self.device.type != "cuda" or self.model.backend != TRITON_BACKEND or max_batch == 0:
            return None
        from slora_backend.engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.storage.tensor, self.adapters.tables, max_batch,
                              pages_for_tokens(self.max_model_len, self.config.block_size))
        graphs.capture()
        return graphs

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[dict] | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, adapter_id: str | None = None) -> None:
        """Validate and queue a request (thread-safe). Raises EngineError INVALID_ARG,
        NOT_FOUND (unknown adapter) or UNAVAILABLE (queue full)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise EngineError.invalid("params", "must be a SamplingParams")
        if not isinstance(request_id, str) or not request_id:
            raise EngineError.invalid("request_id", "must be a non-empty string")
        token_ids = self._prompt_tokens(prompt, prompt_token_ids)
        self._check_length(len(token_ids), params)
        adapter_pages = self._check_adapter(adapter_id)
        self._check_fits_pool(len(token_ids), params, adapter_pages)
        seq = Sequence(request_id, token_ids, params, adapter_id or None, next(self._arrival))
        seq.extra["text"] = self.tokenizer.stream(token_ids, params.stop)
        seq.extra["generator"] = self._generator(params)
        with self._lock:
            if request_id in self._live_ids:
                raise EngineError.invalid("request_id", f"{request_id!r} is already in use")
            queued = len(self.scheduler.waiting) + len(self._pending_adds)
            if queued >= self.config.max_waiting:
                raise EngineError(ErrorCode.UNAVAILABLE,
                                  f"queue full: {queued} requests waiting "
                                  f"(max_waiting={self.config.max_waiting}); retry later")
            self._live_ids.add(request_id)
            self._pending_adds.append(seq)
        if seq.adapter_id is not None:
            self.host_cache.prefetch(seq.adapter_id)  # start the disk -> host load now

    def _prompt_tokens(self, prompt: str | list[dict] | None,
                       prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise EngineError.invalid("prompt", "give exactly one of prompt / prompt_token_ids")
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            vocab = self.spec.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                   for t in ids):
                raise EngineError.invalid("prompt_token_ids", f"must be integers in [0, {vocab})")
        elif isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
            try:
                ids = self.tokenizer.encode(prompt, self.max_model_len)
            except ValueError as err:  # too long, a malformed chat, or no chat template
                raise EngineError.invalid("prompt", str(err)) from err
        else:
            raise EngineError.invalid("prompt", "must be a string or a non-empty list of "
                                                "{role, content} messages")
        if not ids:
            raise EngineError.invalid("prompt", "is empty")
        return ids

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt + params.max_tokens > self.max_model_len:
            raise EngineError.invalid(
                "max_tokens", f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) "
                              f"exceeds the model's max length {self.max_model_len}")

    def _check_adapter(self, adapter_id: str | None) -> int:
        """Validate the adapter synchronously (NOT_FOUND / INVALID_ARG); its pool pages."""
        if adapter_id is None or adapter_id == "":
            return 0
        if not isinstance(adapter_id, str):
            raise EngineError.invalid("adapter_id", "must be a string")
        info = self.source.inspect(adapter_id)
        plan = plan_adapter_rows(self.spec, info.settings.modules, info.settings.rank,
                                 self.storage.page_elems)
        return plan.num_pages

    def _check_fits_pool(self, num_prompt: int, params: SamplingParams, adapter_pages: int) -> None:
        # a request alone must fit the pool, or preemption could never make room for it
        kv_pages = pages_for_tokens(num_prompt + params.max_tokens, self.config.block_size)
        if kv_pages + adapter_pages > self.pool.num_pages:
            raise EngineError.invalid(
                "max_tokens", f"request needs {kv_pages + adapter_pages} pool pages "
                              f"(KV + adapter), the pool has {self.pool.num_pages}")

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """Per-request RNG: seeded by the request, else from the engine's seeded RNG."""
        if params.greedy:
            return None
        with self._lock:  # the engine RNG is shared by threads adding requests
            return make_generator(params.seed, self._rng)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its pages are freed at the next step and it gets a
        final output with finish_reason 'cancelled'. Unknown ids are ignored."""
        with self._lock:
            self._pending_aborts.append(request_id)

    def abort_all(self) -> None:
        with self._lock:
            self._pending_aborts.extend(self._live_ids)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live_ids) or bool(self._pending_aborts)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read back the tokens of the previous one (async
        scheduling: its host work overlaps the device running this step) or of this one."""
        outputs = self._drain_pending()
        sched = self.scheduler.schedule()
        for seq in sched.failed:
            outputs.append(self._final_output(seq, [], ""))
        launched = None
        if not sched.is_empty:
            launched = self.runner.launch(sched, self.scheduler.seqs, self._in_flight)
            self.scheduler.commit(sched)
            if launched is not None:
                self._expect_tokens(launched)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._read_back(previous)
        if not self.async_scheduling and launched is not None:
            self._in_flight = None
            outputs += self._read_back(launched)
        self._num_steps += 1
        return outputs

    def _drain_pending(self) -> list[RequestOutput]:
        with self._lock:
            adds, self._pending_adds = list(self._pending_adds), deque()
            aborts, self._pending_aborts = list(self._pending_aborts), deque()
        outputs = []
        for seq in adds:
            self.scheduler.seqs[seq.request_id] = seq
            self.scheduler.waiting.append(seq)  # capacity was checked in add_request
        for request_id in aborts:
            seq = self.scheduler.abort(request_id)
            if seq is not None:
                outputs.append(self._final_output(seq, [], ""))
        return outputs

    def _expect_tokens(self, launched: StepResult) -> None:
        """A PLACEHOLDER for each token the launched step samples; a sequence that this token
        ends by length (whatever its value) is not scheduled again."""
        for seq in launched.seqs:
            seq.output_token_ids.append(PLACEHOLDER)
            launched.output_index.append(len(seq.output_token_ids) - 1)
            if self._ends_by_length(seq, len(seq.output_token_ids)):
                seq.finishing = True

    def _ends_by_length(self, seq: Sequence, num_outputs: int) -> bool:
        return (num_outputs >= seq.params.max_tokens
                or seq.num_prompt_tokens + num_outputs >= self.max_model_len)

    def _read_back(self, result: StepResult) -> list[RequestOutput]:
        """Write a step's tokens over their placeholders and stream them. Rows of sequences
        that ended meanwhile (stopped by their previous token, aborted) are dropped."""
        outputs = []
        for seq, index, token in zip(result.seqs, result.output_index, result.token_ids()):
            if seq.finished:
                continue
            seq.output_token_ids[index] = token
            self._num_generated += 1
            outputs.append(self._process_token(seq, token, index + 1))
        return outputs

    def _process_token(self, seq: Sequence, token: int, num_outputs: int) -> RequestOutput:
        stream = seq.extra["text"]
        text, stopped = stream.add(token)
        reason = None
        if stopped:
            reason = STOP
        elif token in self.spec.eos_token_ids and not seq.params.ignore_eos:
            reason = STOP
        elif self._ends_by_length(seq, num_outputs):
            reason = LENGTH
        if reason is None:
            return self._output(seq, [token], text, finished=False)
        if not stopped:
            text += stream.finish()  # text held back as a possible stop-string start
        self.scheduler.finish(seq, reason)
        return self._final_output(seq, [token], text)

    def _output(self, seq: Sequence, tokens: list[int], text: str,
                finished: bool) -> RequestOutput:
        return RequestOutput(seq.request_id, tokens, text, finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.error)

    def _final_output(self, seq: Sequence, tokens: list[int], text: str) -> RequestOutput:
        with self._lock:
            self._live_ids.discard(seq.request_id)
        if seq.finish_reason == CANCELLED:
            log.debug("request %s cancelled", seq.request_id)
        return self._output(seq, tokens, text, finished=True)

    def fail_all(self, error: EngineError) -> list[RequestOutput]:
        """Finish every request with `error` (after an internal failure of a step)."""
        self._drain_pending()
        self._in_flight = None
        outputs = []
        for seq in list(self.scheduler.seqs.values()):
            self.scheduler.finish(seq, None, error)
            outputs.append(self._final_output(seq, [], ""))
        return outputs

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            pending = len(self._pending_adds)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + pending,
            pool_pages_total=self.pool.num_pages,
            pool_pages_free=self.pool.num_free,
            pool_pages_kv=self.pool.used_by("kv"),
            pool_pages_lora=self.pool.used_by("lora"),
            adapters_resident=len(self.adapters.resident()),
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            num_generated_tokens=self._num_generated,
            adapter_cache=self.adapters.stats(),
        )

    def list_adapters(self) -> list[str]:
        """Adapters available on disk (rescanned)."""
        return self.source.list_adapters()

    def resident_adapters(self) -> list[str]:
        """Adapters resident in the pool, least recently used first."""
        return self.adapters.resident()

    def close(self) -> None:
        """Stop the host cache's loader threads."""
        self.host_cache.close()


def _load(config: EngineConfig, dtype: torch.dtype,
          device: torch.device) -> tuple[ModelSpec, LlamaModel]:
    """load_model (or random weights for load_format 'dummy') with its failures turned into an
    EngineError naming the 'model' field."""
    try:
        if config.load_format == "dummy":
            spec = load_spec(config.model)
            return spec, LlamaModel.random(spec, dtype, device, seed=config.seed)
        return load_model(config.model, dtype, device)
    except (FileNotFoundError, UnsupportedModelError) as err:
        raise EngineError.invalid("model", str(err)) from err


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
