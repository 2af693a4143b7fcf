"""The collectives of a tensor-parallel engine: torch.distributed, NCCL on GPUs, gloo on the CPU.

Two groups: the default one (NCCL or gloo) carries the step's tensors (the base model's and
LoRA's collectives, adapter shares, fed tokens); a gloo group carries the step plan, pickled,
from rank 0 (on CPU memory, so that rank 0's host work never waits for a device queue). Every
collective counts its payload bytes by kind (`traffic`), which bench/tp_comm_bytes.py compares
with its formula.
"""

from __future__ import annotations

import pickle
from collections import Counter
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# a step's collectives: a dead peer fails one at once on gloo (its sockets close); on NCCL the
# driver's supervisor aborts the group (parallel/driver.py)
STEP_TIMEOUT = timedelta(minutes=5)
# the plan group: workers of an idle engine wait this long for the next step
IDLE_TIMEOUT = timedelta(days=365)
# torch 2.13 renamed all_gather_into_tensor (a FutureWarning on every call site)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class Comm:
    """This rank's end of the engine's process groups."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.traffic: Counter[str] = Counter()  # payload bytes by kind
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size,
                                timeout=STEP_TIMEOUT)
        self._control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.traffic[kind] += t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor, kind: str) -> None:
        """Sum `t` over the ranks, in place."""
        self._count(kind, t)
        dist.all_reduce(t)

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))  # ranks along dim 0
        self._count(kind, out)
        _all_gather(out, t.contiguous())
        return out.view(self.size, *t.shape)

    def min_over_ranks(self, n: int) -> int:
        """The smallest of every rank's `n` (pool pages: the ranks' pools must match)."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t[0])

    def broadcast(self, t: torch.Tensor, kind: str) -> None:
        """Rank 0's `t` into every rank's `t` (same shape everywhere)."""
        self._count(kind, t)
        dist.broadcast(t, 0)

    def scatter(self, out: torch.Tensor, parts: torch.Tensor | None, kind: str) -> None:
        """Rank i receives parts[i] (parts [size, *out.shape], given on rank 0 only) in `out`."""
        self._count(kind, out)
        dist.scatter(out, list(parts) if parts is not None else None, src=0)

    def share_plan(self, plan: Any = None) -> Any:
        """Rank 0's `plan` (any picklable object), on every rank."""
        length = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
            length[0] = data.numel()
        dist.broadcast(length, 0, group=self._control)
        if self.rank != 0:
            data = torch.empty(int(length[0]), dtype=torch.uint8)
        self.traffic["plan"] += int(length[0])
        dist.broadcast(data, 0, group=self._control)
        return plan if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def abort(self) -> None:
        """Make collectives blocked on a dead peer return with an error (NCCL waits forever)."""
        dist.distributed_c10d._abort_process_group()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
