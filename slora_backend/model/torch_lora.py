"""The torch backend's LoRA: y[t] += scale[s] * (x[t] @ A^T) @ B^T for the token's slot s, with
each adapter's true rank (the CPU path; on CUDA the triton backend runs kernels/).

Per step (prepare_lora): tokens are sorted by slot into groups (one per adapter in the batch)
and, per module, the rows of every adapter that has it are planned: in place (a view of the
pool, no copy) when all its rows are back to back -- which happens when the row length
divides the page size and the adapter's pages are consecutive -- else gathered, all groups'
rows of a module in ONE index_select (a copy that stays in cache). Measured on CPU: matmuls
over several short runs of rows cost more (calls, and passes over y) than that copy.
Per call (lora_shrink_expand): one gather of x in group order (shared by the modules of the
call site), per module one gather of A rows and one of B^T rows, two matmuls per group with
the group's true rank, one index_add into y. A batch whose LoRA tokens are one contiguous
span of one adapter (a prefill chunk) adds straight into y[span].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .lora import LoraGeometry, LoraTables
from .spec import MODULE_ORDER, ModelSpec


@dataclass
class GroupModule:
    """One group's use of one module: ranks and where its A / B^T rows come from."""

    rank: int  # B^T rows
    a_rank: int  # A rows (= rank, but rank / tp on a tensor-parallel column-parallel module)
    a_view: int | None  # start offset of r back-to-back A rows in the pool slice (None: gathered)
    b_view: int | None
    a_off: int  # first row in the module's gathered A rows (when a_view is None)
    b_off: int


@dataclass
class ModuleBatch:
    d_in: int  # A row length
    d_out: int  # B^T row length
    a_rows: torch.Tensor | None  # row offsets gathered in one go (None: nothing to gather)
    b_rows: torch.Tensor | None
    uses: dict[int, GroupModule]  # group index -> use

    def rows(self, layer_flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gathered A rows and B^T rows of every group of this layer (None: all views)."""
        a_all = None if self.a_rows is None else _gather_rows(layer_flat, self.a_rows, self.d_in)
        b_all = None if self.b_rows is None else _gather_rows(layer_flat, self.b_rows, self.d_out)
        return a_all, b_all

    def factors(self, layer_flat: torch.Tensor, rows: tuple[torch.Tensor | None, ...],
                use: GroupModule) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's A [a_rank, d_in] and B^T [rank, d_out]: views of the pool or of `rows`."""
        a_all, b_all = rows
        if use.a_view is not None:
            a = layer_flat[use.a_view : use.a_view + use.a_rank * self.d_in].view(use.a_rank,
                                                                                  self.d_in)
        else:
            a = a_all[use.a_off : use.a_off + use.a_rank]
        r = use.rank
        if use.b_view is not None:
            bt = layer_flat[use.b_view : use.b_view + r * self.d_out].view(r, self.d_out)
        else:
            bt = b_all[use.b_off : use.b_off + r]
        return a, bt


@dataclass
class LoraGroup:
    slot: int
    scale: float
    start: int  # rows [start, end) of the group in the sorted token order
    end: int


@dataclass
class LoraBatchInfo:
    """Tokens grouped by adapter slot, each adapter's rows planned once per step."""

    groups: list[LoraGroup]
    order: torch.Tensor | None  # token rows in group order (None when `span` is set)
    span: tuple[int, int] | None  # all LoRA tokens are rows [a, b) of one adapter
    modules: dict[int, ModuleBatch]
    tables: LoraTables
    num_tokens: int = 0  # LoRA tokens (rows of `order`)

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA tokens' rows of x, in group order."""
        if self.span is not None:
            return x[self.span[0] : self.span[1]]
        return x.index_select(0, self.order)


def prepare_lora(
    lora_slots: torch.Tensor,
    tables: LoraTables | None,
    spec: ModelSpec,
    device: torch.device | None = None,
    geometry: LoraGeometry | None = None,
) -> LoraBatchInfo | None:
    """Group tokens by slot and plan each used adapter's rows. None = no LoRA in this batch.
    `device`: where the activations live (default: the tables' device); `geometry`: the pool's
    row shapes (default: whole factors)."""
    if tables is None or lora_slots.numel() == 0:
        return None
    slots_cpu = lora_slots.to("cpu", torch.int64)
    if int(slots_cpu.max()) < 0:
        return None
    groups, rows, used = _slot_groups(slots_cpu, tables)
    dev = torch.device(device) if device is not None else tables.a_ptr.device
    modules = _module_batches(tables, used, groups, geometry or LoraGeometry(spec), dev)
    if not modules:
        return None
    span = None
    if len(groups) == 1:
        r0, r1 = int(rows[0]), int(rows[-1])
        if r1 - r0 + 1 == len(rows):
            span = (r0, r1 + 1)
    return LoraBatchInfo(
        groups=groups,
        order=None if span is not None else rows.to(dev),
        span=span,
        modules=modules,
        tables=tables,
        num_tokens=len(rows),
    )


def _slot_groups(slots_cpu: torch.Tensor,
                 tables: LoraTables) -> tuple[list[LoraGroup], torch.Tensor, list[int]]:
    """The groups (one per used slot, in slot order), the LoRA tokens' rows in group order and
    the used slots."""
    sorted_slots, order = torch.sort(slots_cpu, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    uniq_l = uniq.tolist()
    counts_l = counts.tolist()
    skip = counts_l[0] if uniq_l[0] < 0 else 0  # tokens without adapter sort first
    used = [s for s in uniq_l if s >= 0]
    if used[-1] >= tables.num_slots:
        raise ValueError(
            f"lora slot {used[-1]} out of range (tables have {tables.num_slots} slots)"
        )
    idx_used = torch.tensor(used, dtype=torch.int64, device=tables.ranks.device)
    scales = tables.scales[idx_used].to("cpu").tolist()
    groups: list[LoraGroup] = []
    pos = 0
    for s, c in zip(uniq_l, counts_l):
        if s >= 0:
            groups.append(LoraGroup(s, float(scales[len(groups)]), pos - skip, pos - skip + c))
        pos += c
    return groups, order[skip:], used


def _module_batches(tables: LoraTables, used: list[int], groups: list[LoraGroup],
                    geometry: LoraGeometry, dev: torch.device) -> dict[int, ModuleBatch]:
    """Per module, where each group's A and B^T rows come from: in place or gathered."""
    idx_used = torch.tensor(used, dtype=torch.int64, device=tables.ranks.device)
    ranks = tables.ranks[idx_used].to("cpu").tolist()
    a_ranks = [[geometry.a_rows(m, r) for m, r in zip(MODULE_ORDER, row)] for row in ranks]
    a_ptr = tables.a_ptr[idx_used].to("cpu")
    b_ptr = tables.b_ptr[idx_used].to("cpu")
    dims = [geometry.lengths(m) for m in MODULE_ORDER]
    a_contig = _back_to_back(a_ptr, a_ranks, [d[0] for d in dims])
    b_contig = _back_to_back(b_ptr, ranks, [d[1] for d in dims])
    modules: dict[int, ModuleBatch] = {}
    for mi, (din, dout) in enumerate(dims):
        uses: dict[int, GroupModule] = {}
        a_gather: list[torch.Tensor] = []
        b_gather: list[torch.Tensor] = []
        for gi in range(len(groups)):
            r = ranks[gi][mi]
            if r <= 0:
                continue
            ra = a_ranks[gi][mi]
            use = GroupModule(r, ra, None, None, sum(map(len, a_gather)),
                              sum(map(len, b_gather)))
            if a_contig[gi][mi]:
                use.a_view = int(a_ptr[gi, mi, 0])
            else:
                a_gather.append(a_ptr[gi, mi, :ra])
            if b_contig[gi][mi]:
                use.b_view = int(b_ptr[gi, mi, 0])
            else:
                b_gather.append(b_ptr[gi, mi, :r])
            uses[gi] = use
        if uses:
            modules[mi] = ModuleBatch(
                din,
                dout,
                torch.cat(a_gather).to(dev) if a_gather else None,
                torch.cat(b_gather).to(dev) if b_gather else None,
                uses,
            )
    return modules


def _back_to_back(ptr: torch.Tensor, ranks: list[list[int]],
                  lengths: list[int]) -> list[list[bool]]:
    """[group][module]: all rows of the module back to back in the pool, i.e.
    ptr[j] == ptr[0] + j * row_length for j < rank."""
    steps = torch.arange(ptr.shape[2], dtype=torch.int64)
    length = torch.tensor(lengths, dtype=torch.int64)
    beyond = steps[None, None, :] >= torch.tensor(ranks, dtype=torch.int64).view(len(ranks), -1, 1)
    expect = ptr[:, :, :1] + steps[None, None, :] * length[None, :, None]
    return ((ptr == expect) | beyond).all(-1).tolist()


def _gather_rows(flat: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """Rows [r, length] starting at element offsets `rows` of `flat` (one copy, no index tensor)."""
    return flat.unfold(0, length, 1).index_select(0, rows)


def lora_shrink_expand(
    x: torch.Tensor,
    ys: tuple[torch.Tensor, ...],
    layer_flat: torch.Tensor,
    info: LoraBatchInfo,
    module_ids: tuple[int, ...],
) -> None:
    """For each module in module_ids (sharing the input x [T, in]) add the LoRA delta into the
    matching y [T, out_m] (views into the fused projection output are fine).

    layer_flat = storage[l].view(-1); rows are read where they live in the pool (views when a
    module's rows are back to back, else one gather per module), with each adapter's true rank.
    """
    mods = [(info.modules[mi], y) for mi, y in zip(module_ids, ys) if mi in info.modules]
    if not mods:
        return
    xs = info.token_rows(x)

    def shrink(g: LoraGroup, use: GroupModule, a: torch.Tensor) -> torch.Tensor:
        return torch.mm(xs[g.start : g.end], a.t())  # [n, r]

    for mb, y in mods:
        expand(y, info, mb, layer_flat, mb.rows(layer_flat), shrink)


def expand(y: torch.Tensor, info: LoraBatchInfo, mb: ModuleBatch, layer_flat: torch.Tensor,
           rows: tuple[torch.Tensor | None, ...],
           shrunk: Callable[[LoraGroup, GroupModule, torch.Tensor], torch.Tensor]) -> None:
    """y[t] += scale * shrunk(group, use, A) @ B^T for the tokens of each group that uses the
    module: `shrunk` gives the group's [n, rank] shrink result; `rows`: mb.rows(layer_flat)."""
    if info.span is not None:
        target = y[info.span[0] : info.span[1]]
        delta = None
    else:
        target = None
        delta = y.new_empty(info.num_tokens, mb.d_out)
    for gi, g in enumerate(info.groups):
        use = mb.uses.get(gi)
        if use is None:
            if delta is not None:
                delta[g.start : g.end].zero_()
            continue
        a, bt = mb.factors(layer_flat, rows, use)
        xa = shrunk(g, use, a)
        if target is not None:
            target.addmm_(xa, bt, alpha=g.scale)  # expand, added in place
        else:
            delta[g.start : g.end].addmm_(xa, bt, beta=0, alpha=g.scale)
    if delta is not None:
        y.index_add_(0, info.order, delta)
