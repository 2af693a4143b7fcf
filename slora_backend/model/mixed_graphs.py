"""Mixed steps (prefill chunks beside decode tokens) replayed from CUDA graphs.

In continuous batching most steps are mixed: the running batch decodes while a new prompt or
two are prefilled. Launched eagerly from Python, such a step of a 32-layer model costs
hundreds of launches at 7-16 us each on a slow host, more than the GPU needs for it. So these
steps replay whole-step graphs too, one per token bucket (`mixed_token_buckets`) and LoRA
variant (cuda_graphs.LORA_VARIANTS). Two things make a mixed step's shapes static:
- attention runs over a work list of query tiles (`slora_kernels.paged_attention_varlen`) with
  a grid fixed by the bucket's capacity; the list is built on the host each step and copied
  into a static buffer;
- LoRA runs per token (the grouped MBGMV with its device chunk plan), over the per-token slots.
A step copies its batch into the first rows of the static buffers and pads the rest of its
bucket: slot -1 (no KV write, no adapter), no attention work item, logits rows pointing at row
0 (computed, never returned). The pool and the slot tables are read where they are at replay.
Graphs are captured largest bucket first into the decode graphs' memory pool; their logits go
to one shared buffer, so the graphs keep no per-bucket output.
"""

from __future__ import annotations

import logging

import torch

import slora_kernels
from slora_backend.model.batch import BatchInput, TokenFeed
from slora_backend.model.cuda_graphs import (
    LORA_VARIANTS,
    TokenBuffers,
    capture_graphs,
    lora_variant,
)
from slora_backend.model.kernel_ops import KernelStep, rows_always_aligned
from slora_backend.model.llama import LlamaModel
from slora_backend.model.lora import LoraTables
from slora_kernels.varlen_attention import PAD_ITEM, WORK_FIELDS

log = logging.getLogger(__name__)

# token buckets: multiples of FINE_STEP up to FINE_MAX, then of COARSE_STEP. A GEMM pads its
# rows to a tile of 64-256 anyway, so padding within FINE_STEP costs the weight matmuls little;
# above FINE_MAX the step is mostly prefill and COARSE_STEP is at most a quarter more rows.
FINE_STEP = 64
FINE_MAX = 1024
COARSE_STEP = 256
# attention query tile: a decode row alone in a tile of SMALL_TILE rows while decode rows are a
# large share of the step; prefill-heavy buckets (above FINE_MAX tokens) take LARGE_TILE
SMALL_TILE = 16
LARGE_TILE = 64


def mixed_token_buckets(max_tokens: int) -> list[int]:
    """The padded token counts of the mixed-step graphs for steps of up to `max_tokens`."""
    sizes = set(range(FINE_STEP, min(max_tokens, FINE_MAX) + 1, FINE_STEP))
    sizes |= set(range(FINE_MAX + COARSE_STEP, max_tokens + 1, COARSE_STEP))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def attention_tile(num_tokens: int) -> int:
    """The varlen attention's query tile in the graph of `num_tokens` tokens."""
    return LARGE_TILE if num_tokens > FINE_MAX else SMALL_TILE


class MixedGraphs:
    """Static buffers for steps of up to `max_tokens` tokens over up to `max_seqs` sequences
    of up to `max_blocks` pages, and the graphs captured over them (`capture`, CUDA only).
    `run` also works uncaptured (eager over the same buffers), which is how CPU tests check the
    padding and the work lists."""

    def __init__(self, model: LlamaModel, storage: torch.Tensor, tables: LoraTables,
                 max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        self.model = model
        self.storage = storage
        self.tables = tables
        self.sizes = mixed_token_buckets(max_tokens)
        self.max_seqs = max_seqs
        self.aligned = rows_always_aligned(model.spec, storage.shape[2])
        dev = storage.device
        i32 = torch.int32
        self.tokens = TokenBuffers(max_tokens, dev)
        self.block_tables = torch.zeros(max_seqs, max_blocks, dtype=i32, device=dev)
        # not read by the graphs' kernels (the work list says it all): BatchInput's fields
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=i32, device=dev)
        self.context_lens = torch.ones(max_seqs, dtype=i32, device=dev)
        self.logits_indices = torch.zeros(self._logit_rows(max_tokens), dtype=torch.int64,
                                          device=dev)
        self.work = torch.full((max(self._capacity(s) for s in self.sizes), WORK_FIELDS),
                               PAD_ITEM, dtype=i32, device=dev)
        self.logits = torch.zeros(self._logit_rows(max_tokens), model.spec.vocab_size,
                                  dtype=torch.float32, device=dev)
        self._graphs: dict[tuple[int, frozenset[int]], torch.cuda.CUDAGraph] = {}

    @property
    def max_blocks(self) -> int:
        return int(self.block_tables.shape[1])

    def _logit_rows(self, size: int) -> int:
        return min(size, self.max_seqs)

    def _capacity(self, size: int) -> int:
        return slora_kernels.varlen_capacity(size, self.max_seqs, attention_tile(size))

    def bucket(self, num_tokens: int) -> int:
        return next(s for s in self.sizes if s >= num_tokens)

    def fits(self, batch: BatchInput) -> bool:
        if batch.num_tokens > self.sizes[-1] or batch.num_seqs > self.max_seqs:
            return False
        return (batch.block_tables.shape[1] <= self.max_blocks and batch.logits_indices.shape[0]
                <= self._logit_rows(self.bucket(batch.num_tokens)))

    def _static_batch(self, size: int) -> BatchInput:
        return BatchInput(
            **self.tokens.batch_fields(size), query_start_loc=self.query_start_loc,
            context_lens=self.context_lens, block_tables=self.block_tables,
            logits_indices=self.logits_indices[:self._logit_rows(size)])

    def _forward(self, size: int, lora_modules: frozenset[int]) -> torch.Tensor:
        batch = self._static_batch(size)
        tables = self.tables if lora_modules else None
        step = KernelStep.mixed_graph(batch, self.work[:self._capacity(size)],
                                      attention_tile(size), tables, self.aligned, lora_modules)
        rows = self._logit_rows(size)
        self.logits[:rows].copy_(self.model.forward(batch, self.storage, tables, step=step))
        return self.logits[:rows]

    def _variants(self) -> list[tuple[int, frozenset[int]]]:
        # largest first: smaller graphs reuse its memory
        return [(size, v) for size in reversed(self.sizes) for v in LORA_VARIANTS]

    @torch.inference_mode()
    def capture(self, pool: tuple) -> None:
        """Capture every (bucket, LoRA variant) graph in `pool` (shared with the decode
        graphs: torch.cuda.graph_pool_handle())."""
        captured = capture_graphs(self._variants(), lambda key: self._forward(*key),
                                  self.storage.device, pool, "capturing mixed-step CUDA graphs")
        self._graphs = {key: graph for key, (graph, _) in captured.items()}
        log.info("captured %d mixed-step CUDA graphs (token buckets %s)", len(self._graphs),
                 self.sizes)

    def run(self, batch: BatchInput, lora_modules: frozenset[int],
            feed: TokenFeed | None = None) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] of a host batch (see `fits`) whose adapters
        target `lora_modules`; `feed` fills the input tokens that are still on the device.
        The logits are a view of the graphs' buffer: valid until the next `run`."""
        size = self.bucket(batch.num_tokens)
        self._load(batch, size)
        if feed is not None:
            feed.apply(self.tokens.input_ids)
        key = (size, lora_variant(lora_modules))
        graph = self._graphs.get(key)
        if graph is None:
            logits = self._forward(*key)
        else:
            graph.replay()
            logits = self.logits
        return logits[:batch.logits_indices.shape[0]]

    def _load(self, batch: BatchInput, size: int) -> None:
        """Copy the batch into the first rows and pad the bucket: slot -1 rows, -1 work items,
        logits rows of row 0."""
        self.tokens.load(batch, size)
        seqs, width = batch.block_tables.shape
        self.block_tables[:seqs, :width].copy_(batch.block_tables, non_blocking=True)
        rows, sampled = self._logit_rows(size), batch.logits_indices.shape[0]
        self.logits_indices[:sampled].copy_(batch.logits_indices, non_blocking=True)
        if rows > sampled:
            self.logits_indices[sampled:rows].fill_(0)
        qsl, ctx = batch.host_meta()
        capacity = self._capacity(size)
        work = slora_kernels.varlen_work(qsl, ctx, attention_tile(size), capacity)
        self.work[:capacity].copy_(work, non_blocking=True)
