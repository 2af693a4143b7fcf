"""The kernel path of the model's hot ops: kernels/ (Triton-lang) over the unified pool.

torch_step.py (torch) serves the CPU; this path serves CUDA (and, under TRITON_INTERPRET=1, any
device: that is how CI checks it). A `KernelStep` is built once per engine step and shared by
every layer: device metadata for attention, per-token adapter slots (MBGMV) for a decode-only
step or adapter segments (MBGMM) for a step with prefill tokens. Each role is one launch (or two:
LoRA's shrink and expand, split-K decode attention's merge): the residual add with the RMSNorm,
RoPE with the KV write, attention, SwiGLU's activation.

Two kinds of step are built from static buffers and neither allocate on the host nor
synchronise, so CUDA graphs capture them: a decode step (`KernelStep.decode_graph`, fixed split-K
factor; model/cuda_graphs.py) and a mixed step of prefill and decode rows
(`KernelStep.mixed_graph`: attention over a work list of query tiles, LoRA by the grouped kernel
over the per-token slots; model/mixed_graphs.py).
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
    work: torch.Tensor | None  # mixed graphs: the varlen attention's work list
    block_m: int  # the query tile the work list was built with
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
            work=None,
            block_m=0,
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
        return cls._graph(batch, tables, aligned, lora_modules, decode=True, max_query_len=1,
                          num_splits=num_splits, work=None, block_m=0)

    @classmethod
    def mixed_graph(cls, batch: BatchInput, work: torch.Tensor, block_m: int,
                    tables: LoraTables | None, aligned: bool,
                    lora_modules: frozenset[int]) -> KernelStep:
        """Prefill and decode rows over static device buffers (CUDA-graph capture): attention
        over `work` (`slora_kernels.varlen_work` with `block_m`), LoRA per token (the grouped
        MBGMV and its device chunk plan). Padded rows have slot -1, slot_mapping -1 and no
        work item."""
        return cls._graph(batch, tables, aligned, lora_modules, decode=False, max_query_len=0,
                          num_splits=None, work=work, block_m=block_m)

    @classmethod
    def _graph(cls, batch: BatchInput, tables: LoraTables | None, aligned: bool,
               lora_modules: frozenset[int], **attention) -> KernelStep:
        """A step over static buffers; LoRA over the per-token slots (the call sites of
        `lora_modules`) whenever `tables` is given."""
        on = tables is not None
        return cls(query_start_loc=batch.query_start_loc, context_lens=batch.context_lens,
                   block_tables=batch.block_tables, slot_mapping=batch.slot_mapping,
                   max_context_len=None, **attention, tables=tables,
                   lora_modules=lora_modules if on else frozenset(),
                   lora_slots=batch.lora_slots if on else None,
                   lora_chunks=slora_kernels.decode_chunks(batch.lora_slots) if on else None,
                   segments=None, aligned=aligned)

    # ---- the roles (those of torch_step.TorchStep) ---------------------------------------------
    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual), the sum written into `residual` in place;
        without a residual (RMSNorm(x), x). One launch."""
        return slora_kernels.rms_norm(x, weight, eps, residual), (
            x if residual is None else residual)

    def rope_attention(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                       cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                       scale: float) -> torch.Tensor:
        """RoPE (q rotated in place in `qkv`) with the KV write, one launch; then attention
        over the pool: [T, H * D]."""
        slora_kernels.rope_kv_write(qkv, cos, sin, kv_cache, self.slot_mapping, num_heads)
        T, hd = qkv.shape[0], kv_cache.shape[-1]
        q = qkv[:, : num_heads * hd].view(T, num_heads, hd)
        if self.work is not None:
            out = slora_kernels.paged_attention_varlen(q, kv_cache, self.work, self.block_tables,
                                                       block_m=self.block_m, scale=scale)
        elif self.decode:
            out = slora_kernels.paged_attention_decode(
                q, kv_cache, self.context_lens, self.block_tables, scale=scale,
                max_context_len=self.max_context_len, num_splits=self.num_splits)
        else:
            out = slora_kernels.paged_attention_prefill(
                q, kv_cache, self.query_start_loc, self.context_lens, self.block_tables,
                scale=scale, max_query_len=self.max_query_len)
        return out.view(T, -1)

    def act(self, gu: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(gate) * up of the fused [T, 2 I] output, one launch."""
        return slora_kernels.silu_mul(gu)

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
