"""Turns a SchedulerOutput into the model's BatchInput, runs the model, samples.

`launch` returns without waiting for the device: the sampled tokens stay on the device (the
next step reads its inputs from there) and their host copy is in flight (`StepResult`). The
engine reads them back when it wants: at once, or after launching the next step (async
scheduling), so that the host work of one step overlaps the device work of the next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.scheduler import SchedulerOutput
from slora_backend.engine.sequence import PLACEHOLDER, Sequence
from slora_backend.logprobs import StepLogprobs, TokenLogprobs, compute_logprobs, to_host
from slora_backend.memory_pool import PoolStorage
from slora_backend.model.batch import BatchInput, TokenFeed
from slora_backend.model.llama import LlamaModel
from slora_backend.model.lora import LoraTables
from slora_backend.sampler import Sampler

if TYPE_CHECKING:  # the graphs import the Triton kernels: only loaded when graphs are on
    from slora_backend.model.cuda_graphs import DecodeGraphs
    from slora_backend.model.mixed_graphs import MixedGraphs
    from slora_backend.parallel.driver import TensorParallelDriver

# called with (request ids of the sampled rows, their fp32 logits) after every forward
LogitsHook = Callable[[list[str], torch.Tensor], None]
# how a step ran (ModelRunner.last_path)
DECODE_GRAPH = "decode_graph"
MIXED_GRAPH = "mixed_graph"
EAGER = "eager"


@dataclass
class StepResult:
    """The tokens one launched step sampled: on the device, and their host copy in flight."""

    seqs: list[Sequence]  # the sampled rows, in order
    tokens: torch.Tensor  # int64 [n] on the device
    host: torch.Tensor  # int64 [n]: the copy (pinned memory on CUDA), valid once `ready`
    ready: torch.cuda.Event | None  # None on the CPU (the copy is done)
    # per row: the index of its PLACEHOLDER in seqs[i].output_token_ids (set by the engine)
    output_index: list[int] = field(default_factory=list)
    logprobs: StepLogprobs | None = None  # rows that asked for logprobs (host copies)
    _row_of: dict[int, int] = field(init=False, repr=False)  # id(seq) -> row, from seqs

    def __post_init__(self) -> None:
        self._row_of = {id(seq): i for i, seq in enumerate(self.seqs)}

    def row_of(self, seq: Sequence) -> int | None:
        return self._row_of.get(id(seq))

    def token_ids(self) -> list[int]:
        """The sampled tokens on the host (waits for the device if needed)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def token_logprobs(self) -> dict[int, TokenLogprobs]:
        """row -> its logprobs, for the rows that asked (after token_ids(): copies done)."""
        return {} if self.logprobs is None else self.logprobs.for_rows()


class ModelRunner:
    def __init__(self, model: LlamaModel, storage: PoolStorage, kv: KVManager,
                 tables: LoraTables, device: torch.device,
                 graphs: DecodeGraphs | None = None, mixed: MixedGraphs | None = None,
                 tp: TensorParallelDriver | None = None) -> None:
        self.model = model
        self.graphs = graphs
        self.mixed = mixed
        self.tp = tp
        self.last_path = EAGER
        self.storage = storage
        self.kv = kv
        self.tables = tables
        self.device = device
        self.logits_hook: LogitsHook | None = None
        self.sampler = Sampler()

    def build_batch(self, sched: SchedulerOutput, seqs: Mapping[str, Sequence],
                    previous: StepResult | None = None
                    ) -> tuple[BatchInput, list[Sequence], TokenFeed | None]:
        """The step's BatchInput (host tensors), the sequences whose logits rows it returns
        (in order), and the feed of the tokens still on the device from `previous`."""
        items = []
        feed_rows: list[int] = []
        feed_src: list[int] = []
        offset = 0
        for s in sched.scheduled:
            seq = seqs[s.request_id]
            end = s.start + s.num_new_tokens
            toks = seq.token_slice(s.start, end)
            if toks[-1] == PLACEHOLDER:  # only ever the last token, sampled by `previous`
                row = previous.row_of(seq) if previous is not None else None
                if row is None:
                    raise RuntimeError(f"{s.request_id}: its last token was never sampled")
                feed_rows.append(offset + len(toks) - 1)
                feed_src.append(row)
            items.append((toks, s.start, self.kv.block_table(s.request_id), seq.lora_slot))
            offset += len(toks)
        batch = BatchInput.build(items, self.kv.block_size,
                                 logits_for=[s.sample for s in sched.scheduled])
        sampled = [seqs[s.request_id] for s in sched.scheduled if s.sample]
        feed = None
        if feed_rows:
            src = torch.tensor(feed_src, dtype=torch.int64).to(self.device, non_blocking=True)
            feed = TokenFeed(torch.tensor(feed_rows, dtype=torch.int64).to(self.device,
                                                                           non_blocking=True),
                             previous.tokens.index_select(0, src), feed_rows)
        return batch, sampled, feed

    def _eager(self, batch: BatchInput, lora_modules: frozenset[int],
               feed: TokenFeed | None) -> torch.Tensor:
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        if feed is not None:
            feed.apply(batch.input_ids)
        tables = self.tables if lora_modules else None
        return self.model.forward(batch, self.storage.tensor, tables)

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, seqs: Mapping[str, Sequence],
               previous: StepResult | None = None) -> StepResult | None:
        """Run one step without waiting for the device; None when no row samples a token.
        `previous`: the last launched step, if its tokens were not read back yet."""
        batch, sampled, feed = self.build_batch(sched, seqs, previous)
        lora_modules = self.tables.modules_of(seqs[s.request_id].lora_slot
                                              for s in sched.scheduled)
        every_row_sampled = len(sampled) == batch.num_seqs
        if self.graphs is not None and every_row_sampled and self.graphs.fits(batch):
            self.last_path = DECODE_GRAPH
            logits = self.graphs.run(batch, lora_modules, feed)
        elif self.mixed is not None and self.mixed.fits(batch):
            self.last_path = MIXED_GRAPH
            logits = self.mixed.run(batch, lora_modules, feed)
        elif self.tp is not None:  # every rank runs its shard of the step (parallel/)
            self.last_path = EAGER
            logits = self.tp.forward(batch, feed)
        else:
            self.last_path = EAGER
            logits = self._eager(batch, lora_modules, feed)
        if not sampled:
            return None
        if self.logits_hook is not None:
            self.logits_hook([seq.request_id for seq in sampled], logits)
        tokens = self.sampler.sample_tensor(logits, [seq.params for seq in sampled],
                                            [seq.generator for seq in sampled])
        logprobs = compute_logprobs(logits, tokens, [seq.params.logprobs for seq in sampled])
        on_cpu = self.device.type == "cpu"
        if logprobs is not None:
            logprobs = to_host(logprobs, pinned=not on_cpu)
        if on_cpu:
            return StepResult(sampled, tokens, tokens, None, logprobs=logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return StepResult(sampled, tokens, host, ready, logprobs=logprobs)
