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
        block = self.kv.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lora: list[int] = []
        qsl = [0]
        ctx: list[int] = []
        logits_idx: list[int] = []
        sampled_ids: list[str] = []
        tables = []
        for s in sched.scheduled:
            seq = seqs[s.request_id]
            end = s.start + s.num_new_tokens
            pages = self.kv.block_table(s.request_id)
            input_ids += seq.token_slice(s.start, end)
            positions += range(s.start, end)
            slots += [pages[p // block] * block + p % block for p in range(s.start, end)]
            lora += [seq.lora_slot] * s.num_new_tokens
            qsl.append(qsl[-1] + s.num_new_tokens)
            ctx.append(end)
            tables.append(pages)
            if s.sample:
                logits_idx.append(qsl[-1] - 1)
                sampled_ids.append(s.request_id)
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
        for i, t in enumerate(tables):
            block_tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        batch = BatchInput(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            lora_slots=torch.tensor(lora, dtype=torch.int32),
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64),
            is_decode_only=all(s.num_new_tokens == 1 for s in sched.scheduled),
            query_start_loc_host=qsl,
            context_lens_host=ctx,
            lora_slots_host=lora,
        )
        return batch, sampled_ids

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
