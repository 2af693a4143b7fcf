"""The unified page pool (S-LoRA unified paging): KV pages and adapter pages share one tensor.

`PagePool` is the accounting (plain Python): which page indices are free, which hold KV, which
hold adapter rows. `PoolStorage` owns the tensor `[num_layers, num_pages, page_elems]`; a page
index is allocated for all layers at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slora_backend.errors import PoolExhaustedError
from slora_backend.pages import page_elems

KINDS = ("kv", "lora")


class PagePool:
    """Free-list page allocator. `allocate(n)` returns n distinct pages or raises and changes
    nothing; `free` refuses pages that are not allocated (double free) and changes nothing."""

    def __init__(self, num_pages: int) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        self.num_pages = num_pages
        # stack of free pages, low indices on top so allocation order is deterministic
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._owner: dict[int, str] = {}
        self._used: dict[str, int] = dict.fromkeys(KINDS, 0)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def used_by(self, kind: str) -> int:
        _check_kind(kind)
        return self._used[kind]

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int, kind: str) -> list[int]:
        _check_kind(kind)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"page count must be a non-negative integer, got {n!r}")
        if n > len(self._free):
            raise PoolExhaustedError(f"requested {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = kind
        self._used[kind] += n
        return pages

    def free(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        if len(set(pages)) != len(pages):
            raise ValueError(f"page freed twice in one call: {pages}")
        for p in pages:
            if p not in self._owner:
                raise ValueError(f"page {p} is not allocated (double free?)")
        for p in reversed(pages):
            self._used[self._owner.pop(p)] -= 1
            self._free.append(p)

    def kind_of(self, page: int) -> str | None:
        """'kv', 'lora' or None (free)."""
        return self._owner.get(page)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"page kind must be one of {KINDS}, got {kind!r}")


class PoolStorage:
    """The pool tensor `[num_layers, num_pages, page_elems]` with
    `page_elems = 2 * block_size * num_kv_heads * head_dim` (K and V of block_size tokens)."""

    def __init__(self, num_layers: int, num_pages: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device) -> None:
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_elems = page_elems(block_size, num_kv_heads, head_dim)
        # zeros, not empty: a page read before it is written (padding rows) must be finite
        self.tensor = torch.zeros(num_layers, num_pages, self.page_elems, dtype=dtype,
                                  device=device)

    def kv_view(self, layer: int) -> torch.Tensor:
        """[num_pages, 2, block_size, num_kv_heads, head_dim]; [:, 0] is K, [:, 1] is V."""
        return self.tensor[layer].view(self.num_pages, 2, self.block_size, self.num_kv_heads,
                                       self.head_dim)

    def flat(self, layer: int) -> torch.Tensor:
        """The layer slice as one flat vector (adapter rows are addressed in it)."""
        return self.tensor[layer].view(-1)


def pages_for_bytes(pool_bytes: int, num_layers: int, elems_per_page: int,
                    dtype: torch.dtype) -> int:
    """How many pages fit in `pool_bytes` (a page spans all layers)."""
    bytes_per_page = num_layers * elems_per_page * torch.empty((), dtype=dtype).element_size()
    return pool_bytes // bytes_per_page
