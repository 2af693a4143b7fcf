"""Triton-lang kernels over the unified pool (docs/DESIGN.md).

LoRA (MBGMM prefill; MBGMV decode, per token or grouped by adapter), paged attention (prefill,
decode), KV write.

Each kernel file holds a launcher (checks shapes/dtypes/devices) and a torch reference.
On CPU they run under ``TRITON_INTERPRET=1`` (tests); the engine uses them on CUDA.
"""

from .kv_write import kv_write, kv_write_ref
from .lora import add_lora, add_lora_ref, decode_chunks
from .lora_common import LoraSegments, make_lora_segments, rows_aligned
from .lora_expand import lora_expand, lora_expand_ref
from .lora_grouped import add_lora_grouped, lora_chunks
from .lora_shrink import lora_shrink, lora_shrink_ref
from .paged_attention import paged_attention_decode, paged_attention_prefill, paged_attention_ref

__all__ = [
    "LoraSegments",
    "add_lora",
    "add_lora_ref",
    "add_lora_grouped",
    "decode_chunks",
    "kv_write",
    "kv_write_ref",
    "lora_chunks",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "make_lora_segments",
    "paged_attention_decode",
    "paged_attention_prefill",
    "paged_attention_ref",
    "rows_aligned",
]
