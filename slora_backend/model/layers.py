"""Layers both backends share: RMSNorm, rotary embeddings (RoPE) and the pool's KV view."""

from __future__ import annotations

import math

import torch

from .spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalize in fp32, cast back, multiply by the weight."""
    if x.dtype == torch.float32:
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + eps))
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def rope_inv_freq(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32), with llama3 / linear scaling as in transformers."""
    dim = spec.head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
    )
    sc = spec.rope_scaling
    if not sc:
        return inv_freq
    rope_type = sc.get("rope_type", "default")
    factor = float(sc["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(sc["low_freq_factor"])
        high = float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_l)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim/2] for the given positions (computed in fp32, cast like HF)."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention). x [T, heads, head_dim]; cos/sin [T, head_dim/2]."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def kv_cache_view(
    layer_storage: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """storage[l] [P, page_elems] -> [P, 2, block_size, num_kv_heads, head_dim]."""
    return layer_storage.view(layer_storage.shape[0], 2, block_size, num_kv_heads, head_dim)
