"""Token sampling: greedy / temperature / top-k / top-p, with a per-request seed.

Determinism: each sampled row draws exactly one uniform number from its own request's
`torch.Generator` (on CPU) per step and picks the token by inverse CDF over the filtered,
renormalized distribution. So a seeded request produces the same tokens whatever else is in
the batch (and on CPU or CUDA alike, up to logits differences).
Order of filters (as in HF / vLLM): temperature, then top-k, then top-p.
top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class _Params(Protocol):
    temperature: float
    top_k: int
    top_p: float


def make_generator(seed: int | None, fallback: torch.Generator | None = None) -> torch.Generator:
    """A CPU generator for one request: seeded, or seeded from `fallback` (engine-wide RNG)."""
    g = torch.Generator(device="cpu")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=fallback).item())
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def is_greedy(p: _Params) -> bool:
    return p.temperature == 0 or p.top_k == 1


class Sampler:
    """Batched sampler over fp32 logits [S, V]."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[_Params],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """One token id per row. generators[i] may be None for greedy rows."""
        return self.sample_tensor(logits, params, generators).tolist()

    def sample_tensor(
        self,
        logits: torch.Tensor,
        params: Sequence[_Params],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """int64 [S] token ids on the logits' device, without waiting for the device: the
        engine reads them back a step later (async scheduling)."""
        S = logits.shape[0]
        if len(params) != S or len(generators) != S:
            raise ValueError(
                f"{S} logits rows but {len(params)} params / {len(generators)} generators"
            )
        out = logits.argmax(dim=-1)
        s_rows = [i for i in range(S) if not is_greedy(params[i])]
        if not s_rows:
            return out
        # one uniform draw per sampled row from its own generator (batch-independent)
        u = torch.empty(len(s_rows), dtype=torch.float64)
        for j, i in enumerate(s_rows):
            g = generators[i]
            if g is None:
                raise ValueError(f"row {i} samples (temperature > 0) but has no generator")
            u[j] = torch.rand((), generator=g, dtype=torch.float64)
        rows = torch.tensor(s_rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        out[rows] = sample_rows(
            logits[rows].float(),
            [float(params[i].temperature) for i in s_rows],
            [int(params[i].top_k) for i in s_rows],
            [float(params[i].top_p) for i in s_rows],
            u,
        )
        return out


def filtered_probs(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature / top-k / top-p, renormalized.

    Returns (probs [n, C], candidate_ids [n, C] or None when C is the whole vocabulary in order).
    """
    n, V = logits.shape
    dev = logits.device
    temp = torch.tensor(temperatures, dtype=torch.float32, device=dev)[:, None]
    x = logits / temp
    ks = [k if 0 < k < V else 0 for k in top_ks]
    any_k = any(k > 0 for k in ks)
    any_p = any(p < 1.0 for p in top_ps)
    cand: torch.Tensor | None = None
    if any_k and all(k > 0 for k in ks):
        # restrict to the max_k best candidates (sorted descending)
        kmax = max(ks)
        x, cand = torch.topk(x, kmax, dim=-1, sorted=True)
        kt = torch.tensor(ks, device=dev)[:, None]
        x = x.masked_fill(torch.arange(kmax, device=dev)[None, :] >= kt, float("-inf"))
    elif any_k or any_p:
        x, cand = torch.sort(x, dim=-1, descending=True)
        if any_k:
            kt = torch.tensor([k if k > 0 else V for k in ks], device=dev)[:, None]
            x = x.masked_fill(torch.arange(V, device=dev)[None, :] >= kt, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any_p:
        pt = torch.tensor(top_ps, dtype=torch.float32, device=dev)[:, None]
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely candidates
        probs = probs.masked_fill(before >= pt, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, cand


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
    u: torch.Tensor,
) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform u[i] in [0, 1) per row: int64 [n] token ids
    (on the logits' device; no host sync)."""
    probs, cand = filtered_probs(logits, temperatures, top_ks, top_ps)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (u.to(cdf.device, non_blocking=True) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # never land on a zero-probability candidate (u*total == cdf of a run of zeros)
    # (unconditionally: testing for it first would wait for the device)
    pz = probs.gather(1, idx) <= 0
    idx = torch.where(pz, probs.argmax(dim=-1, keepdim=True), idx)
    if cand is not None:
        idx = cand.gather(1, idx)
    return idx[:, 0]
