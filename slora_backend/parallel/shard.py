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
    """Every rank takes an equal share of heads, KV heads, MLP columns and hidden columns (the
    row-parallel LoRA B); INVALID_ARG naming tensor_parallel_size otherwise."""
    for what, n in (("attention heads", spec.num_heads), ("KV heads", spec.num_kv_heads),
                    ("MLP columns (intermediate_size)", spec.intermediate_size),
                    ("hidden columns (hidden_size)", spec.hidden_size)):
        if n % size:
            raise EngineError.invalid(FIELD, f"{size} does not divide the model's {n} {what}: "
                                             "each rank takes an equal share")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: which slice of each base weight it keeps."""

    rank: int
    size: int

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shapes this rank's model computes with (hidden size and vocabulary stay)."""
        return dataclasses.replace(spec, num_heads=spec.num_heads // self.size,
                                   num_kv_heads=spec.num_kv_heads // self.size,
                                   intermediate_size=spec.intermediate_size // self.size)

    def take(self, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """This rank's slice of the checkpoint tensor `name` (`get` reads a whole one)."""
        if name == LM_HEAD and self.rank != 0:
            # LlamaModel.from_state_dict then aliases the embedding: no memory, never read
            # (only rank 0 computes logits)
            raise KeyError(name)
        module = name.split(".")[-2]
        if module in COLUMN_PARALLEL:
            return self._slice(get(name), 0)
        if module in ROW_PARALLEL:
            return self._slice(get(name), 1)
        return get(name)

    def _slice(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        n = weight.shape[dim] // self.size
        return weight.narrow(dim, self.rank * n, n).clone()  # not a view of the whole tensor


class ShardGeometry(LoraGeometry):
    """The rows of one rank's share of each module's factors in its pool (see the module
    docstring); `rank` arguments are the padded ranks the slot tables hold."""

    def __init__(self, spec: ModelSpec, size: int) -> None:
        super().__init__(spec)
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
