"""Turns a SchedulerOutput into the model's BatchInput, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.memory_pool import PoolStorage
from slora_backend.engine.scheduler import SchedulerOutput
from slora_backend.engine.sequence import Sequence
from slora_backend.model.batch import BatchInput
from slora_backend.model.llama import LlamaModel
from slora_backend.model.lora import LoraTables
from slora_backend.sampler import Sampler

if TYPE_CHECKING:  # cuda_graphs imports the Triton kernels: only loaded when graphs are on
    from slora_backend.engine.cuda_graphs import DecodeGraphs

# called with (request ids of the sampled rows, their fp32 logits) after every forward
LogitsHook = Callable[[list[str], torch.Tensor], None]


class ModelRunner:
    def __init__(self, model: LlamaModel, storage: PoolStorage, kv: KVManager,
                 tables: LoraTables, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.graphs = graphs
        self.storage = storage
        self.kv = kv
        self.tables = tables
        self.device = device
        self.logits_hook: LogitsHook | None = None
        self.sampler = Sampler()

    def build_batch(self, sched: SchedulerOutput,
                    seqs: Mapping[str, Sequence]) -> tuple[BatchInput, list[str]]:
        """The step's BatchInput (host tensors) and the request ids whose logits rows it
        returns, in order."""
        items = []
        for s in sched.scheduled:
            seq = seqs[s.request_id]
            items.append((seq.token_slice(s.start, s.start + s.num_new_tokens), s.start,
                          self.kv.block_table(s.request_id), seq.lora_slot))
        batch = BatchInput.build(items, self.kv.block_size,
                                 logits_for=[s.sample for s in sched.scheduled])
        return batch, [s.request_id for s in sched.scheduled if s.sample]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, seqs: Mapping[str, Sequence]) -> dict[str, int]:
        """Run one step; returns the sampled token of every sequence that reached its end."""
        batch, sampled_ids = self.build_batch(sched, seqs)
        uses_lora = any(seqs[s.request_id].lora_slot >= 0 for s in sched.scheduled)
        every_row_sampled = len(sampled_ids) == batch.num_seqs
        if self.graphs is not None and every_row_sampled and self.graphs.fits(batch):
            logits = self.graphs.run(batch, uses_lora)
        else:
            if self.device.type != "cpu":
                batch = batch.to(self.device)
            tables = self.tables if uses_lora else None
            logits = self.model.forward(batch, self.storage.tensor, tables)
        if not sampled_ids:
            return {}
        if self.logits_hook is not None:
            self.logits_hook(sampled_ids, logits)
        params = [seqs[r].params for r in sampled_ids]
        generators = [seqs[r].extra.get("generator") for r in sampled_ids]
        tokens = self.sampler.sample(logits, params, generators)
        return dict(zip(sampled_ids, tokens))
