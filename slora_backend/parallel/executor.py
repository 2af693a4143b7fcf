"""One tensor-parallel rank's part of a step, the same code on rank 0 (driver.py) and on the
workers (worker.py): the step plan's adapter loads into its pool, then the forward over its
shard of the model, pool and adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slora_backend.adapters.pool_copy import on_device
from slora_backend.config import EngineConfig
from slora_backend.engine.weights import load_weights
from slora_backend.memory_pool import PoolStorage
from slora_backend.model.batch import BatchInput, TokenFeed
from slora_backend.model.llama import LlamaModel
from slora_backend.model.lora import LoraTables, RowPlan, write_adapter_factors
from slora_backend.model.spec import ModelSpec

from .adapters import AdapterLoad, pack_shares, row_plan, share_factors, share_size
from .comm import Comm
from .shard import Shard, ShardGeometry
from .step import ShardedStep

if TYPE_CHECKING:
    from slora_backend.adapters.source import HostAdapter


@dataclass
class StepPlan:
    """What rank 0 shares with the workers once per step (pickled; host tensors only)."""

    batch: BatchInput  # no logits rows: only rank 0 computes logits
    loads: list[AdapterLoad]
    feed_rows: list[int] | None  # input rows whose token rank 0 broadcasts (async scheduling)

    @classmethod
    def for_workers(cls, batch: BatchInput, loads: list[AdapterLoad],
                    feed: TokenFeed | None) -> StepPlan:
        no_logits = dataclasses.replace(batch, logits_indices=batch.logits_indices[:0])
        return cls(no_logits, loads, None if feed is None else feed.host_rows)


def load_rank_model(config: EngineConfig, comm: Comm, dtype: torch.dtype
                    ) -> tuple[ModelSpec, LlamaModel]:
    """This rank's share of the weights (the spec is the whole model's), wired to the group."""
    spec, model = load_weights(config, dtype, comm.device, Shard(comm.rank, comm.size))
    if config.load_format == "dummy":  # random per rank: the replicated embedding must agree
        comm.broadcast(model.embed, "init")
    if comm.rank != 0:
        model.lm_head = model.embed  # only rank 0 computes logits
    model.set_backend(config.kernel_backend)
    model.all_reduce = lambda t: comm.all_reduce(t, "base")
    return spec, model


class ShardExecutor:
    """Runs step plans on this rank's model, pool and slot tables."""

    def __init__(self, spec: ModelSpec, model: LlamaModel, storage: PoolStorage,
                 tables: LoraTables, comm: Comm) -> None:
        self.spec = spec
        self.model = model
        self.storage = storage
        self.tables = tables
        self.comm = comm
        self.geometry = ShardGeometry(spec, comm.size)
        self._plans: dict[tuple[tuple[str, ...], int], RowPlan] = {}

    def run(self, batch: BatchInput, loads: list[AdapterLoad], feed_rows: list[int] | None,
            hosts: list[HostAdapter] | None = None,
            feed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Write `loads` (rank 0 passes their host copies), feed the tokens rank 0 broadcasts
        into `batch` (a host batch), run the forward; the logits (rank 0's only)."""
        for i, load in enumerate(loads):
            self.load(load, None if hosts is None else hosts[i])
        if self.model.device.type != "cpu":
            batch = batch.to(self.model.device)
        if feed_rows is not None:
            self._feed(batch, feed_rows, feed_tokens)
        tables = self.tables if self.tables.modules_of(batch.lora_host()) else None
        step = ShardedStep.prepare(self.model, batch, self.storage.tensor, tables,
                                   self.geometry, self.comm)
        return self.model.forward(batch, self.storage.tensor, tables, step=step)

    def _feed(self, batch: BatchInput, rows: list[int], tokens: torch.Tensor | None) -> None:
        """The tokens the previous step sampled on rank 0, into their input rows."""
        dev = self.model.device
        if tokens is None:
            tokens = torch.empty(len(rows), dtype=torch.int64, device=dev)
        self.comm.broadcast(tokens, "feed")
        TokenFeed(torch.tensor(rows, dtype=torch.int64, device=dev), tokens).apply(
            batch.input_ids)

    def load(self, load: AdapterLoad, host: HostAdapter | None) -> None:
        """This rank's share of an adapter into `load.pages` of its pool (rank 0 cuts every
        rank's share from `host`, whose values its ShardedCopier checked, and scatters them);
        the workers also fill the slot, which rank 0's AdapterManager filled when it picked
        the pages. On the model's stream, before the step's forward."""
        key = (load.modules, load.rank)
        if key not in self._plans:
            self._plans[key] = row_plan(self.spec, self.geometry, self.storage.page_elems,
                                        load.modules, load.rank)
        plan = self._plans[key]
        layers = self.spec.num_layers
        pool = self.storage.tensor
        share = pool.new_empty(share_size(plan, layers))
        parts = None
        if host is not None:
            with host.lock:  # a host pool's loader may be laying B out
                parts = pack_shares(on_device(host, pool.device)[1], plan, self.geometry,
                                    layers, pool)
        self.comm.scatter(share, parts, "adapter")
        pointers = write_adapter_factors(pool, list(load.pages),
                                         share_factors(share, plan, layers), self.spec,
                                         load.modules, load.rank, plan)
        if self.comm.rank != 0:
            self.tables.set_slot(load.slot, load.rank, load.scale, pointers)
