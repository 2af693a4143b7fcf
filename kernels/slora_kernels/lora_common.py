"""Shared pieces of the LoRA kernels: batch metadata (segments) and launcher checks.

Pool layout (docs/DESIGN.md, "The unified pool"): ``flat = storage[l].view(-1)``; row j of
module m of the adapter in slot s starts at element ``a_ptr[s, m, j]`` (A row, ``in_m`` long)
and ``b_ptr[s, m, j]`` (B^T row, ``out_m`` long); ``ranks[s, m]`` is the true rank (0 = module
not targeted); ``scales[s]`` the LoRA scale. A token with ``lora_slot == -1`` gets no LoRA.

Two batch shapes:
- MBGMV (decode): one token per request, each with its own slot: pass ``lora_slots`` [T].
- MBGMM (prefill): tokens grouped in segments of one adapter: pass a :class:`LoraSegments`
  (built once per engine step by :func:`make_lora_segments`, reused by every layer/module).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NUM_MODULES = 7  # MODULE_ORDER = (q, k, v, o, gate, up, down)
# rows whose offsets are multiples of this many elements are 16-byte aligned in fp16/bf16: the
# kernels then promise it to the compiler (vector loads); ROW_ALIGN is the same for @triton.jit
ROW_ALIGN_ELEMS = 8
ROW_ALIGN = tl.constexpr(ROW_ALIGN_ELEMS)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LoraSegments:
    """Tokens grouped by adapter for the MBGMM kernels.

    ``token_idx`` int32 [n]: token ids in segment order (None: identity, then segment s covers
    tokens ``seg_start[s]:seg_start[s+1]`` of the batch directly). ``seg_start`` int32 [S+1]
    offsets into ``token_idx``; ``seg_slot`` int32 [S] the adapter slot of each segment (a -1
    segment, a run of base-model tokens, is skipped by the kernels at once).
    ``max_seg_len`` (host int) sizes the grid.
    """

    token_idx: torch.Tensor | None
    seg_start: torch.Tensor
    seg_slot: torch.Tensor
    max_seg_len: int
    num_tokens: int

    @property
    def num_segments(self) -> int:
        return int(self.seg_slot.shape[0])


def make_lora_segments(
    lora_slots: torch.Tensor | Sequence[int],
    *,
    sort: bool = True,
    device: torch.device | str | None = None,
) -> LoraSegments:
    """Build MBGMM segments from per-token slots (host work; call once per engine step).

    sort=True: all tokens of one adapter form one segment (stable order inside), so an adapter
    used by several sequences is read once per M-tile instead of once per sequence.
    sort=False: segments are maximal runs of consecutive tokens with the same slot (no index
    indirection; runs of -1 tokens become segments that the kernels skip). With sort=True
    tokens with slot -1 are left out. A CUDA ``lora_slots`` is
    copied to the host (one sync): pass the host copy the engine already has.
    """
    if isinstance(lora_slots, torch.Tensor):
        if lora_slots.dim() != 1:
            raise ValueError(f"lora_slots must be 1-D, got shape {tuple(lora_slots.shape)}")
        if device is None:
            device = lora_slots.device
        slots = lora_slots.detach().to("cpu", torch.int64)
    else:
        slots = torch.tensor(list(lora_slots), dtype=torch.int64)
        if device is None:
            device = "cpu"
    num_tokens = int(slots.shape[0])
    if sort:
        tok = torch.nonzero(slots >= 0).flatten()
        order = torch.argsort(slots[tok], stable=True)
        tok = tok[order]
        sel = slots[tok]
    else:
        tok = None
        sel = slots
    if sel.numel() == 0:
        starts = torch.zeros(1, dtype=torch.int64)
        seg_slot = torch.zeros(0, dtype=torch.int64)
    else:
        change = torch.ones(sel.shape[0], dtype=torch.bool)
        change[1:] = sel[1:] != sel[:-1]
        starts = torch.nonzero(change).flatten()
        seg_slot = sel[starts]
        starts = torch.cat([starts, torch.tensor([sel.shape[0]])])
    lens = (starts[1:] - starts[:-1])[seg_slot >= 0]
    max_len = int(lens.max()) if lens.numel() else 0
    dev = torch.device(device)
    return LoraSegments(
        token_idx=None if tok is None else tok.to(dev, torch.int32),
        seg_start=starts.to(dev, torch.int32),
        seg_slot=seg_slot.to(dev, torch.int32),
        max_seg_len=max_len,
        num_tokens=num_tokens,
    )


# ---------------------------------------------------------------------------------------------
# checks shared by the launchers


# ---------------------------------------------------------------------------------------------
# fused modules: a launch serves 1-3 modules (q/k/v, gate/up), each with its own index, output
# width and column offset, passed as three scalar arguments per quantity


def per_module3(values: list[int]) -> list[int]:
    """Per-module launch arguments padded to the kernels' three slots (the last repeated)."""
    return values + [values[-1]] * (3 - len(values))


@triton.jit
def pick_module(i, v0, v1, v2):
    """The value for fused module ``i`` (0..2) of a per-module scalar argument."""
    return tl.where(i == 0, v0, tl.where(i == 1, v1, v2))


@triton.jit
def load_pool_rows(flat_ptr, rows, r_mask, offs, c_mask):
    """The [rows, offs] tile of pool rows starting at element offsets ``rows`` (A rows, B^T
    rows); zeros where ``r_mask`` (past the rank) or ``c_mask`` (past the row) is False."""
    return tl.load(flat_ptr + rows[:, None] + offs[None, :], mask=r_mask[:, None] & c_mask[None, :],
                   other=0.0)


@triton.jit
def shrink_dot_step(acc, a, x_ptr, tok, m_mask, offs_k, k_mask, stride_xt, FP32: tl.constexpr):
    """One k tile of a tensor-core shrink: ``acc + x[tok, offs_k] @ a^T`` (``a``: the rank rows'
    [rows, k] tile; ``tok``/``m_mask``: the token rows, padded to a tensor-core tile)."""
    xt = tl.load(
        x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
        mask=m_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    if FP32:
        return acc + tl.dot(xt, tl.trans(a), input_precision="ieee")
    return acc + tl.dot(xt, tl.trans(a))


def check_tables(flat, ptr, ranks, modules, name="a_ptr"):
    """Shape/dtype/device checks of the pool slice and the slot tables; returns modules as ints."""
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ValueError("flat must be the 1-D pool layer slice storage[l].view(-1)")
    if flat.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"flat dtype must be fp16/bf16/fp32, got {flat.dtype}")
    if not flat.is_contiguous():
        raise ValueError("flat must be contiguous")
    if ptr.dtype != torch.int64 or ptr.dim() != 3 or ptr.shape[1] != NUM_MODULES:
        raise ValueError(
            f"{name} must be int64 [slots, 7, max_rank], got {ptr.dtype} {tuple(ptr.shape)}"
        )
    if ranks.dtype != torch.int32 or tuple(ranks.shape) != tuple(ptr.shape[:2]):
        raise ValueError(
            f"ranks must be int32 {tuple(ptr.shape[:2])}, got {ranks.dtype} {tuple(ranks.shape)}"
        )
    if ptr.stride(2) != 1 or ranks.stride(1) != 1:
        raise ValueError(f"{name} and ranks must be contiguous in their last dimension")
    for t, n in ((ptr, name), (ranks, "ranks")):
        if t.device != flat.device:
            raise ValueError(f"{n} is on {t.device} but flat is on {flat.device}")
    mods = [int(m) for m in modules]
    if not 1 <= len(mods) <= 3:
        raise ValueError(f"1 to 3 modules per launch (q/k/v or gate/up fused), got {mods}")
    if any(not 0 <= m < NUM_MODULES for m in mods):
        raise ValueError(f"module indices must be in 0..6, got {mods}")
    return mods


def check_x(x, flat):
    """The input ``x`` [T, in_dim] of a LoRA call: unit last stride, the pool's dtype and device."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [T, in_dim] with unit last stride, got {tuple(x.shape)}")
    if x.dtype != flat.dtype:
        raise TypeError(f"x dtype {x.dtype} must match the pool dtype {flat.dtype}")
    if x.device != flat.device:
        raise ValueError(f"x is on {x.device} but the pool is on {flat.device}")


def check_y_columns(y, flat, b_ptr, scales, num_modules, out_dims, y_offsets):
    """The output ``y`` [T, N], each module's column range in it, and the scales table.

    Returns (out_dims, y_offsets) as int lists (default offsets: out_dims packed from column 0,
    the fused q|k|v layout)."""
    out_dims = [int(d) for d in out_dims]
    if len(out_dims) != num_modules:
        raise ValueError(f"{num_modules} modules but {len(out_dims)} out_dims")
    if y_offsets is None:
        y_offsets = [sum(out_dims[:i]) for i in range(len(out_dims))]
    y_offsets = [int(o) for o in y_offsets]
    if len(y_offsets) != num_modules:
        raise ValueError(f"{num_modules} modules but {len(y_offsets)} y_offsets")
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y must be 2-D [T, N] with unit last stride, got {tuple(y.shape)}")
    if y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"y dtype must be fp16/bf16/fp32, got {y.dtype}")
    N = y.shape[1]
    if any(o < 0 or o + d > N for o, d in zip(y_offsets, out_dims)):
        raise ValueError(
            f"module column ranges {list(zip(y_offsets, out_dims))} exceed y's {N} columns"
        )
    if y.device != flat.device:
        raise ValueError("y and the pool must be on the same device")
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.shape[0] != b_ptr.shape[0]:
        raise ValueError(
            f"scales must be fp32 [{b_ptr.shape[0]}], got {scales.dtype} {tuple(scales.shape)}"
        )
    if scales.device != flat.device:
        raise ValueError("scales must be on the pool's device")
    return out_dims, y_offsets


def check_batch(lora_slots, segments, num_tokens, device):
    """Exactly one of lora_slots (MBGMV) / segments (MBGMM); returns 'gemv' or 'gemm'."""
    if (lora_slots is None) == (segments is None):
        raise ValueError(
            "pass exactly one of lora_slots (MBGMV, decode) or segments (MBGMM, prefill)"
        )
    if lora_slots is not None:
        if (
            lora_slots.dtype != torch.int32
            or lora_slots.dim() != 1
            or lora_slots.shape[0] != num_tokens
        ):
            raise ValueError(
                f"lora_slots must be int32 [{num_tokens}], "
                f"got {lora_slots.dtype} {tuple(lora_slots.shape)}"
            )
        if lora_slots.device != device or not lora_slots.is_contiguous():
            raise ValueError(f"lora_slots must be contiguous on {device}")
        return "gemv"
    if segments.num_tokens != num_tokens:
        raise ValueError(
            f"segments were built for {segments.num_tokens} tokens, the batch has {num_tokens}"
        )
    for t in (segments.seg_start, segments.seg_slot) + (
        () if segments.token_idx is None else (segments.token_idx,)
    ):
        if t.device != device or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"segment tensors must be contiguous int32 on {device}")
    return "gemm"


_ALIGN_CACHE: dict[int, tuple] = {}


def rows_aligned(flat: torch.Tensor, ptr: torch.Tensor, align: int = ROW_ALIGN_ELEMS) -> bool:
    """True when every row pointer and the pool slice base are multiples of ``align`` elements.

    Lets the kernels promise 16-byte aligned rows to the compiler (vector loads). The device
    reduction runs once per version of the table (torch bumps ``_version`` on in-place writes),
    so the hot path does not synchronise unless the adapter manager changed the tables.
    """
    if (flat.data_ptr() % (align * flat.element_size())) != 0:
        return False
    key = id(ptr)
    hit = _ALIGN_CACHE.get(key)
    if hit is not None and hit[0]() is ptr and hit[1] == ptr._version and hit[2] == align:
        return hit[3]
    ok = bool((ptr % align == 0).all())
    if len(_ALIGN_CACHE) > 64:
        _ALIGN_CACHE.clear()
    _ALIGN_CACHE[key] = (weakref.ref(ptr), ptr._version, align, ok)
    return ok


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs is fastest


# plain-Python helpers for the launchers (triton.cdiv / next_power_of_2 are constexpr functions
# with a few microseconds of wrapping per call, paid on every launch)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
