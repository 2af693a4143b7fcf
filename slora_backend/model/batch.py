"""BatchInput: one engine step's tokens, as the model consumes them (see docs/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class BatchInput:
    """Tokens of S sequences concatenated (T tokens in all).

    Sequence i owns rows query_start_loc[i] : query_start_loc[i+1] (its new tokens: a prefill
    chunk or one decode token). context_lens[i] is its KV length after this step, new tokens
    included, so its earlier context is
    context_lens[i] - (query_start_loc[i+1] - query_start_loc[i])
    tokens already in the pool pages block_tables[i]. New tokens' K/V go to slot_mapping
    (slot = page * block_size + offset).
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    query_start_loc: torch.Tensor  # int32 [S+1]
    context_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks] (padded with 0)
    slot_mapping: torch.Tensor  # int64 [T]
    lora_slots: torch.Tensor  # int32 [T] (-1 = base model)
    logits_indices: torch.Tensor  # int64 [S'] rows whose logits are returned
    is_decode_only: bool = False  # every sequence has exactly one new token
    # Optional host-side copies (plain lists) so the model does not have to read small device
    # tensors back; filled lazily by `host_meta()` when the runner leaves them None.
    query_start_loc_host: list[int] | None = None
    context_lens_host: list[int] | None = None
    lora_slots_host: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def host_meta(self) -> tuple[list[int], list[int]]:
        """(query_start_loc, context_lens) as Python lists (cached)."""
        if self.query_start_loc_host is None:
            self.query_start_loc_host = [int(v) for v in self.query_start_loc.tolist()]
        if self.context_lens_host is None:
            self.context_lens_host = [int(v) for v in self.context_lens.tolist()]
        return self.query_start_loc_host, self.context_lens_host

    def lora_host(self) -> list[int]:
        """lora_slots as a Python list (cached)."""
        if self.lora_slots_host is None:
            self.lora_slots_host = [int(v) for v in self.lora_slots.tolist()]
        return self.lora_slots_host

    def to(self, device: torch.device | str) -> BatchInput:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return BatchInput(**kw)

    @classmethod
    def build(
        cls,
        seqs: list[tuple[list[int], int, list[int], int]],
        block_size: int,
        device: torch.device | str = "cpu",
        logits_for: str | list[bool] = "last",
    ) -> BatchInput:
        """The batch of one step (the engine's runner, tests).

        seqs: per sequence (new_token_ids, num_computed_tokens (context already in the pool),
        block_table (pages covering the context after this step), lora_slot).
        logits_for: "last" -> one logits row per sequence (its last new token);
        "all" -> every token; a list of bools -> the last new token of the sequences marked True.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        ctx: list[int] = []
        slots: list[int] = []
        lora: list[int] = []
        logits_idx: list[int] = []
        max_blocks = max((len(s[2]) for s in seqs), default=1) or 1
        for i, (toks, computed, pages, lora_slot) in enumerate(seqs):
            n = len(toks)
            if n == 0:
                raise ValueError("every sequence needs at least one new token")
            total = computed + n
            if len(pages) * block_size < total:
                raise ValueError(f"sequence {i}: {len(pages)} pages cannot hold {total} tokens")
            start = len(input_ids)
            input_ids += toks
            positions += range(computed, total)
            slots += [pages[p // block_size] * block_size + p % block_size
                      for p in range(computed, total)]
            lora += [lora_slot] * n
            qsl.append(start + n)
            ctx.append(total)
            if logits_for == "all":
                logits_idx += range(start, start + n)
            elif logits_for == "last" or logits_for[i]:
                logits_idx.append(start + n - 1)
        # one tensor from padded rows: a torch.tensor per row costs microseconds each
        bt = torch.tensor([list(s[2]) + [0] * (max_blocks - len(s[2])) for s in seqs],
                          dtype=torch.int32).view(len(seqs), max_blocks)
        b = cls(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=bt,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            lora_slots=torch.tensor(lora, dtype=torch.int32),
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64),
            is_decode_only=all(len(s[0]) == 1 for s in seqs),
            query_start_loc_host=qsl,
            context_lens_host=ctx,
            lora_slots_host=lora,
        )
        return b.to(device) if str(device) != "cpu" else b


@dataclass
class TokenFeed:
    """Input rows whose token the previous step sampled and has not been read back yet: they
    are filled on the device from that step's token tensor, after the batch is copied in."""

    rows: torch.Tensor  # int64 [k]: positions in the batch's input_ids (device)
    tokens: torch.Tensor  # int64 [k]: their tokens (device)
    host_rows: list[int] | None = None  # `rows` on the host (the tensor-parallel step plan)

    def apply(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.tokens)
