"""Host -> pool copies of adapters, off the engine loop's critical path.

The pool tier starts a copy when it admits an adapter whose host copy is loaded, and flips the
adapter to ready once the copy has completed (docs/DESIGN.md "Adapter tiers"). On a GPU the copy
runs on a side stream: the loop neither waits for it nor delays the steps queued behind it on
the model's stream, and the copy engine moves the bytes while the step computes. On the CPU
`start` does the copy at once (there is no other device to wait for), so the same transitions
(loading -> ready, or refused) run within one call.

A copy, on the side stream: the pinned host buffer -> the copier's staging buffer on the device
(one host -> device copy), the finite check on the device (min and max of the staging, which
NaN and Inf reach, into the slot's byte of a pinned array allocated once: a pinned allocation
per copy can block the host until the device is idle; the CPU never reduces the values), then
the rows from the staging into the adapter's pages (`write_adapter_factors`: one op per run of
rows, all layers). The staging buffer is allocated once (grown to the largest adapter seen) and
reused by every copy: the side stream runs copies in order, so a copy's host -> device write
comes after the previous copy's last read. Fresh device tensors per copy (16-134 MB for a 7B
adapter, and an `isfinite` mask as large) ask the caching allocator for new segments beside a
pool that holds most of the memory; when it finds none it frees its cache (`cudaFree`, which
waits for the whole device), a suspect for the GPU idle inside steps at n=1,000 adapters.

The step in flight may still read pages freed since it was launched (a finished request's last
row, a preempted sequence's KV), so the side stream first waits for everything launched on the
model's stream so far. The slot tables are written at the flip, on the model's stream, by the
pool tier.

The copier also plans where an adapter's rows go and the slot tables' rank for it. A
tensor-parallel engine's copier (parallel/adapters.py ShardedCopier) plans one rank's share,
checks the values on the host and queues the write for the next step, where every rank writes
its share synchronously on its own stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slora_backend.adapters.source import HostAdapter
from slora_backend.adapters.values import all_finite, finite_flag
from slora_backend.model.lora import RowPlan, plan_adapter_rows, write_adapter_factors
from slora_backend.model.spec import ModelSpec


class PoolCopy:
    """One adapter's copy into its pages: `done` once it completed, then `finite`."""

    def __init__(self, host: HostAdapter, pointers: dict[str, tuple[list[int], list[int]]],
                 finished: torch.cuda.Event | None, flag: torch.Tensor | bool) -> None:
        self.host = host  # kept until the flip: its factors name a non-finite tensor
        self.pointers = pointers
        self._finished = finished  # None: done at start (CPU)
        self._flag = flag

    def done(self) -> bool:
        return self._finished is None or self._finished.query()

    def finite(self) -> bool:
        """Every value finite in the model dtype (valid once done)."""
        return bool(self._flag) if isinstance(self._flag, bool) else bool(self._flag.item())


class PoolCopier:
    """Copies host adapters into pool pages: on a side stream on CUDA (unless `side_stream`
    is off), at once otherwise."""

    def __init__(self, storage: torch.Tensor, spec: ModelSpec, max_slots: int,
                 side_stream: bool = True) -> None:
        self.storage = storage
        self.spec = spec
        self.device = storage.device
        on_gpu = side_stream and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if on_gpu else None
        # one finite flag per slot (a slot has at most one copy in flight), pinned once
        self._flags = torch.zeros(max_slots if on_gpu else 0, dtype=torch.bool,
                                  pin_memory=on_gpu)
        self._staging: torch.Tensor | None = None  # on the side stream, grown by `_staging_for`
        if self._stream is not None:
            self._warm_up()

    def _warm_up(self) -> None:
        """Launch each kernel a copy (and a refusal's scrub) launches, once, at start, on
        scratch memory. CUDA loads a kernel at its first launch, and loading may synchronize
        the context (CUDA programming guide, "Lazy Loading", potential hazards): on an H200 a
        process's first copy blocked the host for the model's whole step in flight (167 ms)."""
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            staging = torch.ones(2, 4, 8, dtype=self.storage.dtype, device=self.device)
            flag = torch.zeros(1, dtype=torch.bool, pin_memory=True)
            flag.copy_(finite_flag(staging).view(1), non_blocking=True)
            rows = torch.empty(2, 8, 4, dtype=self.storage.dtype, device=self.device)
            rows[:, :4].copy_(staging[:, :, :4].transpose(1, 2))  # B^T rows: strided
            rows.view(2, 4, 8)[:, 1:3].copy_(staging[:, 1:3])  # A rows: a run of them
            rows.view(-1).copy_(staging.view(-1))  # contiguous
            rows.index_fill_(1, torch.zeros(1, dtype=torch.int64, device=self.device), 0)
        self._stream.synchronize()

    def table_rank(self, rank: int) -> int:
        """The slot tables' rank for an adapter of `rank` (their width for `max_rank`)."""
        return rank

    def plan(self, modules: tuple[str, ...], rank: int) -> RowPlan:
        """Where an adapter's rows go in its pages. ValueError: a row longer than a page."""
        return plan_adapter_rows(self.spec, modules, rank, self.storage.shape[-1])

    def start(self, host: HostAdapter, pages: Sequence[int], plan: RowPlan,
              slot: int) -> PoolCopy:
        """Start writing `host` into `pages` (for slot `slot`). ValueError if its factors do
        not fit the plan (nothing written then)."""
        if self._stream is None:
            with host.lock:  # a host pool's loader may be laying B out
                if not (host.finite if host.finite is not None else all_finite(host.buffer)):
                    return PoolCopy(host, plan.absolute(pages), None, False)
                pointers = self._write(host.factors, host, pages, plan, slot)
            return PoolCopy(host, pointers, None, True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            staging, factors = on_device(host, self.device, self._staging_for(host.buffer))
            flag = self._flags[slot]
            flag.copy_(finite_flag(staging), non_blocking=True)
            pointers = self._write(factors, host, pages, plan, slot)
            finished = torch.cuda.Event()
            finished.record()
        return PoolCopy(host, pointers, finished, flag)

    def _staging_for(self, buffer: torch.Tensor) -> torch.Tensor:
        """A device tensor shaped as `buffer`, from the one staging buffer (allocated, or
        grown, on the current stream: the side stream)."""
        numel = buffer.numel()
        if (self._staging is None or self._staging.numel() < numel
                or self._staging.dtype != buffer.dtype):
            self._staging = torch.empty(numel, dtype=buffer.dtype, device=self.device)
        return self._staging[:numel]

    def _write(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], host: HostAdapter,
               pages: Sequence[int], plan: RowPlan,
               slot: int) -> dict[str, tuple[list[int], list[int]]]:
        """The rows into this pool now; their pointers (the pool tier fills the slot tables
        at the flip)."""
        del slot
        return write_adapter_factors(self.storage, pages, factors, self.spec, host.modules,
                                     host.rank, plan)

    def scrub(self, pages: Sequence[int]) -> None:
        """Zero the pages of a refused copy before they are freed: a page read before it is
        written (padding) must be finite. On the model's stream, after the copy completed."""
        index = torch.tensor(list(pages), dtype=torch.int64)
        if self._stream is not None:
            index = index.pin_memory().to(self.device, non_blocking=True)
        self.storage.index_fill_(1, index, 0)


def on_device(host: HostAdapter, device: torch.device, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """host.buffer copied to `device` on the current stream (into `out` if given, else a new
    tensor; one copy, asynchronous from pinned memory; its fence recorded: the host range is
    reused only once the copy read it), and host.factors as views of the copy at the same
    offsets. The CPU: host's own."""
    if device.type == "cpu":
        return host.buffer, host.factors
    if out is None:
        staging = host.buffer.to(device, non_blocking=True)
    else:
        staging = out.copy_(host.buffer, non_blocking=True)
    fence = torch.cuda.Event()
    fence.record()
    host.fences[:] = [fence]
    base, size = host.buffer.data_ptr(), host.buffer.element_size()

    def view(t: torch.Tensor) -> torch.Tensor:
        return staging.as_strided(t.shape, t.stride(), (t.data_ptr() - base) // size)

    return staging, {m: (view(a), view(b)) for m, (a, b) in host.factors.items()}
