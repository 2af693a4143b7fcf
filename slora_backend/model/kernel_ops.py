"""The kernel path of the model's hot ops: kernels/ (Triton-lang) over the unified pool.

torch_step.py (torch) serves the CPU; this path serves CUDA (and, under TRITON_INTERPRET=1, any
device: that is how CI checks it). A `KernelStep` is built once per engine step and shared by
every layer: device metadata for attention, per-token adapter slots (MBGMV) for a decode-only
step or adapter segments (MBGMM) for a step with prefill tokens. A decode step built by
`KernelStep.decode_graph` from static buffers, with a fixed split-K factor, neither allocates on
the host nor synchronises, so CUDA graphs can capture it (model/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import slora_kernels
from slora_kernels.lora_common import ROW_ALIGN_ELEMS

from .batch import BatchInput
from .lora import LoraTables
from .spec import MODULE_ORDER, ModelSpec


def rows_always_aligned(spec: ModelSpec, page_elems: int) -> bool:
    """Every LoRA row offset the pool layout can produce is a multiple of ROW_ALIGN_ELEMS.

    Rows are packed back to back inside pages (model/lora.py), so this holds when every row
    length and the page size are multiples of it. Known statically: no device check per step.
    """
    lengths = [d for m in MODULE_ORDER for d in spec.module_dims(m)] + [page_elems]
    return all(n % ROW_ALIGN_ELEMS == 0 for n in lengths)


@dataclass
class KernelStep:
    """One step's metadata on the model's device (see BatchInput for the fields)."""

    decode: bool  # one new token per sequence: decode kernels, MBGMV
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_context_len: int | None  # None: the attention kernel sizes split-K from num_splits
    num_splits: int | None
    tables: LoraTables | None  # None: no LoRA this step
    lora_modules: frozenset[int]  # modules some adapter of the step targets: other sites skip
    lora_slots: torch.Tensor | None  # decode: int32 [T]
    lora_chunks: torch.Tensor | None  # decode: the grouped MBGMV's plan, once per step
    segments: slora_kernels.LoraSegments | None  # prefill: tokens grouped by adapter
    aligned: bool

    @classmethod
    def prepare(cls, batch: BatchInput, tables: LoraTables | None, aligned: bool,
                device: torch.device) -> KernelStep:
        """Eager step: host metadata comes from the batch's host copies (no sync)."""
        qsl, ctx = batch.host_meta()
        decode = batch.is_decode_only
        lora_host = batch.lora_host()
        lora_modules = tables.modules_of(lora_host) if tables is not None else frozenset()
        if not lora_modules:
            tables = None  # no token of this step has an adapter
        lora_slots = chunks = segments = None
        if tables is not None and decode:
            lora_slots = batch.lora_slots.to(device=device, dtype=torch.int32)
            chunks = slora_kernels.decode_chunks(lora_slots)
        elif tables is not None:
            segments = slora_kernels.make_lora_segments(lora_host, device=device)
        return cls(
            decode=decode,
            query_start_loc=batch.query_start_loc.to(device=device, dtype=torch.int32),
            context_lens=batch.context_lens.to(device=device, dtype=torch.int32),
            block_tables=batch.block_tables.to(device=device, dtype=torch.int32),
            slot_mapping=batch.slot_mapping.to(device=device, dtype=torch.int64),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_context_len=max(ctx),
            num_splits=None,
            tables=tables,
            lora_modules=lora_modules,
            lora_slots=lora_slots,
            lora_chunks=chunks,
            segments=segments,
            aligned=aligned,
        )

    @classmethod
    def decode_graph(cls, batch: BatchInput, tables: LoraTables | None, aligned: bool,
                     num_splits: int, lora_modules: frozenset[int]) -> KernelStep:
        """Decode step over static device buffers (CUDA-graph capture): every padded row has
        slot -1 and slot_mapping -1; the LoRA call sites of `lora_modules` run whenever
        `tables` is given."""
        return cls(
            decode=True,
            query_start_loc=batch.query_start_loc,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
            slot_mapping=batch.slot_mapping,
            max_query_len=1,
            max_context_len=None,
            num_splits=num_splits,
            tables=tables,
            lora_modules=lora_modules if tables is not None else frozenset(),
            lora_slots=batch.lora_slots if tables is not None else None,
            lora_chunks=(slora_kernels.decode_chunks(batch.lora_slots)
                         if tables is not None else None),
            segments=None,
            aligned=aligned,
        )

    # ---- the ops (same roles as ops.TorchStep) -----------------------------------------------
    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        slora_kernels.kv_write(k, v, kv_cache, self.slot_mapping)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q [T, H, hd] over the pool (the new K/V were written there): [T, H * hd]."""
        del k, v  # the kernels read the new tokens' K/V from the pool
        if self.decode:
            out = slora_kernels.paged_attention_decode(
                q, kv_cache, self.context_lens, self.block_tables, scale=scale,
                max_context_len=self.max_context_len, num_splits=self.num_splits)
        else:
            out = slora_kernels.paged_attention_prefill(
                q, kv_cache, self.query_start_loc, self.context_lens, self.block_tables,
                scale=scale, max_query_len=self.max_query_len)
        return out.view(q.shape[0], -1)

    def lora(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
             modules: tuple[int, ...], columns: tuple[tuple[int, int], ...]) -> None:
        """y[:, off:off+dim] += LoRA delta of module m, for each m, (off, dim) in columns."""
        t = self.tables
        if t is None or self.lora_modules.isdisjoint(modules):
            return
        slora_kernels.add_lora(
            y, x, flat, t.a_ptr, t.b_ptr, t.ranks, t.scales, modules,
            [dim for _, dim in columns], [off for off, _ in columns],
            lora_slots=self.lora_slots, segments=self.segments, chunks=self.lora_chunks,
            aligned=self.aligned)
