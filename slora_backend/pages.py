"""Geometry of the unified pool, shared by the engine (page accounting) and the model (page
views): a page holds K and V of `block_size` tokens of one layer (docs/DESIGN.md "The unified
pool")."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """Smallest k with k * d >= n (pages for n tokens, tiles for n rows, ...)."""
    return -(-n // d)


def page_elems(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Elements of one page of one layer: K and V of `block_size` tokens."""
    return 2 * block_size * num_kv_heads * head_dim
