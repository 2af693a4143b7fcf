"""LoRA slot tables and the adapter row layout in the unified pool (docs/DESIGN.md).

Layout of one adapter in its pages (identical for every layer): for each target module m in
MODULE_ORDER that it has, r rows of A (each in_m long) then r rows of B^T (each out_m long),
packed in order; a row never straddles a page (if it does not fit in what is left of the
page it starts on the next one). A row's address is an element offset into the flattened
layer slice `storage[l].view(-1)`: page * page_elems + offset_in_page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .spec import MODULE_INDEX, MODULE_ORDER, ModelSpec

NUM_MODULES = len(MODULE_ORDER)


@dataclass
class LoraTables:
    """Slot tables (fixed capacity), on the engine's device.

    a_ptr, b_ptr: int64 [slots, 7, max_rank] element offsets of A rows / B^T rows in
    `storage[l].view(-1)` (entries past the rank are 0 and never read);
    ranks: int32 [slots, 7] (0 = module not targeted); scales: float32 [slots].
    `targets[s]`: the module indices slot s targets, on the host (a step skips the LoRA call
    sites that no adapter of its batch targets, without reading the device tables);
    `host_ranks[s]`: its rank, on the host too (0: empty).
    """

    a_ptr: torch.Tensor
    b_ptr: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    targets: list[frozenset[int]] = field(default_factory=list)
    host_ranks: list[int] = field(default_factory=list)
    staging: SlotStaging | None = None  # on a GPU: where set_slot's copies read from

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = [frozenset()] * self.num_slots
        if not self.host_ranks:
            self.host_ranks = [0] * self.num_slots
        if self.staging is None and self.ranks.device.type == "cuda":
            self.staging = SlotStaging(self.device_tables())

    def device_tables(self) -> tuple[torch.Tensor, ...]:
        """The tables set_slot writes, one row per slot each."""
        return self.a_ptr, self.b_ptr, self.ranks, self.scales

    def modules_of(self, slots: Iterable[int]) -> frozenset[int]:
        """Module indices targeted by any of `slots` (-1 = no adapter)."""
        return frozenset().union(*(self.targets[s] for s in set(slots) if s >= 0))

    def max_rank_of(self, slots: Iterable[int]) -> int:
        """The largest rank among `slots` (-1 = no adapter; 0 when none has one)."""
        return max((self.host_ranks[s] for s in set(slots) if s >= 0), default=0)

    @classmethod
    def create(
        cls, num_slots: int, max_rank: int, device: torch.device | str = "cpu"
    ) -> LoraTables:
        return cls(
            a_ptr=torch.zeros(num_slots, NUM_MODULES, max_rank, dtype=torch.int64, device=device),
            b_ptr=torch.zeros(num_slots, NUM_MODULES, max_rank, dtype=torch.int64, device=device),
            ranks=torch.zeros(num_slots, NUM_MODULES, dtype=torch.int32, device=device),
            scales=torch.zeros(num_slots, dtype=torch.float32, device=device),
        )

    @property
    def num_slots(self) -> int:
        return int(self.ranks.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.a_ptr.shape[2])

    def set_slot(
        self,
        slot: int,
        rank: int,
        scale: float,
        pointers: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    ) -> None:
        """Fill slot `slot`.

        pointers[module] = (absolute A row offsets, absolute B^T row offsets): `rank` B^T rows
        and as many A rows as the pool's LoraGeometry gives (fewer than `rank` on a
        tensor-parallel rank's column-parallel modules).
        The rows are built on the host and copied without waiting: a synchronous host -> GPU
        copy would wait for the step in flight (the loop would lose its overlap with the GPU).
        On a GPU the copies run on the current stream, after every step launched before.
        """
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the slot tables' max_rank {self.max_rank}")
        ptrs = torch.zeros(2, NUM_MODULES, self.max_rank, dtype=torch.int64)
        ranks = torch.zeros(NUM_MODULES, dtype=torch.int32)
        for m, (a_rows, b_rows) in pointers.items():
            mi = MODULE_INDEX[m]
            if not 0 < len(a_rows) <= rank or len(b_rows) != rank:
                raise ValueError(f"module {m}: expected {rank} B rows and 1 to {rank} A rows, "
                                 f"got {len(b_rows)}, {len(a_rows)}")
            ptrs[0, mi, :len(a_rows)] = torch.tensor(a_rows, dtype=torch.int64)
            ptrs[1, mi, :rank] = torch.tensor(b_rows, dtype=torch.int64)
            ranks[mi] = rank
        rows = (ptrs[0], ptrs[1], ranks, torch.tensor(scale, dtype=torch.float32))
        if self.staging is not None:
            self.staging.copy(slot, rows)
        else:
            for table, row in zip(self.device_tables(), rows):
                table[slot].copy_(row)
        self.targets[slot] = frozenset(MODULE_INDEX[m] for m in pointers)
        self.host_ranks[slot] = rank

    def clear_slot(self, slot: int) -> None:
        """Empty a slot with device ops only. (`scales[slot] = 0.0` would copy a CPU scalar to
        the GPU synchronously: the loop waited for the step in flight at every eviction.)"""
        self.a_ptr[slot].zero_()
        self.b_ptr[slot].zero_()
        self.ranks[slot].zero_()
        self.scales[slot].zero_()
        self.targets[slot] = frozenset()
        self.host_ranks[slot] = 0


class LoraGeometry:
    """The rows one module's factors take in a pool: `a_rows(module, rank)` rows of A, each
    `lengths(module)[0]` long, and `rank` rows of B^T, each `lengths(module)[1]` long.

    Whole factors here (one device holds the adapter); slora_backend/parallel/shard.py
    ShardGeometry cuts them for one tensor-parallel rank (S-LoRA's partition)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def lengths(self, module: str) -> tuple[int, int]:
        return self.spec.module_dims(module)

    def a_rows(self, module: str, rank: int) -> int:
        del module
        return rank


@dataclass
class RowPlan:
    """Where an adapter's rows go, relative to its own page list.

    offsets[module] = (A row offsets, B^T row offsets); an offset v means page
    `pages[v // page_elems]`, element `v % page_elems` of that page. `rank`: the slot tables'
    rank (B^T rows per module); lengths[module] = (A row length, B^T row length).
    """

    num_pages: int
    page_elems: int
    offsets: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    rank: int = 0
    lengths: dict[str, tuple[int, int]] = field(default_factory=dict)

    def absolute(self, pages: Sequence[int]) -> dict[str, tuple[list[int], list[int]]]:
        """Row offsets into `storage[l].view(-1)` once the adapter's pages are known."""
        if len(pages) < self.num_pages:
            raise ValueError(f"adapter needs {self.num_pages} pages, got {len(pages)}")
        pe = self.page_elems

        def conv(vs: list[int]) -> list[int]:
            return [int(pages[v // pe]) * pe + v % pe for v in vs]

        return {m: (conv(a), conv(b)) for m, (a, b) in self.offsets.items()}


def plan_adapter_rows(
    spec: ModelSpec, modules: Sequence[str], rank: int, page_elems: int,
    geometry: LoraGeometry | None = None,
) -> RowPlan:
    """Pack the A rows then the r B^T rows of each module (MODULE_ORDER order) into pages of
    `page_elems`; `geometry` (default: whole factors) gives the rows' count and lengths."""
    if geometry is None:
        geometry = LoraGeometry(spec)
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    unknown = [m for m in modules if m not in MODULE_INDEX]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; expected a subset of {MODULE_ORDER}")
    ordered = [m for m in MODULE_ORDER if m in set(modules)]
    page = 0
    used = 0  # elements used in the current page
    offsets: dict[str, tuple[list[int], list[int]]] = {}
    lengths: dict[str, tuple[int, int]] = {}

    def place(length: int) -> int:
        nonlocal page, used
        if length > page_elems:
            raise ValueError(
                f"a LoRA row of {length} elements does not fit in a pool page of "
                f"{page_elems} elements "
                f"(increase block_size)"
            )
        if used + length > page_elems:
            page += 1
            used = 0
        off = page * page_elems + used
        used += length
        return off

    for m in ordered:
        a_len, b_len = lengths[m] = geometry.lengths(m)
        a_rows = [place(a_len) for _ in range(geometry.a_rows(m, rank))]
        b_rows = [place(b_len) for _ in range(rank)]
        offsets[m] = (a_rows, b_rows)
    num_pages = page + 1 if used > 0 else page
    return RowPlan(num_pages=num_pages, page_elems=page_elems, offsets=offsets, rank=rank,
                   lengths=lengths)


class SlotStaging:
    """Pinned host mirrors of the slot tables, allocated once: set_slot writes a slot's rows
    there and copies them to the device without waiting (a pinned allocation per copy can
    block the host until the device is idle, and a pageable copy waits for the step in
    flight). A slot's mirror rows are rewritten only once its previous copies completed (an
    event; by then, steps later, they have)."""

    def __init__(self, tables: Sequence[torch.Tensor]) -> None:
        self.tables = tuple(tables)
        self.mirrors = tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=True)
                             for t in self.tables)
        self.events: list[torch.cuda.Event | None] = [None] * int(self.tables[0].shape[0])

    def copy(self, slot: int, rows: Sequence[torch.Tensor]) -> None:
        """tables[i][slot] <- rows[i], on the current stream, without waiting for it."""
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        for table, mirror, row in zip(self.tables, self.mirrors, rows):
            mirror[slot].copy_(row)
            table[slot].copy_(mirror[slot], non_blocking=True)
        self.events[slot] = torch.cuda.Event()
        self.events[slot].record()


def write_adapter_rows(
    storage: torch.Tensor,
    pages: Sequence[int],
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    spec: ModelSpec,
    modules: Sequence[str],
    rank: int,
    plan: RowPlan | None = None,
) -> dict[str, tuple[list[int], list[int]]]:
    """write_adapter_factors for per-layer weights[(layer, module)] = (A [r, in], B [out, r])."""
    layers = storage.shape[0]
    try:
        factors = {m: (torch.stack([weights[(li, m)][0] for li in range(layers)]),
                       torch.stack([weights[(li, m)][1] for li in range(layers)]))
                   for m in modules}
    except RuntimeError as err:  # factors of different shapes across layers
        raise ValueError(f"adapter factors do not stack across layers: {err}") from None
    return write_adapter_factors(storage, pages, factors, spec, modules, rank, plan)


def write_adapter_factors(
    storage: torch.Tensor,
    pages: Sequence[int],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    spec: ModelSpec,
    modules: Sequence[str],
    rank: int,
    plan: RowPlan | None = None,
) -> dict[str, tuple[list[int], list[int]]]:
    """Write an adapter's A rows and B^T rows (all layers) into its pool pages.

    storage: [L, P, page_elems]; factors[module] = (A [L, r, in], B [L, out, r]) (every
    layer's factor stacked, as HostAdapter holds them), or the shapes of `plan`'s geometry (a
    tensor-parallel rank's shares: fewer A rows, shorter rows). Returns the absolute row
    pointers per module (for `LoraTables.set_slot`). Rows that follow each other in one page
    are contiguous, so each (module, factor, page) run of rows is one copy covering all layers
    (B transposed on the way): a few ops per module whatever the number of layers, on CPU and
    GPU alike.
    """
    L, _, pe = storage.shape
    if plan is None:
        plan = plan_adapter_rows(spec, modules, rank, pe)
    flat = storage.view(L, -1)
    pointers = plan.absolute(pages)
    for m, (a_rows, b_rows) in pointers.items():  # all checked first: nothing half written
        a_len, b_len = plan.lengths[m]
        a, b = factors[m]
        if (tuple(a.shape) != (L, len(a_rows), a_len)
                or tuple(b.shape) != (L, b_len, len(b_rows))):
            raise ValueError(f"module {m}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match "
                             f"{L} layers, {len(a_rows)} A rows of {a_len} and {len(b_rows)} "
                             f"B^T rows of {b_len}")
    for m, (a_rows, b_rows) in pointers.items():
        a_len, b_len = plan.lengths[m]
        a, b = factors[m]
        for rows, src, length in ((a_rows, a, a_len), (b_rows, b.transpose(1, 2), b_len)):
            for j0, j1, start in contiguous_runs(rows, length):
                n = j1 - j0
                flat[:, start:start + n * length].view(L, n, length).copy_(src[:, j0:j1])
    return pointers


def contiguous_runs(rows: Sequence[int], length: int) -> list[tuple[int, int, int]]:
    """Split row offsets into runs of back-to-back rows: [(first_row, end_row, start_offset)]."""
    runs: list[tuple[int, int, int]] = []
    if not rows:
        return runs
    j0 = 0
    for j in range(1, len(rows)):
        if rows[j] != rows[j - 1] + length:
            runs.append((j0, j, int(rows[j0])))
            j0 = j
    runs.append((j0, len(rows), int(rows[j0])))
    return runs
