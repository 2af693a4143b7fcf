"""Block tables of sequences (token position -> KV page) on top of the shared PagePool."""

from __future__ import annotations

from slora_backend.memory_pool import PagePool
from slora_backend.pages import ceil_div

KV_KIND = "kv"


class KVManager:
    """Owns the KV pages of every sequence; page i of a sequence holds its tokens
    [i * block_size, (i + 1) * block_size)."""

    def __init__(self, pool: PagePool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` needs so that `num_tokens` tokens have KV slots."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, ceil_div(num_tokens, self.block_size) - have)

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Allocate pages to cover `num_tokens`; PoolExhaustedError (nothing changed) if short."""
        n = self.pages_needed(seq_id, num_tokens)
        if n:
            self._tables.setdefault(seq_id, []).extend(self.pool.allocate(n, KV_KIND))

    def free(self, seq_id: str) -> int:
        """Return all pages of `seq_id` to the pool; returns how many."""
        pages = self._tables.pop(seq_id, [])
        if pages:
            self.pool.free(pages)
        return len(pages)

    @property
    def num_seqs(self) -> int:
        return len(self._tables)
