"""Paged attention over a work list (the mixed-step CUDA graphs' attention) against the float64
reference: prefill chunks with and without earlier context and decode tokens in one launch,
the work list padded to a graph's capacity, padding rows left alone."""

import random

import pytest
import torch
from test_kernel_attention import (
    BLOCK,
    DEVICE,
    DTYPES,
    HEAD_IDS,
    HEADS,
    ON_CUDA,
    TOL,
    make_pool,
    rel_err,
)

from slora_kernels import paged_attention_ref, paged_attention_varlen, varlen_capacity, varlen_work

# (context length after the step, new tokens)
MIXED = ([(1000, 700), (1, 1), (2100, 300), (77, 1), (513, 17), (300, 1), (640, 640)] if ON_CUDA
         else [(37, 37), (5, 1), (70, 20), (16, 1), (33, 33), (20, 1)])
PADDING_ROWS = 5  # rows past the step's tokens (a graph's padding): no item, left unwritten


def test_varlen_work_items():
    """Items tile each sequence's new tokens; positions count the earlier context."""
    work = varlen_work([0, 5, 6, 40], [5, 9, 34], block_m=16, capacity=8)
    assert work.dtype == torch.int32 and work.shape == (8, 4)
    assert work[:5].tolist() == [[0, 0, 5, 0], [1, 5, 1, 8], [2, 6, 16, 0], [2, 22, 16, 16],
                                 [2, 38, 2, 32]]
    assert (work[5:] == -1).all()
    with pytest.raises(ValueError, match="capacity"):
        varlen_work([0, 5, 6, 40], [5, 9, 34], block_m=16, capacity=4)


@pytest.mark.parametrize("block_m", [16, 64])
def test_varlen_capacity_covers_every_step(block_m):
    """No step of at most T tokens over at most S sequences needs more items than the
    capacity (random splits of T tokens into sequences)."""
    rng = random.Random(block_m)
    for _ in range(300):
        T, S = rng.randint(1, 600), rng.randint(1, 40)
        n = rng.randint(1, min(S, T))
        cuts = sorted(rng.sample(range(1, T), n - 1)) if n > 1 else []
        qsl = [0, *cuts, T]
        work = varlen_work(qsl, [b - a for a, b in zip(qsl, qsl[1:])], block_m)
        assert work.shape[0] <= varlen_capacity(T, S, block_m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_m", [16, 64])
def test_varlen_mixed_batch(dtype, h, hkv, d, block_m):
    gen = torch.Generator().manual_seed(h * 100 + hkv * 10 + d + block_m)
    ctx = [c for c, _ in MIXED]
    qlen = [n for _, n in MIXED]
    kv, bt, ctx_t = make_pool(ctx, hkv, d, dtype, gen)
    qsl = [0] + torch.tensor(qlen).cumsum(0).tolist()
    T = qsl[-1]
    q = torch.randn(T + PADDING_ROWS, h, d, generator=gen).to(DEVICE, dtype)
    capacity = varlen_capacity(T + PADDING_ROWS, len(ctx) + 3, block_m)
    work = varlen_work(qsl, ctx, block_m, capacity).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_attention_varlen(q, kv, work, bt, block_m=block_m, out=out)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=DEVICE)
    ref = paged_attention_ref(q[:T], kv, qsl_t, ctx_t, bt)
    assert rel_err(out[:T], ref) < TOL[dtype]
    assert torch.isnan(out[T:]).all()  # padding rows: no work item wrote them


def test_varlen_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    kv, bt, _ = make_pool([20], 2, 64, torch.float32, gen)
    q = torch.randn(20, 4, 64, generator=gen).to(DEVICE)
    work = varlen_work([0, 20], [20], 16).to(DEVICE)
    with pytest.raises(ValueError, match="block_m"):
        paged_attention_varlen(q, kv, work, bt, block_m=24)
    with pytest.raises(ValueError, match="work"):
        paged_attention_varlen(q, kv, work.long(), bt, block_m=16)
    with pytest.raises(ValueError, match="q must be"):
        paged_attention_varlen(q[:, :3], kv, work, bt, block_m=16)
    assert BLOCK == kv.shape[2]
