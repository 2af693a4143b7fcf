"""RMSNorm with the residual add fused in: one launch per norm site.

The torch form (HF ``LlamaRMSNorm`` after ``x = x + o``) is ~9 launches: the add, a cast to fp32,
pow, mean, add eps, rsqrt, multiply, the cast back and the weight. On a slow host each costs
7-16 us of launch time, and on the device each reads and writes the whole ``[T, hidden]``
activation again. Here one program per token row does all of it in registers.

``rms_norm(x, weight, eps, residual=None)``:
- without ``residual``: returns ``RMSNorm(x)``;
- with ``residual``: first ``residual <- x + residual`` in place (rounded to the model's dtype,
  as torch's add is), then returns ``RMSNorm(residual)``.

Numerics follow HF: the sum of squares in fp32, ``x * rsqrt(var + eps)`` in fp32, cast to the
model's dtype, then multiplied by the weight in that dtype (computed in fp32 and rounded once,
as torch's fp16/bf16 multiply does). Only the order of the fp32 reduction differs from torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import next_pow2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# warps per program: a row of up to 8192 fp16 elements is 16 KB; 8 warps keep 256 threads on it
NUM_WARPS = 8


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_cols,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + t * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_o + offs, out, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [T, hidden] with unit last stride, got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x dtype must be fp16/bf16/fp32, got {x.dtype}")
    n = x.shape[1]
    if weight.dim() != 1 or weight.shape[0] != n or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{n}], got {tuple(weight.shape)}")
    tensors = [("weight", weight)]
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape) or residual.stride(1) != 1:
            raise ValueError(f"residual must be {tuple(x.shape)} with unit last stride, "
                             f"got {tuple(residual.shape)}")
        tensors.append(("residual", residual))
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match x's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``RMSNorm(x)`` or, with ``residual`` [T, hidden], ``residual += x`` (in place) then
    ``RMSNorm(residual)``; returns a new contiguous [T, hidden] tensor."""
    _check(x, weight, residual)
    T, n = x.shape
    out = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    res = residual if residual is not None else x
    _rms_norm_kernel[(T,)](
        x, res, weight, out, n, x.stride(0), res.stride(0), out.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(n),
        num_warps=NUM_WARPS if x.device.type == "cuda" else 1,
    )  # fmt: skip
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch reference (HF LlamaRMSNorm after the residual add): returns (normed, the new
    residual); nothing is modified in place."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x
