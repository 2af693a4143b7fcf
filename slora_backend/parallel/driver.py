"""Rank 0 of a tensor-parallel engine: starts the worker processes (ranks 1..tp-1), supervises
them, and runs each step: the step plan to every rank once, then its own share of the step.

The scheduler, the tokenizer, the adapter tiers and the sampler stay on rank 0 (LLMEngine);
the workers hold only their shard of the model, of the pool and of the resident adapters.
A worker that exits makes the engine fail (`failure`): the step under way and later ones end
their requests with INTERNAL, and the engine core exits (serving/core.py), which stops the
server like the death of the core itself (docs/DESIGN.md "Tensor parallelism").
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from slora_backend.config import EngineConfig
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PoolStorage
from slora_backend.model import LlamaModel, ModelSpec, load_spec
from slora_backend.model.batch import BatchInput, TokenFeed
from slora_backend.model.lora import LoraTables

from .adapters import ShardedCopier
from .comm import Comm
from .executor import ShardExecutor, StepPlan, load_rank_model
from .shard import FIELD, ShardGeometry, check_divides, padding_note

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # workers must join the group within this (a cold import of torch)
START_POLL_S = 0.05
STOP_TIMEOUT_S = 30.0  # a worker told to stop must exit within this, else it is killed
CAUSE_WAIT_S = 1.0  # a failed collective: how long to wait for the worker exit behind it
STORE_FILE = "store"
# the worker's interpreter: rank 0's sys.path first (the same slora_backend), then its args
BOOTSTRAP = ("import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
             "from slora_backend.parallel.worker import main; main(pickle.load(sys.stdin.buffer))")


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Rank i's device: cuda:(first + i) from the engine's GPU, or the CPU for every rank."""
    if device.type != "cuda":
        return [device] * size
    first = device.index or 0
    if first + size > torch.cuda.device_count():
        raise EngineError.invalid(FIELD, f"{size} GPUs from cuda:{first} needed, "
                                         f"{torch.cuda.device_count()} visible")
    return [torch.device("cuda", first + i) for i in range(size)]


class TensorParallelDriver:
    """Built by `start`; the engine then calls agree_pages, copier, attach, and per step
    forward; `failure` says whether the group is still whole; `shutdown` at the end."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.comm: Comm | None = None
        self.failure: EngineError | None = None
        self._procs: list[subprocess.Popen] = []
        self._closing = False
        self._dir = Path(tempfile.mkdtemp(prefix="slora-tp-"))
        self._copier: ShardedCopier | None = None
        self._executor: ShardExecutor | None = None

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device,
              dtype: torch.dtype) -> tuple[TensorParallelDriver, ModelSpec, LlamaModel]:
        """Check the model splits, start the workers, join the group, load rank 0's share."""
        size = config.tensor_parallel_size
        try:
            spec = load_spec(config.model)
        except FileNotFoundError as err:
            raise EngineError.invalid("model", str(err)) from err
        check_divides(spec, size)
        if (note := padding_note(spec, size)) is not None:
            log.warning("%s", note)
        devices = rank_devices(device, size)
        driver = cls(size)
        try:
            store = driver._spawn(config, devices)
            driver.comm = Comm(store, 0, size, device)
            spec, model = load_rank_model(config, driver.comm, dtype)
        except EngineError:
            driver.shutdown()
            raise
        except Exception as exc:  # a collective failed: most often a worker that exited
            failure = driver._broken(exc)
            driver.shutdown()
            raise failure from exc
        return driver, spec, model

    def _spawn(self, config: EngineConfig, devices: list[torch.device]) -> dist.Store:
        """Start ranks 1.. and wait until each has opened the group's store."""
        store_path = str(self._dir / STORE_FILE)
        store = dist.FileStore(store_path, self.size)
        for rank in range(1, self.size):
            proc = subprocess.Popen([sys.executable, "-c", BOOTSTRAP], stdin=subprocess.PIPE)
            pickle.dump([entry or os.getcwd() for entry in sys.path], proc.stdin)
            pickle.dump((config, rank, self.size, str(devices[rank]), store_path), proc.stdin)
            proc.stdin.close()
            log.info("tensor-parallel worker rank %d: pid %d on %s", rank, proc.pid,
                     devices[rank])
            self._procs.append(proc)
            threading.Thread(target=self._supervise, args=(rank, proc), daemon=True,
                             name=f"slora-tp-supervisor-{rank}").start()
        keys = [f"worker{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not store.check(keys):
            if self.failure is not None:
                raise self.failure
            if time.monotonic() > deadline:
                raise EngineError(ErrorCode.INTERNAL, "tensor-parallel workers did not start "
                                                      f"within {START_TIMEOUT_S:.0f} s")
            time.sleep(START_POLL_S)
        return store

    def _supervise(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self._closing:
            return
        self.failure = self.failure or EngineError(
            ErrorCode.INTERNAL,
            f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited (exit code {code})")
        log.error("%s", self.failure.message)
        if self.comm is not None and self.comm.device.type == "cuda":
            self.comm.abort()  # NCCL would wait for the dead rank forever

    # ---- wiring (the engine calls these once, in this order) --------------------------------
    def agree_pages(self, num_pages: int) -> int:
        """The pool size every rank can hold (each computed its own from its free memory)."""
        return self.comm.min_over_ranks(num_pages)

    def copier(self, spec: ModelSpec, storage: PoolStorage) -> ShardedCopier:
        """The AdapterManager's copier: checks adapters, queues their loads for the step plan."""
        self._copier = ShardedCopier(storage.tensor, spec, ShardGeometry(spec, self.size))
        return self._copier

    def attach(self, spec: ModelSpec, model: LlamaModel, storage: PoolStorage,
               tables: LoraTables) -> None:
        self._executor = ShardExecutor(spec, model, storage, tables, self.comm)

    # ---- steps ----------------------------------------------------------------------------------
    def forward(self, batch: BatchInput, feed: TokenFeed | None) -> torch.Tensor:
        """Share the step plan (this step's adapter loads, the host batch), run rank 0's share;
        the logits. Raises the group's failure (EngineError INTERNAL)."""
        if self.failure is not None:
            raise self.failure
        pending = self._copier.take()
        plan = StepPlan.for_workers(batch, [load for load, _ in pending], feed)
        try:
            self.comm.share_plan(plan)
            return self._executor.run(batch, plan.loads, plan.feed_rows,
                                      [host for _, host in pending],
                                      None if feed is None else feed.tokens)
        except Exception as exc:
            raise self._broken(exc) from exc

    def _broken(self, exc: Exception) -> EngineError:
        """A collective failed: the ranks are out of step for good. The cause is most often a
        worker that exited (its supervisor says so within moments)."""
        deadline = time.monotonic() + CAUSE_WAIT_S
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(START_POLL_S)
        self.failure = self.failure or EngineError(ErrorCode.INTERNAL,
                                                   f"tensor-parallel collective failed: {exc}")
        return self.failure

    def pids(self) -> list[int]:
        """The workers' process ids (rank 1 first)."""
        return [proc.pid for proc in self._procs]

    def shutdown(self) -> None:
        """Tell the workers to stop (kill them if the group is broken), leave the group."""
        if self._closing:
            return
        self._closing = True
        if self.comm is not None and self.failure is None:
            try:
                self.comm.share_plan(None)
            except Exception:  # a worker died meanwhile: the kill below covers it
                log.warning("tensor-parallel workers did not take the stop", exc_info=True)
        for proc in self._procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S if self.failure is None else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.comm is not None:
            self.comm.close()
        shutil.rmtree(self._dir, ignore_errors=True)
