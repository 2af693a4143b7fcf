"""Engine configuration: a validated dataclass, fillable from Triton string parameters."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slora_backend.errors import EngineError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ".cache/models/SmolLM2-135M-Instruct"
DEFAULT_ADAPTER_DIR = "adapters"
MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CPU_POOL_BYTES = 512 * MIB
DEFAULT_POOL_FRACTION = 0.5
DEFAULT_CUDA_GRAPH_MAX_BATCH = 256
KERNEL_BACKENDS = ("auto", "torch", "triton")
ASYNC_SCHEDULING_MODES = ("auto", "on", "off")
CUDA_GRAPH_MIXED_MODES = ("auto", "on", "off")
LOAD_FORMATS = ("auto", "dummy")
# A CPU step is many small per-adapter matmuls and gathers, where OpenMP's fork/join per op
# costs more than a second thread saves: SmolLM2 with 8 adapters, 32 decoding requests on
# 2 cores took 836 ms per step with 2 threads, 312 ms with 1 (docs/BENCHMARKS.md)
DEFAULT_CPU_THREADS = 1
# admission keeps room for every running request's next page (16 tokens at block 16): on issue
# 19's workload this takes an H100's preemptions from 90 to 0 for ~1% fewer running requests
# (bench/sim_preemption.py, docs/BENCHMARKS.md); 8 did as well there, 32+ cost batch size
DEFAULT_KV_HEADROOM_TOKENS = 16
MAX_AUTO_LOADERS = 8  # host_cache_workers auto: beyond 8 the loads share memory bandwidth
ENV_PREFIX = "SLORA_"
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
# fields that hold filesystem paths: relative values resolve against the repo root
PATH_FIELDS = ("model", "adapter_dir")


@dataclass
class EngineConfig:
    """All engine settings. Defaults work for SmolLM2 on CPU.

    Pool size: `pool_bytes` if given, else `pool_fraction` of free GPU memory on CUDA, else
    DEFAULT_CPU_POOL_BYTES on CPU.
    """

    model: str = DEFAULT_MODEL
    adapter_dir: str = DEFAULT_ADAPTER_DIR
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda if available
    block_size: int = 16
    pool_bytes: int | None = None
    pool_fraction: float = DEFAULT_POOL_FRACTION
    max_rank: int = 64
    max_loaded_adapters: int = 32
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024
    # a waiting request is admitted only while the pool keeps room for every running request
    # (and it) to grow by this many tokens (fewer where max_tokens ends it sooner); 0 = admit
    # as soon as its current tokens fit (then the next page of the batch may preempt it)
    kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    host_cache_bytes: int = 2 * GIB
    # disk -> host loader threads; 0 = auto (resolved_host_cache_workers)
    host_cache_workers: int = 0
    seed: int = 0
    # auto = the Triton-lang kernels for fp16/bf16 on CUDA, torch ops elsewhere
    kernel_backend: str = "auto"
    # decode steps of up to this many sequences replay CUDA graphs (triton backend on CUDA);
    # 0 = off
    cuda_graph_max_batch: int = DEFAULT_CUDA_GRAPH_MAX_BATCH
    # mixed steps (prefill chunks beside decode tokens, up to max_num_batched_tokens) replay
    # CUDA graphs too (model/mixed_graphs.py); auto = on where the model can be graphed (triton
    # backend on CUDA), on = the same but an error where it cannot, off = eager
    cuda_graph_mixed: str = "auto"
    # torch intra-op threads of an engine on the CPU (process-wide); 0 = torch's default
    cpu_threads: int = DEFAULT_CPU_THREADS
    # on: a step's tokens are read back after the next step is launched, so the host work
    # (detokenizing, stops, outputs, scheduling) overlaps the device; auto = on for CUDA
    async_scheduling: str = "auto"
    # auto: weights from `model`; dummy: random weights of its config.json's shape (benchmarks
    # at real scale without the weights, as vLLM's load_format=dummy)
    load_format: str = "auto"
    # devices one engine spans (tensor parallelism, slora_backend/parallel): cuda:N.. from its
    # GPU on CUDA, processes on the CPU; must divide the model's heads, KV heads, MLP and
    # hidden sizes
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("model", "adapter_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise EngineError.invalid(name, f"must be a non-empty path, got {value!r}")
            setattr(self, name, str(value))
        self.dtype = _check_dtype(self.dtype)
        self.device = _check_device(self.device)
        positive = ("block_size", "max_rank", "max_loaded_adapters", "max_num_seqs",
                    "max_num_batched_tokens", "max_waiting", "host_cache_bytes",
                    "tensor_parallel_size")
        for name in positive:
            _check_int(name, getattr(self, name), 1)
        for name in ("pool_bytes", "max_model_len"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("cuda_graph_max_batch", self.cuda_graph_max_batch, 0)
        _check_int("cpu_threads", self.cpu_threads, 0)
        _check_int("host_cache_workers", self.host_cache_workers, 0)
        _check_int("kv_headroom_tokens", self.kv_headroom_tokens, 0)
        for name, choices in (("kernel_backend", KERNEL_BACKENDS),
                              ("async_scheduling", ASYNC_SCHEDULING_MODES),
                              ("cuda_graph_mixed", CUDA_GRAPH_MIXED_MODES),
                              ("load_format", LOAD_FORMATS)):
            if getattr(self, name) not in choices:
                raise EngineError.invalid(
                    name, f"must be one of {choices}, got {getattr(self, name)!r}")
        fraction = self.pool_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 < fraction <= 1:
            raise EngineError.invalid("pool_fraction", f"must be in (0, 1], got {fraction!r}")

    @property
    def resolved_device(self) -> str:
        """'auto' resolved: cuda when available, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_host_cache_workers(self) -> int:
        """'auto' (0): half the CPUs this process may use, at least 1, at most
        MAX_AUTO_LOADERS. A loader thread spends its time in the kernel's copy out of the page
        cache, with the GIL released: one per two cores leaves the rest to the engine, the
        Triton stub and the server (a 2-core host gets 1, a 16-core GPU host 8)."""
        if self.host_cache_workers:
            return self.host_cache_workers
        return max(1, min(MAX_AUTO_LOADERS, len(os.sched_getaffinity(0)) // 2))

    @property
    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling == "auto":
            return self.resolved_device.startswith("cuda")
        return self.async_scheduling == "on"

    @property
    def torch_dtype(self) -> Any:
        import torch

        if self.dtype == "auto":
            return torch.float16 if self.resolved_device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], env: Mapping[str, str] = os.environ
    ) -> EngineConfig:
        """Fill from Triton config.pbtxt string parameters; `SLORA_<FIELD>` env vars override.

        Empty strings mean "default"; unknown parameter names are refused by name. Relative
        model / adapter_dir paths resolve against the repo root.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in params:
            if key not in fields:
                raise EngineError.invalid(key, "unknown engine parameter")
        raw: dict[str, str] = {k: v for k, v in params.items() if str(v).strip() != ""}
        for name in fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and value.strip() != "":
                raw[name] = value
        kwargs = {name: _parse(name, fields[name].type, value) for name, value in raw.items()}
        for name in PATH_FIELDS:
            path = Path(kwargs.get(name, getattr(cls, name)))
            kwargs[name] = str(path if path.is_absolute() else REPO_ROOT / path)
        return cls(**kwargs)


def _parse(name: str, type_name: Any, value: str) -> Any:
    """Convert a string parameter to the field's type (annotations are strings here)."""
    text = str(value).strip()
    type_text = str(type_name)
    try:
        if type_text.startswith("int"):
            return int(text)
        if type_text.startswith("float"):
            return float(text)
    except ValueError:
        raise EngineError.invalid(name, f"not a number: {value!r}") from None
    return text


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise EngineError.invalid(name, f"must be an integer >= {lo}, got {value!r}")


def _check_dtype(value: Any) -> str:
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        choices = sorted(set(DTYPE_ALIASES))
        raise EngineError.invalid("dtype", f"must be one of {choices}, got {value!r}")
    return DTYPE_ALIASES[key]


def _check_device(value: Any) -> str:
    text = str(value).lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[len("cuda:"):].isdigit():
        return text
    raise EngineError.invalid("device", f"must be auto, cpu, cuda or cuda:N, got {value!r}")
