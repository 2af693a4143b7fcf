"""One tensor-parallel rank's share of the model: Megatron for the base, S-LoRA for adapters.

Base weights (HF names): q, k, v, gate and up are column-parallel (rank i keeps its slice of
the outputs: query heads, KV heads, MLP columns); o and down are row-parallel (rank i keeps the
matching input columns; its output is a partial sum that the forward all-reduces). Norms and
the embedding are replicated (a lookup costs nothing to repeat; sharding it would add an
all-reduce of [T, hidden] per step); the lm_head lives on rank 0 only, the one rank that
samples (docs/DESIGN.md "Tensor parallelism" weighs it against a vocabulary-parallel head).

LoRA factors (S-LoRA, Figure 4), the rank r padded to a multiple of tp with zero rows of A and
zero columns of B (no effect on the result) so that every rank's share has one shape:
- column-parallel module: A is cut along the rank, rank i keeping rows i, i + tp, ... (so the
  all-gathered [T, r/tp] shrink results, interleaved, are the [T, r] shrink in row order); B is
  cut along the output like the base weight;
- row-parallel module: A is cut along the input like the base weight (the [T, r] partial shrink
  is all-reduced); B is cut along the output: rank i adds its slice of the LoRA output into its
  partial sum, whose all-reduce carries it.

Heads that tp does not divide (SmolLM2-135M's 9 query / 3 KV heads at tp = 2) are padded with
zero heads at the end, GQA groups intact (`pad_heads`): KV heads up to a multiple of tp, query
heads to (padded KV heads) x (query heads per KV group), so every rank holds whole groups. A
zero head's q, k and v weights are zero (its keys and values are 0, its attention output a
finite average of zero values) and o's input columns for it are zero, so it adds exactly 0;
for LoRA, q,k,v's B rows and o's A columns of a padded head are zero. Everything past the
padding (slices, shares, a rank's spec, its pool page) is computed on the padded model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slora_backend.errors import EngineError
from slora_backend.model.lora import LoraGeometry
from slora_backend.model.spec import ModelSpec
from slora_backend.pages import ceil_div

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
LM_HEAD = "lm_head.weight"
FIELD = "tensor_parallel_size"


def check_divides(spec: ModelSpec, size: int) -> None:
    """Every rank takes an equal share of the MLP columns and of the hidden columns (the
    row-parallel LoRA B); INVALID_ARG naming tensor_parallel_size otherwise (heads are padded
    instead, `pad_heads`)."""
    for what, n in (("MLP columns (intermediate_size)", spec.intermediate_size),
                    ("hidden columns (hidden_size)", spec.hidden_size)):
        if n % size:
            raise EngineError.invalid(FIELD, f"{size} does not divide the model's {n} {what}: "
                                             "each rank takes an equal share")


def pad_heads(spec: ModelSpec, size: int) -> ModelSpec:
    """The model whose heads `size` ranks share equally: KV heads padded with zero heads to a
    multiple of `size`, query heads to (padded KV heads) x (query heads per group); `spec`
    itself where `size` divides the KV heads (and so the query heads)."""
    kv_heads = ceil_div(spec.num_kv_heads, size) * size
    if kv_heads == spec.num_kv_heads:
        return spec
    return dataclasses.replace(spec, num_heads=kv_heads * spec.gqa_ratio, num_kv_heads=kv_heads)


def padding_note(spec: ModelSpec, size: int) -> str | None:
    """What padding the heads costs at `size` ranks (None where there is none), for the log."""
    padded = pad_heads(spec, size)
    if padded is spec:
        return None
    extra = round(100 * (padded.num_kv_heads / spec.num_kv_heads - 1))
    return (f"{spec.num_heads} query / {spec.num_kv_heads} KV heads padded to "
            f"{padded.num_heads} / {padded.num_kv_heads} for {FIELD} {size} (zero heads, exact): "
            f"attention does {extra}% more work, and the KV cache and the q,k,v,o weights take "
            f"{extra}% more memory")


def pad_dim(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `length` (`t` itself, no copy, if it is)."""
    missing = length - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: which slice of each base weight it keeps."""

    rank: int
    size: int

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shapes this rank's model computes with (hidden size and vocabulary stay)."""
        padded = pad_heads(spec, self.size)
        return dataclasses.replace(padded, num_heads=padded.num_heads // self.size,
                                   num_kv_heads=padded.num_kv_heads // self.size,
                                   intermediate_size=spec.intermediate_size // self.size)

    def take(self, spec: ModelSpec, name: str, get: Callable[[str], torch.Tensor]
             ) -> torch.Tensor:
        """This rank's slice of the checkpoint tensor `name` of the model `spec` (`get` reads a
        whole one), zero heads included where the heads are padded."""
        if name == LM_HEAD and self.rank != 0:
            # LlamaModel.from_state_dict then aliases the embedding: no memory, never read
            # (only rank 0 computes logits)
            raise KeyError(name)
        module = name.split(".")[-2]
        if module in COLUMN_PARALLEL:
            return self._slice(get(name), 0, pad_heads(spec, self.size).module_dims(module)[1])
        if module in ROW_PARALLEL:
            return self._slice(get(name), 1, pad_heads(spec, self.size).module_dims(module)[0])
        return get(name)

    def _slice(self, weight: torch.Tensor, dim: int, padded: int) -> torch.Tensor:
        """This rank's 1/size of `weight` along `dim`, once padded with zeros to `padded`."""
        n = padded // self.size
        whole = pad_dim(weight, dim, padded)
        return whole.narrow(dim, self.rank * n, n).clone()  # not a view of the whole tensor


class ShardGeometry(LoraGeometry):
    """The rows of one rank's share of each module's factors in its pool (see the module
    docstring); `rank` arguments are the padded ranks the slot tables hold; `spec` is the
    model with its heads padded (`pad_heads`), the shapes the shares are cut from."""

    def __init__(self, spec: ModelSpec, size: int) -> None:
        super().__init__(pad_heads(spec, size))
        self.size = size

    def padded_rank(self, rank: int) -> int:
        return ceil_div(rank, self.size) * self.size

    def lengths(self, module: str) -> tuple[int, int]:
        d_in, d_out = self.spec.module_dims(module)
        if module in ROW_PARALLEL:
            return d_in // self.size, d_out // self.size
        return d_in, d_out // self.size

    def a_rows(self, module: str, rank: int) -> int:
        return rank // self.size if module in COLUMN_PARALLEL else rank

    def split(self, module: str, a: torch.Tensor,
              b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's share of A [..., r, in] and B [..., out, r] (leading dims such as the
        layers kept): [size, ..., a_rows, a_len] and the B^T shares [size, ..., padded r,
        b_len] (views where no copy is needed)."""
        d_in, d_out = self.spec.module_dims(module)  # a padded head's A columns / B rows: 0
        a, b = pad_dim(a, -1, d_in), pad_dim(b, -2, d_out)
        pad = self.padded_rank(a.shape[-2]) - a.shape[-2]
        bt = b.transpose(-1, -2)
        if pad:
            a = F.pad(a, (0, 0, 0, pad))
            bt = F.pad(bt, (0, 0, 0, pad))
        if module in COLUMN_PARALLEL:  # rank i: rows i, i + size, ...
            a_parts = a.unflatten(-2, (-1, self.size)).movedim(-2, 0)
        else:  # rank i: its input columns
            a_parts = a.unflatten(-1, (self.size, -1)).movedim(-2, 0)
        return a_parts, bt.unflatten(-1, (self.size, -1)).movedim(-2, 0)
