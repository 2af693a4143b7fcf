"""SwiGLU's activation: ``silu(gate) * up`` over the fused gate|up output, in one launch.

torch spends two launches and a full ``[T, I]`` intermediate on it (``F.silu`` then the
multiply). Here a program per (token, column tile) reads both halves of ``gu`` [T, 2 I] once and
writes ``a`` [T, I]. In fp16/bf16 the silu is rounded to the model's dtype before the multiply,
as torch's two ops round, so the result matches them up to the hardware's ``exp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import cdiv, next_pow2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 1024  # columns per program (the largest tile; small widths use their power of two)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_g, stride_o, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(gu_ptr + t * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + t * stride_g + n_cols + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = (silu.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_o + offs, out, mask=mask)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gu[:, :I]) * gu[:, I:]`` for ``gu`` [T, 2 I] (unit last stride): a new [T, I]."""
    if gu.dim() != 2 or gu.stride(1) != 1 or gu.shape[1] % 2:
        raise ValueError(f"gu must be 2-D [T, 2 * I] with unit last stride, got {tuple(gu.shape)}")
    if gu.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gu dtype must be fp16/bf16/fp32, got {gu.dtype}")
    T, n = gu.shape[0], gu.shape[1] // 2
    out = torch.empty((T, n), dtype=gu.dtype, device=gu.device)
    if T == 0:
        return out
    block = min(BLOCK, next_pow2(n))
    _silu_mul_kernel[(T, cdiv(n, block))](gu, out, n, gu.stride(0), out.stride(0), BLOCK=block,
                                          num_warps=4)  # fmt: skip
    return out


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    """torch reference: ``F.silu(gate) * up`` in the input's dtype."""
    n = gu.shape[1] // 2
    return torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
