"""Grouped MBGMV (decode LoRA, each adapter read once per chunk of its tokens) against the float64
reference, and its chunk plan against a Python one.

Same pools and checks as test_kernel_lora.py (lora_helpers): ranks 4..128 mixed in one launch,
tokens without adapter, pages scattered, hidden 576 (not a power of two); several tokens on one
adapter, including more than a chunk of them.
"""

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
    build,
    check_delta,
    random_slots,
)

import slora_kernels.lora_grouped as grouped
from slora_kernels import add_lora_grouped, add_lora_ref, lora_chunks


def run_case(dtype, model, modules, slots, seed, y_offsets=None, y_cols=None):
    """Grouped kernel vs the reference on random x, y; returns (y_out, y_in)."""
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(model, dtype, seed=seed)
    in_dim = dims[modules[0]][0]
    out_dims = [dims[m][1] for m in modules]
    T = int(slots.shape[0])
    x = torch.randn(T, in_dim, generator=gen).to(DEVICE, dtype)
    y = torch.randn(T, y_cols or sum(out_dims), generator=gen).to(DEVICE, dtype)
    slots_d = slots.to(DEVICE)
    ref = add_lora_ref(
        y, x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, y_offsets, slots_d
    )
    y_out = add_lora_grouped(
        y.clone(), x, flat, a_ptr, b_ptr, ranks, scales, modules, out_dims, y_offsets,
        lora_slots=slots_d,
    )  # fmt: skip
    check_delta(y_out, y, ref, slots, dtype)
    return y_out, y


def shared_slots(gen, n, module):
    """Random slots where one adapter holds most tokens (more than one chunk of BLOCK_M)."""
    slots = random_slots(gen, n, module)
    many = torch.rand(n, generator=gen) < 0.6
    many[0] = False
    slots[many] = slots[0]
    return slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"h{m[0]}")
@pytest.mark.parametrize("modules", MODULE_SETS, ids=MODULE_SET_IDS)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_grouped_decode(dtype, model, modules, batch):
    gen = torch.Generator().manual_seed(batch)
    run_case(dtype, model, modules, random_slots(gen, batch, modules[0]), seed=batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [200, 37] if ON_CUDA else [40])
def test_grouped_adapter_shared_by_many_tokens(dtype, batch):
    """More tokens on one adapter than a program takes (chunks of BLOCK_M)."""
    gen = torch.Generator().manual_seed(3)
    slots = shared_slots(gen, batch, 0)
    assert int((slots == slots[0]).sum()) > grouped.GROUPED_CONFIG["block_m"]
    run_case(dtype, MODELS[-1], (0, 1, 2), slots, seed=4)


@pytest.mark.parametrize(
    "change",
    [
        {"n_split": 3},
        {"block_m": 32, "block_r": 32, "tile_elems": 2048, "k_stages": 1, "n_stages": 1,
         "warps": 2},
        {"n_split": 2, "block_r": 64, "max_block_k": 32, "max_block_n": 32},
        {"wide_above_rows": 0, "wide_block_r": 64},
        {"few_tokens": 0},  # every shrink on tensor cores
        {"few_tokens": 1, "few_tile_elems": 1024, "few_max_modules": 3},  # q,k,v on CUDA cores
    ],
    ids=["nsplit3", "m32-r32-small-tiles", "nsplit2-r64-k32-n32", "wide-r64", "few0",
         "few1-qkv-small-tiles"],
)
def test_grouped_other_launch_configs(change, monkeypatch):
    """The launch variants a benchmark sweep may pick compute the same function."""
    monkeypatch.setattr(grouped, "GROUPED_CONFIG", {**grouped.GROUPED_CONFIG, **change})
    gen = torch.Generator().manual_seed(8)
    slots = shared_slots(gen, 45 if ON_CUDA else 21, 0)
    run_case(DTYPES[0], MODELS[-1], (0, 1, 2), slots, seed=9)


def chunks_ref(slots, block_m):
    """Row t: the tokens of the chunk of its adapter that starts at t, or all -1."""
    out = torch.full((len(slots), block_m), -1, dtype=torch.int32)
    for s in set(slots) - {-1}:
        toks = [t for t, v in enumerate(slots) if v == s]
        for i in range(0, len(toks), block_m):
            part = toks[i : i + block_m]
            out[part[0], : len(part)] = torch.tensor(part, dtype=torch.int32)
    return out


@pytest.mark.parametrize("batch", [1, 37, 256, 300])
def test_chunk_plan(batch):
    """Chunks list each adapter's tokens in order, at most block_m each, every token once;
    also past the 256-token scan pad."""
    gen = torch.Generator().manual_seed(batch)
    slots = shared_slots(gen, batch, 0)
    got = lora_chunks(slots.to(DEVICE)).cpu()
    assert torch.equal(got, chunks_ref(slots.tolist(), grouped.GROUPED_CONFIG["block_m"]))


def test_grouped_column_offsets_and_determinism(monkeypatch):
    """Modules write their own column ranges of a wider y, nothing else. With every rank in
    one tile (no atomic additions) two runs give the same bits."""
    monkeypatch.setattr(grouped, "GROUPED_CONFIG",
                        {**grouped.GROUPED_CONFIG, "block_r": 128, "wide_block_r": 128})
    dtype, model, modules = DTYPES[0], MODELS[0], (2, 1)
    gen = torch.Generator().manual_seed(5)
    slots = shared_slots(gen, 24, 1)
    kv = model[1]
    offs = [2 * kv + 8, 8]
    y_out, y = run_case(dtype, model, modules, slots, seed=6, y_offsets=offs, y_cols=3 * kv + 8)
    untouched = torch.ones(y.shape[1], dtype=torch.bool)
    for o in offs:
        untouched[o : o + kv] = False
    assert torch.equal(y_out[:, untouched.to(DEVICE)], y[:, untouched.to(DEVICE)])
    again, _ = run_case(dtype, model, modules, slots, seed=6, y_offsets=offs, y_cols=3 * kv + 8)
    assert torch.equal(again, y_out), "the result depends on scheduling"


def test_grouped_unaligned_rows_and_no_adapter():
    dtype = DTYPES[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(MODELS[0], dtype, seed=11, row_pad=1)
    slots = random_slots(gen, 7, 0)
    x = torch.randn(7, dims[0][0], generator=gen).to(DEVICE, dtype)
    y = torch.randn(7, dims[0][1], generator=gen).to(DEVICE, dtype)
    args = (flat, a_ptr, b_ptr, ranks, scales, (0,), [dims[0][1]])
    ref = add_lora_ref(y, x, *args, None, slots.to(DEVICE))
    check_delta(add_lora_grouped(y.clone(), x, *args, lora_slots=slots.to(DEVICE)), y, ref,
                slots, dtype)  # fmt: skip
    none = torch.full((7,), -1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(add_lora_grouped(y.clone(), x, *args, lora_slots=none), y)


def test_grouped_launcher_errors(monkeypatch):
    dtype = DTYPES[0]
    gen, dims, (flat, a_ptr, b_ptr, ranks, scales) = build(MODELS[0], dtype, seed=1)
    x = torch.randn(3, dims[0][0], generator=gen).to(DEVICE, dtype)
    y = torch.randn(3, dims[0][1], generator=gen).to(DEVICE, dtype)
    slots = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = [dims[0][1]]

    def call(**kw):
        a = {"y": y, "x": x, "flat": flat, "a_ptr": a_ptr, "b_ptr": b_ptr, "ranks": ranks,
             "scales": scales, "modules": (0,), "out_dims": out, "lora_slots": slots}  # fmt: skip
        return add_lora_grouped(**{**a, **kw})

    with pytest.raises(ValueError, match="lora_slots must be int32"):
        call(lora_slots=slots.long())
    with pytest.raises(ValueError, match=r"lora_slots must be int32 \[3\]"):
        call(lora_slots=slots[:2])
    with pytest.raises(ValueError, match="chunks must be lora_chunks"):
        call(chunks=lora_chunks(slots)[:, :8])
    with pytest.raises(ValueError, match="same shape and strides"):
        call(b_ptr=b_ptr[:, :, :8])
    with pytest.raises(ValueError, match="y has 2 rows"):
        call(y=y[:2])
    with pytest.raises(ValueError, match="exceed"):
        call(out_dims=[dims[0][1] + 1])
    with pytest.raises(ValueError, match="scales must be fp32"):
        call(scales=scales.double())
    with pytest.raises(TypeError, match="must match the pool dtype"):
        call(x=x.to(torch.float16 if dtype != torch.float16 else torch.float32))
    with pytest.raises(ValueError, match="1 to 3 modules"):
        call(modules=(0, 1, 2, 3), out_dims=out * 4)
    monkeypatch.setattr(grouped, "GROUPED_CONFIG", {**grouped.GROUPED_CONFIG, "few_tokens": 3})
    with pytest.raises(ValueError, match="few_tokens must be 0..2"):
        call()
