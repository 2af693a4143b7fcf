"""Triton-lang kernels over the unified pool (docs/DESIGN.md).

LoRA (MBGMM prefill; MBGMV decode, per token or grouped by adapter), paged attention (prefill,
decode, and a mixed step over a fixed grid), and the fused layer ops of the triton backend:
RMSNorm with the residual add, RoPE with the KV write, SwiGLU's silu * up.

Each kernel file holds a launcher (checks shapes/dtypes/devices) and a torch reference.
On CPU they run under ``TRITON_INTERPRET=1`` (tests); the engine uses them on CUDA.
"""

from .lora import add_lora, add_lora_ref, decode_chunks
from .lora_common import LoraSegments, make_lora_segments, rows_aligned
from .lora_expand import lora_expand, lora_expand_ref
from .lora_grouped import add_lora_grouped, lora_chunks
from .lora_shrink import lora_shrink, lora_shrink_ref
from .paged_attention import paged_attention_decode, paged_attention_prefill, paged_attention_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope_kv import rope_kv_write, rope_kv_write_ref
from .silu_mul import silu_mul, silu_mul_ref
from .varlen_attention import paged_attention_varlen, varlen_capacity, varlen_work

__all__ = [
    "LoraSegments",
    "add_lora",
    "add_lora_ref",
    "add_lora_grouped",
    "decode_chunks",
    "lora_chunks",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "make_lora_segments",
    "paged_attention_decode",
    "paged_attention_prefill",
    "paged_attention_ref",
    "paged_attention_varlen",
    "rms_norm",
    "rms_norm_ref",
    "rope_kv_write",
    "rope_kv_write_ref",
    "rows_aligned",
    "silu_mul",
    "silu_mul_ref",
    "varlen_capacity",
    "varlen_work",
]
