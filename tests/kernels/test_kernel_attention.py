"""Paged attention (prefill, decode) and the KV write against the float64 reference.

Pages of every sequence are scattered in the pool (shuffled page ids); outputs are poisoned with
NaN before each launch so that an unwritten element fails. GQA ratios 1, 3, 4; head_dim 64, 128.
"""

import pytest
import torch

from slora_kernels import (
    paged_attention_decode,
    paged_attention_prefill,
    paged_attention_ref,
    rope_kv_write,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float32]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BLOCK = 16

if ON_CUDA:
    HEADS = [(32, 32, 128), (32, 8, 128), (24, 8, 128), (32, 32, 64), (32, 8, 64), (9, 3, 64)]
    # (context length after the step, new tokens)
    PREFILL = [(1000, 1000), (1, 1), (2100, 300), (513, 17), (4096, 64), (77, 1), (640, 640)]
    DECODE = [1, 4096, 17, 1000, 2048, 16, 3000, 64, 1537, 4095, 256, 33, 1]
else:
    HEADS = [(2, 2, 64), (6, 2, 128), (4, 1, 64), (8, 2, 128)]
    PREFILL = [(37, 37), (5, 1), (70, 20), (16, 3), (33, 33)]
    DECODE = [37, 1, 70, 16, 64]
HEAD_IDS = [f"h{h}kv{k}d{d}" for h, k, d in HEADS]


def make_pool(ctx_lens, hkv, d, dtype, gen, extra_pages=5):
    """Random KV pool and block tables with every sequence's pages scattered (shuffled ids)."""
    blocks = [(c + BLOCK - 1) // BLOCK for c in ctx_lens]
    num_pages = sum(blocks) + extra_pages
    kv = torch.randn(num_pages, 2, BLOCK, hkv, d, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(num_pages, generator=gen)
    bt = torch.zeros(len(ctx_lens), max(blocks) + 1, dtype=torch.int32)  # padded with page 0
    i = 0
    for s, n in enumerate(blocks):
        bt[s, :n] = perm[i : i + n].to(torch.int32)
        i += n
    return kv, bt.to(DEVICE), torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d", HEADS, ids=HEAD_IDS)
def test_prefill_chunked_mixed_batch(dtype, h, hkv, d):
    """Full prefills, chunks with earlier context in the pool, and decode tokens in one batch."""
    gen = torch.Generator().manual_seed(h * 100 + hkv * 10 + d)
    ctx = [c for c, _ in PREFILL]
    qlen = [n for _, n in PREFILL]
    kv, bt, ctx_t = make_pool(ctx, hkv, d, dtype, gen)
    qsl = torch.tensor(
        [0] + torch.tensor(qlen).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE
    )
    q = torch.randn(sum(qlen), h, d, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    paged_attention_prefill(q, kv, qsl, ctx_t, bt, max_query_len=max(qlen), out=out)
    ref = paged_attention_ref(q, kv, qsl, ctx_t, bt)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_single_sequence_and_custom_scale(dtype):
    gen = torch.Generator().manual_seed(1)
    h, hkv, d = HEADS[1]
    n = 300 if ON_CUDA else 21
    kv, bt, ctx_t = make_pool([n], hkv, d, dtype, gen)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
    q = torch.randn(n, h, d, generator=gen).to(DEVICE, dtype)
    out = paged_attention_prefill(q, kv, qsl, ctx_t, bt, scale=0.3)  # max_query_len read from qsl
    assert rel_err(out, paged_attention_ref(q, kv, qsl, ctx_t, bt, scale=0.3)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("splits", [None, 3], ids=["auto", "split3"])
def test_decode(dtype, h, hkv, d, splits):
    gen = torch.Generator().manual_seed(h + hkv + d + (splits or 0))
    kv, bt, ctx_t = make_pool(DECODE, hkv, d, dtype, gen)
    S = len(DECODE)
    q = torch.randn(S, h, d, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    paged_attention_decode(
        q, kv, ctx_t, bt, max_context_len=max(DECODE), num_splits=splits, out=out
    )
    ref = paged_attention_ref(q, kv, torch.arange(S + 1, dtype=torch.int32), ctx_t, bt)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_one(dtype):
    gen = torch.Generator().manual_seed(2)
    h, hkv, d = HEADS[-1]
    c = 777 if ON_CUDA else 45
    kv, bt, ctx_t = make_pool([c], hkv, d, dtype, gen)
    q = torch.randn(1, h, d, generator=gen).to(DEVICE, dtype)
    out = paged_attention_decode(q, kv, ctx_t, bt)  # max_context_len read from context_lens
    ref = paged_attention_ref(q, kv, torch.arange(2, dtype=torch.int32), ctx_t, bt)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_then_prefill(dtype):
    """rope_kv_write puts new K/V in scattered slots (skipping -1); prefill then reads them.
    cos 1, sin 0: the keys go in unrotated, so the pool must hold exactly k and v."""
    gen = torch.Generator().manual_seed(3)
    h, hkv, d = HEADS[2]
    ctx = [40, 9] if not ON_CUDA else [700, 90]
    new = [12, 9] if not ON_CUDA else [200, 90]
    kv, bt, ctx_t = make_pool(ctx, hkv, d, dtype, gen)
    slots = []
    for s, (c, n) in enumerate(zip(ctx, new)):
        for pos in range(c - n, c):
            slots.append(int(bt[s, pos // BLOCK]) * BLOCK + pos % BLOCK)
    slots.insert(5, -1)  # a padding row
    T = len(slots)
    qkv = torch.randn(T, (h + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    slot_t = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    keep = slot_t >= 0
    want = kv.clone()
    kv_slots = slot_t[keep]
    want[kv_slots // BLOCK, 0, kv_slots % BLOCK] = qkv[keep, h * d:(h + hkv) * d].view(-1, hkv, d)
    want[kv_slots // BLOCK, 1, kv_slots % BLOCK] = qkv[keep, (h + hkv) * d:].view(-1, hkv, d)
    cos = torch.ones(T, d // 2, dtype=dtype, device=DEVICE)
    rope_kv_write(qkv, cos, torch.zeros_like(cos), kv, slot_t, h)
    assert torch.equal(kv, want)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(new), h, d, generator=gen).to(DEVICE, dtype)
    out = paged_attention_prefill(q, kv, qsl, ctx_t, bt, max_query_len=max(new))
    assert rel_err(out, paged_attention_ref(q, kv, qsl, ctx_t, bt)) < TOL[dtype]


def test_attention_launcher_errors():
    gen = torch.Generator().manual_seed(5)
    dtype = DTYPES[0]
    kv, bt, ctx_t = make_pool([20], 2, 64, dtype, gen)
    q = torch.randn(1, 4, 64, generator=gen).to(DEVICE, dtype)
    with pytest.raises(ValueError, match="kv_cache must be the pool view"):
        paged_attention_decode(q, kv.view(kv.shape[0], -1), ctx_t, bt)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention_decode(q[:, :3], kv, ctx_t, bt)
    with pytest.raises(TypeError, match="context_lens must be int32"):
        paged_attention_decode(q, kv, ctx_t.long(), bt)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_attention_decode(torch.cat([q, q]), kv, ctx_t, bt)
    with pytest.raises(TypeError, match="query_start_loc must be int32"):
        paged_attention_prefill(q, kv, torch.tensor([0, 1], device=DEVICE), ctx_t, bt)
