"""A tensor-parallel worker process (ranks 1..tp-1), started by rank 0 (driver.py).

It joins the group, loads its share of the weights, builds its pool and slot tables (the
same page count as every rank), then runs the step plans rank 0 shares until told to stop
(a None plan). It exits when rank 0 goes away: a collective with a closed peer fails on gloo,
and a watchdog notices a new parent process (NCCL would wait forever).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.distributed as dist

from slora_backend.config import EngineConfig
from slora_backend.device import use_device
from slora_backend.engine.weights import pool_pages
from slora_backend.memory_pool import PoolStorage
from slora_backend.model.lora import LoraTables

from .comm import Comm
from .executor import ShardExecutor, load_rank_model
from .shard import ShardGeometry

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0
EXIT_ORPHANED = 3  # rank 0 went away


def _watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="slora-tp-parent-watch", daemon=True).start()


def main(args: tuple[EngineConfig, int, int, str, str]) -> None:
    """Entry point (driver.BOOTSTRAP): (config, rank, size, device, store path)."""
    config, rank, size, device_name, store_path = args
    logging.basicConfig(level=logging.INFO,
                        format=f"[slora tp rank {rank}] %(levelname)s %(message)s")
    _watch_parent()
    device = torch.device(device_name)
    use_device(device)
    if device.type == "cpu" and config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    store = dist.FileStore(store_path, size)
    store.set(f"worker{rank}", "up")
    comm = Comm(store, rank, size, device)
    try:
        executor = _build(config, comm)
        while (plan := comm.share_plan()) is not None:
            executor.run(plan.batch, plan.loads, plan.feed_rows)
    finally:
        comm.close()


def _build(config: EngineConfig, comm: Comm) -> ShardExecutor:
    """The same set-up as rank 0's engine, in the same collective order (driver.start, then
    LLMEngine._wire: the pool size every rank agrees on)."""
    dtype = config.torch_dtype
    spec, model = load_rank_model(config, comm, dtype)
    local = model.spec
    num_pages = comm.min_over_ranks(pool_pages(config, local, dtype, comm.device))
    storage = PoolStorage(local.num_layers, num_pages, config.block_size, local.num_kv_heads,
                          local.head_dim, dtype, comm.device)
    width = ShardGeometry(spec, comm.size).padded_rank(config.max_rank)
    tables = LoraTables.create(config.max_loaded_adapters, width, comm.device)
    return ShardExecutor(spec, model, storage, tables, comm)
