"""Decode steps replayed from CUDA graphs.

A decode step of a 32-layer model launches hundreds of small kernels; launched from Python on a
slow host CPU that costs milliseconds, more than the GPU needs for the step. So decode-only
steps run from CUDA graphs captured at start-up: one per padded batch size and LoRA variant
(LORA_VARIANTS: a base-only step launches no LoRA kernels; a step whose adapters target only
the attention projections skips the MLP call sites, whose launches would find nothing to do).
A graph reads static buffers; a step copies its batch into their first rows and pads the rest
(slot -1: no KV write, no adapter; context length 1). The pool and the adapter slot tables are
read where they are at replay, so adapters loaded after capture are served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator

import torch
from tqdm import tqdm

from slora_backend.model.batch import BatchInput, TokenFeed
from slora_backend.model.kernel_ops import KernelStep, rows_always_aligned
from slora_backend.model.llama import (
    DOWN_MODULES,
    GATE_UP_MODULES,
    O_MODULES,
    QKV_MODULES,
    LlamaModel,
)
from slora_backend.model.lora import LoraTables

log = logging.getLogger(__name__)

# padded batch sizes: every size up to SMALL_SIZES[-1], then steps of SIZE_STEP
SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16
# split-K of the decode attention inside a graph (fixed at capture; splits past a sequence's
# context exit at once)
GRAPH_ATTENTION_SPLITS = 8
PAD_SLOT = -1
ATTENTION_MODULES = frozenset(QKV_MODULES + O_MODULES)
ALL_MODULES = ATTENTION_MODULES | frozenset(GATE_UP_MODULES + DOWN_MODULES)
# the module sets a decode graph's LoRA call sites cover (empty: no LoRA); a step replays the
# first one that covers every module its adapters target
LORA_VARIANTS = (frozenset(), ATTENTION_MODULES, ALL_MODULES)


def lora_variant(lora_modules: frozenset[int]) -> frozenset[int]:
    """The LoRA variant a step whose adapters target `lora_modules` replays."""
    return next(v for v in LORA_VARIANTS if lora_modules <= v)


def capture_graphs(keys: list[Hashable], forward: Callable[[Hashable], torch.Tensor],
                   device: torch.device, pool: tuple, desc: str
                   ) -> dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """One CUDA graph per key of `forward(key)` (its output tensor kept with it), all in the
    memory pool `pool` (torch.cuda.graph_pool_handle(): graphs never replay concurrently, so
    their temporaries may share memory; capture the largest first). A warm-up run of every key
    first compiles the Triton kernels outside capture."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for key in keys:
            forward(key)
    torch.cuda.current_stream(device).wait_stream(stream)
    captured = {}
    for key in tqdm(keys, desc=desc, leave=False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            output = forward(key)
        captured[key] = (graph, output)
    torch.cuda.synchronize(device)
    return captured


class TokenBuffers:
    """The per-token inputs of a captured step, for up to `n` tokens: ids, positions, KV slots
    and adapter slots. A step fills the first rows; padding rows get slot -1 (no KV write, no
    adapter) and keep whatever ids and positions they had."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), PAD_SLOT, dtype=torch.int64, device=device)
        self.lora_slots = torch.full((n,), PAD_SLOT, dtype=torch.int32, device=device)

    def batch_fields(self, size: int) -> dict[str, torch.Tensor]:
        """The BatchInput fields of a step padded to `size` tokens."""
        return dict(input_ids=self.input_ids[:size], positions=self.positions[:size],
                    slot_mapping=self.slot_mapping[:size], lora_slots=self.lora_slots[:size])

    def load(self, batch: BatchInput, size: int) -> None:
        """Copy the batch's tokens into rows [0, n) and pad rows [n, size)."""
        n = batch.num_tokens
        for name, dst in self.batch_fields(n).items():
            dst.copy_(getattr(batch, name), non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(PAD_SLOT)
            self.lora_slots[n:size].fill_(PAD_SLOT)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in SMALL_SIZES if s < max_batch]
    sizes += range(SIZE_STEP, max_batch, SIZE_STEP)
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """Static decode buffers for up to `max_batch` sequences of up to `max_blocks` pages, and
    the graphs captured over them (`capture`, CUDA only). `run` also works uncaptured (eager
    over the same buffers), which is how CPU tests check the padding."""

    def __init__(self, model: LlamaModel, storage: torch.Tensor, tables: LoraTables,
                 max_batch: int, max_blocks: int) -> None:
        self.model = model
        self.storage = storage
        self.tables = tables
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = max_batch
        self.aligned = rows_always_aligned(model.spec, storage.shape[2])
        dev = storage.device
        i32, i64 = torch.int32, torch.int64
        self.tokens = TokenBuffers(max_batch, dev)
        self.context_lens = torch.ones(max_batch, dtype=i32, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=i32, device=dev)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=dev)
        self.logits_indices = torch.arange(max_batch, dtype=i64, device=dev)
        self._graphs: dict[tuple[int, frozenset[int]], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, frozenset[int]], torch.Tensor] = {}

    @property
    def max_blocks(self) -> int:
        return int(self.block_tables.shape[1])

    def fits(self, batch: BatchInput) -> bool:
        return (batch.is_decode_only and batch.num_seqs <= self.max_batch
                and batch.block_tables.shape[1] <= self.max_blocks)

    def _static_batch(self, size: int) -> BatchInput:
        return BatchInput(
            **self.tokens.batch_fields(size), query_start_loc=self.query_start_loc[:size + 1],
            context_lens=self.context_lens[:size], block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size], is_decode_only=True)

    def _forward(self, size: int, lora_modules: frozenset[int]) -> torch.Tensor:
        batch = self._static_batch(size)
        tables = self.tables if lora_modules else None
        step = KernelStep.decode_graph(batch, tables, self.aligned, GRAPH_ATTENTION_SPLITS,
                                       lora_modules)
        return self.model.forward(batch, self.storage, tables, step=step)

    def _variants(self) -> Iterator[tuple[int, frozenset[int]]]:
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            for lora_modules in LORA_VARIANTS:
                yield size, lora_modules

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> None:
        """Capture every (size, LoRA variant) graph in `pool` (default: a new one)."""
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        captured = capture_graphs(list(self._variants()), lambda key: self._forward(*key),
                                  self.storage.device, pool, "capturing decode CUDA graphs")
        for key, (graph, output) in captured.items():
            self._graphs[key], self._outputs[key] = graph, output
        log.info("captured %d decode CUDA graphs (batch sizes %s)", len(self._graphs), self.sizes)

    def run(self, batch: BatchInput, lora_modules: frozenset[int],
            feed: TokenFeed | None = None) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode-only host batch (see `fits`) whose adapters
        target `lora_modules`; `feed` fills the input tokens that are still on the device."""
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self._load(batch, n, size)
        if feed is not None:
            feed.apply(self.tokens.input_ids)
        key = (size, lora_variant(lora_modules))
        graph = self._graphs.get(key)
        if graph is None:
            return self._forward(*key)[:n]
        graph.replay()
        return self._outputs[key][:n]

    def _load(self, batch: BatchInput, n: int, size: int) -> None:
        """Copy the batch into rows [0, n) and reset the padding rows [n, size)."""
        width = batch.block_tables.shape[1]
        self.tokens.load(batch, size)
        self.context_lens[:n].copy_(batch.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if size > n:
            self.context_lens[n:size].fill_(1)
