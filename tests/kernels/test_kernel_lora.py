"""LoRA shrink/expand kernels (per-token MBGMV decode, MBGMM prefill) against the float64
reference (the grouped MBGMV: test_kernel_lora_grouped.py).

CPU: Triton interpreter, fp32, SmolLM2 dims (hidden 576), few tokens. CUDA: fp16/bf16, SmolLM2
and Llama-7B dims, real batch sizes. Pools are random everywhere (never zeros) with the adapters'
pages shuffled; ranks 4..128 are mixed in every batch, with tokens that have no adapter.
"""

import sys

import pytest
import torch
from lora_helpers import (
    DECODE_BATCHES,
    DEVICE,
    DTYPES,
    MODELS,
    MODULE_SET_IDS,
    MODULE_SETS,
    ON_CUDA,
    TOL,
    build,
    check_delta,
    random_slots,
)

from slora_kernels import (
    add_lora,
    add_lora_ref,
    lora_expand,
    lora_shrink,
    lora_shrink_ref,
    make_lora_segments,
    rows_aligned,
)
from slora_kernels.lora_shrink import GEMM_MAX_SPLIT_ROWS

# The shrink buffer is torch.empty: entries past a token's rank are never written, and the expand
# loads them unmasked before the rank is known, then zeroes them (tl.where). The interpreter's
# numpy warns when that garbage happens to be NaN; the result is unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"h{m[0]}")
@pytest.mark.parametrize("modules", MODULE_SETS, ids=MODULE_SET_IDS)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_mbgmv_decode(dtype, model, modules, batch):
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(
        model, dtype, seed=batch * 10 + len(modules)
    )
    in_dim = dims[modules[0]][0]
    out_dims = [dims[m][1] for m in modules]
    slots = random_slots(gen, batch, modules[0])
    x = torch.randn(batch, in_dim, generator=gen).to(DEVICE, dtype)
    y = torch.randn(batch, sum(out_dims), generator=gen).to(DEVICE, dtype)
    slots_d = slots.to(DEVICE)
    ref = add_lora_ref(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, None, slots_d)
    y_out = add_lora(
        y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, lora_slots=slots_d,
        grouped=False,
    )  # fmt: skip
    check_delta(y_out, y, ref, slots, dtype)


@pytest.mark.parametrize(
    "shrink_cfg,expand_cfg",
    [
        ({"r_loop": True, "block_r": 16}, {"n_iters": 2, "block_r": 64}),
        ({"r_loop": True, "block_r": 32, "k_stages": 1}, {"n_iters": 4, "block_n": 64}),
    ],
    ids=["rloop16-n2", "rloop32-n4"],
)
def test_mbgmv_other_launch_configs(shrink_cfg, expand_cfg, monkeypatch):
    """The launch variants a benchmark sweep may pick compute the same function."""
    shrink_mod = sys.modules["slora_kernels.lora_shrink"]
    expand_mod = sys.modules["slora_kernels.lora_expand"]
    monkeypatch.setattr(shrink_mod, "GEMV_CONFIG", {**shrink_mod.GEMV_CONFIG, **shrink_cfg})
    monkeypatch.setattr(expand_mod, "GEMV_CONFIG", {**expand_mod.GEMV_CONFIG, **expand_cfg})
    dtype, model, modules = DTYPES[0], MODELS[-1], (0, 1, 2)
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(model, dtype, seed=21)
    out_dims = [dims[m][1] for m in modules]
    batch = 37 if ON_CUDA else 6
    slots = random_slots(gen, batch, 0)
    x = torch.randn(batch, dims[0][0], generator=gen).to(DEVICE, dtype)
    y = torch.randn(batch, sum(out_dims), generator=gen).to(DEVICE, dtype)
    slots_d = slots.to(DEVICE)
    ref = add_lora_ref(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, None, slots_d)
    y_out = add_lora(
        y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, lora_slots=slots_d,
        grouped=False,
    )  # fmt: skip
    check_delta(y_out, y, ref, slots, dtype)


def prefill_lengths():
    if ON_CUDA:
        return [300, 1, 77, 512, 64, 129, 16, 200]
    return [5, 1, 17, 3, 8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"h{m[0]}")
@pytest.mark.parametrize(
    "modules,sort,split_k",
    [((0, 1, 2), True, None), ((0, 1, 2), False, 2), ((6,), True, 3), ((3,), False, None)],
    ids=["qkv-sorted", "qkv-runs-split2", "down-sorted-split3", "o-runs"],
)
def test_mbgmm_prefill(dtype, model, modules, sort, split_k):
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(model, dtype, seed=7 + len(modules))
    in_dim = dims[modules[0]][0]
    out_dims = [dims[m][1] for m in modules]
    lens = prefill_lengths()
    seq_slots = [3, -1, 1, 3, 0, 6, 2, 9][: len(lens)]  # slot 3 twice, one base-model sequence
    slots = torch.cat([torch.full((n,), s, dtype=torch.int32) for n, s in zip(lens, seq_slots)])
    T = int(slots.shape[0])
    x = torch.randn(T, in_dim, generator=gen).to(DEVICE, dtype)
    y = torch.randn(T, sum(out_dims), generator=gen).to(DEVICE, dtype)
    seg = make_lora_segments(slots, sort=sort, device=DEVICE)
    ref = add_lora_ref(
        y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, None, slots.to(DEVICE)
    )
    y_out = add_lora(
        y.clone(),
        x,
        flat,
        a_ptr,
        b_ptr,
        ranks,
        scales,
        modules,
        out_dims,
        segments=seg,
        split_k=split_k,
    )
    check_delta(y_out, y, ref, slots, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mbgmm_split_k_is_capped_by_the_tile_rows(dtype):
    """MBGMM holds split_k x BLOCK_M partial rows in shared memory: a split that would not fit
    (split 16 at BLOCK_M 64 needed 276 KiB on an H200) is reduced, and the result stays exact."""
    model = MODELS[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(model, dtype, seed=5)
    modules = (0, 1, 2)
    in_dim, out_dims = dims[0][0], [dims[m][1] for m in modules]
    slots = torch.tensor([3] * 40 + [1] * 3, dtype=torch.int32)  # a 40-token segment: BLOCK_M 64
    x = torch.randn(len(slots), in_dim, generator=gen).to(DEVICE, dtype)
    y = torch.randn(len(slots), sum(out_dims), generator=gen).to(DEVICE, dtype)
    seg = make_lora_segments(slots, device=DEVICE)
    v = lora_shrink(x, flat, a_ptr, ranks, modules, segments=seg, split_k=32)
    assert v.shape[1] * 64 <= GEMM_MAX_SPLIT_ROWS
    ref = add_lora_ref(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, None,
                       slots.to(DEVICE))
    y_out = add_lora(y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims,
                     segments=seg, split_k=32)
    check_delta(y_out, y, ref, slots, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_buffer_and_column_offsets(dtype):
    """The split partials sum to x @ A^T on every entry below the rank; expand honours y_offsets."""
    model = MODELS[-1]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(model, dtype, seed=3)
    modules = (1, 2)
    in_dim = dims[1][0]
    slots = random_slots(gen, 6, 1)
    slots_d = slots.to(DEVICE)
    x = torch.randn(6, in_dim, generator=gen).to(DEVICE, dtype)
    v = lora_shrink(x, flat, a_ptr, ranks, modules, lora_slots=slots_d, split_k=3)
    assert v.shape[1] == 3
    v_ref = lora_shrink_ref(x, flat, a_ptr, ranks, modules, slots_d)
    v_sum = v.sum(1).double()
    for i, m in enumerate(modules):
        for t in range(6):
            s = int(slots[t])
            if s < 0:
                continue
            r = int(ranks[s, m])
            got, want = v_sum[i, t, :r], v_ref[i, t, :r]
            if r:
                assert ((got - want).norm() / want.norm()).item() < TOL[dtype]
    # v and k written into columns [kv_out*2 + 8, ...) of a wider y
    out_dims = [dims[m][1] for m in modules]
    offs = [2 * out_dims[0] + 8, 8]
    y = torch.randn(6, 3 * out_dims[0] + 8, generator=gen).to(DEVICE, dtype)
    ref = add_lora_ref(y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, offs, slots_d)
    y_out = lora_expand(
        y.clone(), v, flat, b_ptr, ranks, scales, modules, out_dims, offs, lora_slots=slots_d
    )
    check_delta(y_out, y, ref, slots, dtype)
    untouched = torch.ones(y.shape[1], dtype=torch.bool)
    for o, d in zip(offs, out_dims):
        untouched[o : o + d] = False
    assert torch.equal(y_out[:, untouched.to(DEVICE)], y[:, untouched.to(DEVICE)])


@pytest.mark.parametrize("mode", ["gemv", "gemm"])
def test_unaligned_rows(mode):
    """Rows at odd element offsets: the launcher must detect it and still be right."""
    dtype = DTYPES[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(MODELS[0], dtype, seed=11, row_pad=1)
    assert not rows_aligned(flat, a_ptr) and not rows_aligned(flat, b_ptr)
    modules = (0,)
    slots = random_slots(gen, 5, 0)
    x = torch.randn(5, dims[0][0], generator=gen).to(DEVICE, dtype)
    y = torch.randn(5, dims[0][1], generator=gen).to(DEVICE, dtype)
    kw = (
        {"lora_slots": slots.to(DEVICE)}
        if mode == "gemv"
        else {"segments": make_lora_segments(slots, device=DEVICE)}
    )
    ref = add_lora_ref(
        y, x, flat, a_ptr, b_ptr, ranks, scales, modules, [dims[0][1]], None, slots.to(DEVICE)
    )
    y_out = add_lora(y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, modules, [dims[0][1]], **kw)
    check_delta(y_out, y, ref, slots, dtype)


def test_all_tokens_without_adapter_is_a_no_op():
    dtype = DTYPES[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(MODELS[0], dtype, seed=5)
    slots = torch.full((4,), -1, dtype=torch.int32)
    x = torch.randn(4, dims[0][0], generator=gen).to(DEVICE, dtype)
    y = torch.randn(4, dims[0][1], generator=gen).to(DEVICE, dtype)
    for kw in (
        {"lora_slots": slots.to(DEVICE)},
        {"segments": make_lora_segments(slots, device=DEVICE)},
    ):
        y_out = add_lora(y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, (0,), [dims[0][1]], **kw)
        assert torch.equal(y_out, y)


def test_make_lora_segments():
    slots = torch.tensor([2, 2, -1, 0, 2, 2, 2, -1, -1, 0], dtype=torch.int32)
    seg = make_lora_segments(slots, sort=True)
    assert seg.token_idx.tolist() == [3, 9, 0, 1, 4, 5, 6]
    assert seg.seg_start.tolist() == [0, 2, 7]
    assert seg.seg_slot.tolist() == [0, 2]
    assert seg.max_seg_len == 5 and seg.num_tokens == 10
    runs = make_lora_segments(slots, sort=False)
    assert runs.token_idx is None
    assert runs.seg_start.tolist() == [0, 2, 3, 4, 7, 9, 10]
    assert runs.seg_slot.tolist() == [2, -1, 0, 2, -1, 0]
    assert runs.max_seg_len == 3
    empty = make_lora_segments([-1, -1])
    assert empty.num_segments == 0 and empty.max_seg_len == 0


def test_rows_aligned_follows_table_updates():
    flat = torch.randn(4096)
    ptr = torch.zeros(2, 7, 8, dtype=torch.int64)
    ptr[0, 0, :4] = torch.tensor([0, 64, 128, 1024])
    assert rows_aligned(flat, ptr)
    ptr[1, 3, 0] = 13  # in-place write by the adapter manager
    assert not rows_aligned(flat, ptr)
    ptr[1, 3, 0] = 16
    assert rows_aligned(flat, ptr)


def test_launcher_errors():
    dtype = DTYPES[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(MODELS[0], dtype, seed=1)
    x = torch.randn(3, dims[0][0], generator=gen).to(DEVICE, dtype)
    slots = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    seg = make_lora_segments(slots.cpu(), device=DEVICE)
    with pytest.raises(ValueError, match="exactly one"):
        lora_shrink(x, flat, a_ptr, ranks, (0,))
    with pytest.raises(ValueError, match="exactly one"):
        lora_shrink(x, flat, a_ptr, ranks, (0,), lora_slots=slots, segments=seg)
    with pytest.raises(ValueError, match="lora_slots must be int32"):
        lora_shrink(x, flat, a_ptr, ranks, (0,), lora_slots=slots.long())
    with pytest.raises(TypeError, match="must match the pool dtype"):
        other = torch.float16 if dtype != torch.float16 else torch.float32
        lora_shrink(x.to(other), flat, a_ptr, ranks, (0,), lora_slots=slots)
    with pytest.raises(ValueError, match="a_ptr must be int64"):
        lora_shrink(x, flat, a_ptr.int(), ranks, (0,), lora_slots=slots)
    with pytest.raises(ValueError, match="ranks must be int32"):
        lora_shrink(x, flat, a_ptr, ranks.long(), (0,), lora_slots=slots)
    with pytest.raises(ValueError, match="1 to 3 modules"):
        lora_shrink(x, flat, a_ptr, ranks, (0, 1, 2, 3), lora_slots=slots)
    with pytest.raises(ValueError, match="0..6"):
        lora_shrink(x, flat, a_ptr, ranks, (7,), lora_slots=slots)
    with pytest.raises(ValueError, match="flat must be the 1-D"):
        lora_shrink(x, flat.view(2, -1), a_ptr, ranks, (0,), lora_slots=slots)
    with pytest.raises(ValueError, match="serves decode batches"):
        add_lora(x, x, flat, a_ptr, b_ptr, ranks, scales, (0,), [dims[0][1]], segments=seg,
                 grouped=True)  # fmt: skip
    with pytest.raises(ValueError, match="segments were built for"):
        lora_shrink(x[:2], flat, a_ptr, ranks, (0,), segments=seg)
    v = lora_shrink(x, flat, a_ptr, ranks, (0,), lora_slots=slots, split_k=1)
    y = torch.randn(3, dims[0][1], generator=gen).to(DEVICE, dtype)
    with pytest.raises(ValueError, match="v must be the contiguous fp32 buffer"):
        lora_expand(y, v.half(), flat, b_ptr, ranks, scales, (0,), [dims[0][1]], lora_slots=slots)
    with pytest.raises(ValueError, match="exceed"):
        lora_expand(y, v, flat, b_ptr, ranks, scales, (0,), [dims[0][1] + 1], lora_slots=slots)
    with pytest.raises(ValueError, match="scales must be fp32"):
        lora_expand(y, v, flat, b_ptr, ranks, scales.double(), (0,), [dims[0][1]], lora_slots=slots)
