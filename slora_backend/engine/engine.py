"""LLMEngine: the parts wired together, and one step (schedule, launch the model, read tokens
back, stream outputs). Admission, outputs and the background loop have their own files
(admission.py, outputs.py, loop.py). API: docs/DESIGN.md "Engine API"."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slora_backend.adapters.adapter_manager import AdapterManager
from slora_backend.adapters.host_cache import HostCache
from slora_backend.adapters.source import AdapterSource
from slora_backend.config import EngineConfig
from slora_backend.device import resolve_device, use_device
from slora_backend.engine.admission import Admission, Prompt
from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.model_runner import ModelRunner, StepResult
from slora_backend.engine.outputs import OutputProcessor, RequestOutput, make_output
from slora_backend.engine.scheduler import Scheduler
from slora_backend.engine.sequence import PLACEHOLDER, Sequence
from slora_backend.engine.weights import load_weights, pool_pages
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.logprobs import record
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model import LlamaModel, ModelSpec
from slora_backend.pages import ceil_div
from slora_backend.sampling_params import SamplingParams
from slora_backend.tokenizer import Tokenizer

if TYPE_CHECKING:  # the graphs import the Triton kernels: only loaded when graphs are on
    from slora_backend.model.cuda_graphs import DecodeGraphs
    from slora_backend.model.mixed_graphs import MixedGraphs
    from slora_backend.parallel.driver import TensorParallelDriver

# A step with nothing to run while requests wait for adapters being read from disk sleeps
# until a load ends, at most this long: a loop spinning on empty steps holds the GIL, which
# each of a loader thread's syscalls must take back (up to the 5-ms switch interval apiece)
LOAD_WAIT_S = 0.005


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
        self.tp: TensorParallelDriver | None = None
        self.spec, self.model = self._build_model(config, model)
        try:
            self._check_graphs(config)
            self.tokenizer = Tokenizer(config.model)
            self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                     self.spec.max_position_embeddings)
            self._wire(config)
        except BaseException:
            if self.tp is not None:
                self.tp.shutdown()
            raise
        self._lock = threading.Lock()  # guards the pending aborts
        self._pending_aborts: deque[str] = deque()
        self._arrival = itertools.count()
        self._num_steps = 0
        self._num_generated = 0
        self.async_scheduling = config.resolved_async_scheduling
        self._in_flight: StepResult | None = None  # launched, tokens not read back yet

    def _build_model(self, config: EngineConfig, model: tuple[ModelSpec, LlamaModel] | None
                     ) -> tuple[ModelSpec, LlamaModel]:
        """The whole model, or at tensor_parallel_size > 1 rank 0's share (the workers started
        and holding theirs); the spec is the whole model's either way."""
        if config.tensor_parallel_size > 1:
            if model is not None:
                raise EngineError.invalid("tensor_parallel_size", "a prebuilt model runs on "
                                          "one device (load_format=dummy builds shards)")
            from slora_backend.parallel.driver import TensorParallelDriver

            self.tp, spec, built = TensorParallelDriver.start(config, self.device, self.dtype)
            return spec, built
        spec, built = model if model is not None else load_weights(config, self.dtype,
                                                                   self.device)
        if built.dtype != self.dtype or built.device.type != self.device.type:
            raise EngineError.invalid("model", f"built for {built.dtype} on {built.device}, "
                                               f"the engine runs {self.dtype} on {self.device}")
        return spec, built

    def _check_graphs(self, config: EngineConfig) -> None:
        self.model.set_backend(config.kernel_backend)
        if config.cuda_graph_mixed == "on" and (not self.model.graphable or self.tp is not None):
            raise EngineError.invalid("cuda_graph_mixed", "on needs the triton backend on CUDA "
                                                          "(fp16/bf16) and tensor_parallel_size 1")

    def _wire(self, config: EngineConfig) -> None:
        """The pool and its users: pages, adapter tiers, KV, scheduler, model runner."""
        local = self.model.spec  # a tensor-parallel rank's share of the heads
        num_pages = pool_pages(config, local, self.dtype, self.device)
        if self.tp is not None:
            num_pages = self.tp.agree_pages(num_pages)
        self.storage = PoolStorage(local.num_layers, num_pages, config.block_size,
                                   local.num_kv_heads, local.head_dim, self.dtype, self.device)
        self.pool = PagePool(num_pages)
        self.source = AdapterSource(config.adapter_dir, self.spec, config.max_rank, self.dtype,
                                    host_pool=self.device.type != "cuda")
        self.host_cache = HostCache(self.source, config.host_cache_bytes,
                                    config.resolved_host_cache_workers, device=self.device)
        copier = None if self.tp is None else self.tp.copier(self.spec, self.storage)
        self.adapters = AdapterManager(self.spec, self.storage, self.pool, self.host_cache,
                                       config.max_loaded_adapters, config.max_rank, copier)
        if self.tp is not None:
            self.tp.attach(self.spec, self.model, self.storage, self.adapters.tables)
        self.kv = KVManager(self.pool, config.block_size)
        self.scheduler = Scheduler.from_config(self.pool, self.kv, self.adapters, config)
        self.admission = Admission(self.spec, self.tokenizer, self.adapters, self.max_model_len,
                                   config.block_size, num_pages, config.seed)
        self.outputs = OutputProcessor(self.spec.eos_token_ids, self.max_model_len)
        self.runner = ModelRunner(self.model, self.storage, self.kv, self.adapters.tables,
                                  self.device, *self._cuda_graphs(), tp=self.tp)

    def _cuda_graphs(self) -> tuple[DecodeGraphs | None, MixedGraphs | None]:
        """CUDA graphs for decode steps and for mixed steps, when the model can be graphed
        (model/cuda_graphs.py, model/mixed_graphs.py), captured into one memory pool; not at
        tensor parallelism (collectives in captured graphs: not done yet)."""
        config = self.config
        if not self.model.graphable or self.tp is not None:
            return None, None
        from slora_backend.model.cuda_graphs import DecodeGraphs
        from slora_backend.model.mixed_graphs import MixedGraphs

        max_blocks = ceil_div(self.max_model_len, config.block_size)
        pool = torch.cuda.graph_pool_handle()
        mixed = decode = None
        if config.cuda_graph_mixed != "off":  # first: the largest graphs
            mixed = MixedGraphs(self.model, self.storage.tensor, self.adapters.tables,
                                config.max_num_batched_tokens, config.max_num_seqs, max_blocks)
            mixed.capture(pool)
        max_batch = min(config.cuda_graph_max_batch, config.max_num_seqs)
        if max_batch:
            decode = DecodeGraphs(self.model, self.storage.tensor, self.adapters.tables,
                                  max_batch, max_blocks)
            decode.capture(pool)
        return decode, mixed

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, adapter_id: str | None = None) -> None:
        """Validate and queue a request (thread-safe). Raises EngineError INVALID_ARG,
        NOT_FOUND (unknown adapter) or UNAVAILABLE (queue full, or the engine failed)."""
        if self.failure is not None:
            raise EngineError(ErrorCode.UNAVAILABLE, f"engine failed: {self.failure.message}")
        seq = self.admission.sequence(request_id, prompt, prompt_token_ids, params, adapter_id,
                                      next(self._arrival))
        self.scheduler.add(seq)
        if seq.adapter_id is not None:
            self.adapters.prefetch(seq.adapter_id)  # start the disk -> host load now

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its pages are freed at the next step and it gets a
        final output with finish_reason 'cancelled'. Unknown ids are ignored."""
        with self._lock:
            self._pending_aborts.append(request_id)

    def abort_all(self) -> None:
        with self._lock:
            self._pending_aborts.extend(self.scheduler.live_ids())

    def has_unfinished(self) -> bool:
        with self._lock:
            aborts = bool(self._pending_aborts)
        return aborts or self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read back the tokens of the previous one (async
        scheduling: its host work overlaps the device running this step) or of this one."""
        if self.failure is not None:  # a tensor-parallel worker died: nothing can run
            return self.fail_all(self.failure)
        outputs = self._apply_aborts()
        sched = self.scheduler.schedule()
        outputs += [make_output(seq, [], "", finished=True) for seq in sched.failed]
        launched = None
        if not sched.is_empty:
            try:
                launched = self.runner.launch(sched, self.scheduler.seqs, self._in_flight)
            except EngineError:
                if self.failure is None:
                    raise
                return outputs + self.fail_all(self.failure)  # a worker died mid-step
            self.scheduler.commit(sched)
            if launched is not None:
                self._expect_tokens(launched)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._read_back(previous)
        if not self.async_scheduling and launched is not None:
            self._in_flight = None
            outputs += self._read_back(launched)
        if launched is None and previous is None and self.scheduler.waiting:
            self.host_cache.wait_for_loads(LOAD_WAIT_S)
        self._num_steps += 1
        return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        """Cancel the requests aborted since the last step."""
        with self._lock:
            aborts, self._pending_aborts = list(self._pending_aborts), deque()
        outputs = []
        for request_id in aborts:
            seq = self.scheduler.abort(request_id)
            if seq is not None:
                outputs.append(make_output(seq, [], "", finished=True))
        return outputs

    def _expect_tokens(self, launched: StepResult) -> None:
        """A PLACEHOLDER for each token the launched step samples; a sequence that this token
        ends by length (whatever its value) is not scheduled again."""
        for seq in launched.seqs:
            seq.output_token_ids.append(PLACEHOLDER)
            launched.output_index.append(len(seq.output_token_ids) - 1)
            if self.outputs.ends_by_length(seq, len(seq.output_token_ids)):
                seq.finishing = True

    def _read_back(self, result: StepResult) -> list[RequestOutput]:
        """Write a step's tokens over their placeholders and stream them. Rows of sequences
        that ended meanwhile (stopped by their previous token, aborted) are dropped."""
        outputs = []
        tokens = result.token_ids()
        logprobs = result.token_logprobs()
        for row, (seq, index, token) in enumerate(zip(result.seqs, result.output_index, tokens)):
            if seq.finished:
                continue
            seq.output_token_ids[index] = token
            record(seq, token, logprobs.get(row))
            self._num_generated += 1
            outputs.append(self._emit(seq, token, index + 1))
        return outputs

    def _emit(self, seq: Sequence, token: int, num_outputs: int) -> RequestOutput:
        text, reason = self.outputs.add_token(seq, token, num_outputs)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return make_output(seq, [token], text, finished=reason is not None)

    def fail_all(self, error: EngineError) -> list[RequestOutput]:
        """Finish every request with `error` (after an internal failure of a step)."""
        self._apply_aborts()
        self._in_flight = None
        outputs = []
        for seq in list(self.scheduler.seqs.values()):
            self.scheduler.finish(seq, None, error)
            outputs.append(make_output(seq, [], "", finished=True))
        return outputs

    # ---- introspection -----------------------------------------------------------------------
    @property
    def failure(self) -> EngineError | None:
        """Why the engine can no longer step (a tensor-parallel worker died); None if healthy.
        The engine core exits on it (serving/core.py)."""
        return None if self.tp is None else self.tp.failure

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
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
        """Stop the host cache's loader threads and the tensor-parallel workers."""
        self.host_cache.close()
        if self.tp is not None:
            self.tp.shutdown()
