"""Log-probabilities of sampled tokens and their top-k alternatives (vLLM's semantics).

The distribution is the model's own: log-softmax of the final fp32 logits (after the adapter),
before temperature, top-k and top-p (vLLM's default `logprobs_mode="raw_logprobs"`), so a
token's logprob does not depend on how it was sampled. The rank of a token is 1 + the number
of vocabulary entries with a strictly higher logprob. Computed on the device, in the step,
only for the rows that asked; a step where no row asked costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slora_backend.engine.sequence import Sequence as Request


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated position: the sampled token and the `k` most likely tokens."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass
class StepLogprobs:
    """The logprobs of the rows of one step that asked (host copies once the step is ready)."""

    rows: list[int]  # step rows that asked, in order
    num_top: list[int]  # how many alternatives each of them asked for
    sampled: torch.Tensor  # fp32 [n]
    rank: torch.Tensor  # int64 [n]
    top_ids: torch.Tensor  # int64 [n, kmax]
    top_logprobs: torch.Tensor  # fp32 [n, kmax]

    def for_rows(self) -> dict[int, TokenLogprobs]:
        """step row -> its TokenLogprobs (call after the step's copies are done)."""
        sampled, rank = self.sampled.tolist(), self.rank.tolist()
        ids, lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return {row: TokenLogprobs(-1, sampled[j], rank[j], tuple(zip(ids[j][:k], lps[j][:k])))
                for j, (row, k) in enumerate(zip(self.rows, self.num_top))}


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                     num_top: Sequence[int | None]) -> StepLogprobs | None:
    """Logprobs of `tokens` [S] under `logits` [S, V] for the rows whose num_top is not None
    (num_top[i] alternatives, validated by SamplingParams); None when no row asked. No host sync:
    the results stay on the logits' device until `to_host`."""
    rows = [i for i, k in enumerate(num_top) if k is not None]
    if not rows:
        return None
    ks = [int(num_top[i]) for i in rows]
    index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    sampled = logp.gather(1, tokens.index_select(0, index)[:, None])
    rank = (logp > sampled).sum(dim=-1) + 1
    top_logprobs, top_ids = torch.topk(logp, max(ks), dim=-1, sorted=True)
    return StepLogprobs(rows, ks, sampled[:, 0], rank, top_ids, top_logprobs)


def to_host(step: StepLogprobs, pinned: bool) -> StepLogprobs:
    """Queue the copies of `step` to host memory (pinned: asynchronous on CUDA)."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        if not pinned:
            return t.cpu()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    return StepLogprobs(step.rows, step.num_top, copy(step.sampled), copy(step.rank),
                        copy(step.top_ids), copy(step.top_logprobs))


def record(seq: Request, token_id: int, lp: TokenLogprobs | None) -> None:
    """Keep a read-back token's logprobs in its sequence until the next output."""
    if lp is None:
        return
    seq.pending_logprobs.append(TokenLogprobs(token_id, lp.logprob, lp.rank, lp.top))
    seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp.logprob


def take(seq: Request) -> list[TokenLogprobs] | None:
    """The logprobs recorded since the previous output; None when the request did not ask."""
    if seq.params.logprobs is None:
        return None
    pending, seq.pending_logprobs = seq.pending_logprobs, []
    return pending
