"""LoRA on the unified pool: the op against a dense reference, and the full forward against
HF + PEFT (random non-zero lora_B, mixed ranks and module subsets, rsLoRA)."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import (
    ScatteredPool,
    add_peft_adapters,
    install_adapter,
    peft_adapter_weights,
    peft_logits,
    rel_err,
    run_schedule,
)
from transformers import AutoModelForCausalLM

from slora_backend.model import (
    MODULE_ORDER,
    LoraTables,
    ModelSpec,
    load_model,
    plan_adapter_rows,
    torch_lora,
    write_adapter_rows,
)

TOL = 1e-4


def _spec(**kw) -> ModelSpec:
    base = dict(
        num_layers=2,
        hidden_size=96,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=160,
        vocab_size=64,
    )
    base.update(kw)
    return ModelSpec(**base)


def random_weights(spec: ModelSpec, mods, r: int) -> dict:
    """{(layer, module): (A [r, in], B [out, r])}, random."""
    dims = {m: spec.module_dims(m) for m in mods}
    return {(li, m): (torch.randn(r, dims[m][0]), torch.randn(dims[m][1], r))
            for li in range(spec.num_layers) for m in mods}


# ---- row planning ---------------------------------------------------------------------------


def test_plan_rows_never_straddle_pages():
    spec = _spec()
    pe = spec.page_elems(4)  # 256 elements per page
    for modules in (
        MODULE_ORDER,
        ("q_proj", "v_proj"),
        ("down_proj",),
        ("k_proj", "o_proj", "up_proj"),
    ):
        for r in (1, 4, 7, 16):
            plan = plan_adapter_rows(spec, modules, r, pe)
            spans = []
            for m, (a, b) in plan.offsets.items():
                d_in, d_out = spec.module_dims(m)
                assert len(a) == len(b) == r
                spans += [(o, o + d_in) for o in a] + [(o, o + d_out) for o in b]
            spans.sort()
            for (_, e0), (s1, _) in zip(spans, spans[1:]):
                assert e0 <= s1  # no overlap
            for s, e in spans:
                assert s // pe == (e - 1) // pe  # inside one page
            assert plan.num_pages == spans[-1][1] // pe + (spans[-1][1] % pe > 0)
            assert list(plan.offsets) == [m for m in MODULE_ORDER if m in modules]


def test_plan_row_too_long():
    spec = _spec()
    with pytest.raises(ValueError, match="does not fit"):
        plan_adapter_rows(spec, ["down_proj"], 4, 128)


def test_write_rows_and_pointers():
    spec = _spec()
    L, P, pe = spec.num_layers, 40, spec.page_elems(4)
    storage = torch.zeros(L, P, pe)
    mods = ("q_proj", "down_proj")
    r = 5
    w = random_weights(spec, mods, r)
    plan = plan_adapter_rows(spec, mods, r, pe)
    pages = random.Random(0).sample(range(P), plan.num_pages)
    ptrs = write_adapter_rows(storage, pages, w, spec, mods, r, plan)
    for li in range(L):
        flat = storage[li].view(-1)
        for m in mods:
            d_in, d_out = spec.module_dims(m)
            A, B = w[(li, m)]
            for j in range(r):
                assert torch.equal(flat[ptrs[m][0][j] : ptrs[m][0][j] + d_in], A[j])
                assert torch.equal(flat[ptrs[m][1][j] : ptrs[m][1][j] + d_out], B[:, j])


# ---- the op against a dense reference ----------------------------------------------------------


def _random_tables(spec, storage, adapters, seed, shuffle=True):
    """Install adapters (rank, modules, scale) with random weights in (scattered) pages."""
    L, P, pe = storage.shape
    rng = random.Random(seed)
    free = list(range(P))
    if shuffle:
        rng.shuffle(free)
    tables = LoraTables.create(len(adapters) + 2, 64)
    dense = {}
    for slot, (r, mods, scale) in enumerate(adapters):
        w = random_weights(spec, mods, r)
        plan = plan_adapter_rows(spec, mods, r, pe)
        pages, free = free[: plan.num_pages], free[plan.num_pages :]
        ptrs = write_adapter_rows(storage, pages, w, spec, mods, r, plan)
        tables.set_slot(slot, r, scale, ptrs)
        dense[slot] = (w, scale)
    return tables, dense


@pytest.mark.parametrize("consecutive_pages", [False, True])
def test_lora_op_matches_dense(consecutive_pages):
    """Mixed ranks and module subsets, tokens without adapter, scattered tokens; rows used in
    place (consecutive pages, row lengths dividing the page) or gathered (scattered pages)."""
    torch.manual_seed(0)
    if consecutive_pages:  # every row length (64, 32, 128) divides the 512-element page
        spec = _spec(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)
    else:
        spec = _spec()
    L, P = spec.num_layers, 400
    storage = torch.randn(L, P, spec.page_elems(8))
    adapters = [
        (4, ("q_proj", "v_proj"), 0.5),
        (16, MODULE_ORDER, 2.0),
        (7, ("k_proj", "o_proj", "gate_proj", "down_proj"), 1.0 / 7**0.5),
        (64, ("up_proj", "q_proj"), 0.25),
        (8, ("down_proj",), 1.5),
    ]
    tables, dense = _random_tables(spec, storage, adapters, seed=1, shuffle=not consecutive_pages)
    # tokens: a contiguous span of slot 1 (prefill-like), then interleaved decode-like tokens
    slots = [1] * 9 + [0, 3, -1, 2, 0, 4, 3, 3, -1, 1, 2, 4]
    T = len(slots)
    lora_slots = torch.tensor(slots, dtype=torch.int32)
    info = torch_lora.prepare_lora(lora_slots, tables, spec)
    n_views = sum(u.a_view is not None for mb in info.modules.values() for u in mb.uses.values())
    n_gathered = sum(mb.a_rows is not None for mb in info.modules.values())
    if consecutive_pages:
        assert n_views >= 8  # most modules are read in place
    else:
        assert n_gathered >= 1  # the gather path runs
    for li in range(L):
        flat = storage[li].view(-1)
        for mi, m in enumerate(MODULE_ORDER):
            d_in, d_out = spec.module_dims(m)
            x = torch.randn(T, d_in)
            y0 = torch.randn(T, d_out)
            y = y0.clone()
            torch_lora.lora_shrink_expand(x, (y,), flat, info, (mi,))
            ref = y0.clone()
            for t, s in enumerate(slots):
                if s < 0 or m not in adapters[s][1]:
                    continue
                A, B = dense[s][0][(li, m)]
                ref[t] += dense[s][1] * (x[t] @ A.t()) @ B.t()
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_lora_op_fused_outputs_are_views():
    """q/k/v deltas land in column slices of one fused output buffer."""
    spec = _spec()
    storage = torch.randn(spec.num_layers, 200, spec.page_elems(4))
    adapters = [(8, ("q_proj", "k_proj", "v_proj"), 1.0), (4, ("v_proj",), 3.0)]
    tables, dense = _random_tables(spec, storage, adapters, seed=2)
    slots = [0, 1, 0, -1, 1]
    info = torch_lora.prepare_lora(torch.tensor(slots, dtype=torch.int32), tables, spec)
    x = torch.randn(5, spec.hidden_size)
    qs, kvs = spec.q_size, spec.kv_size
    y = torch.zeros(5, qs + 2 * kvs)
    torch_lora.lora_shrink_expand(
        x, (y[:, :qs], y[:, qs : qs + kvs], y[:, qs + kvs :]), storage[0].view(-1), info, (0, 1, 2)
    )
    ref = torch.zeros_like(y)
    cols = {
        "q_proj": slice(0, qs),
        "k_proj": slice(qs, qs + kvs),
        "v_proj": slice(qs + kvs, qs + 2 * kvs),
    }
    for t, s in enumerate(slots):
        if s < 0:
            continue
        for m in adapters[s][1]:
            A, B = dense[s][0][(0, m)]
            ref[t, cols[m]] += dense[s][1] * (x[t] @ A.t()) @ B.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_single_adapter_span_adds_in_place():
    """A prefill chunk of one adapter (contiguous rows, other tokens without adapter)."""
    spec = _spec()
    storage = torch.randn(spec.num_layers, 200, spec.page_elems(8))
    tables, dense = _random_tables(spec, storage, [(16, MODULE_ORDER, 0.7)], seed=3)
    slots = [-1, -1, 0, 0, 0, 0, -1]
    info = torch_lora.prepare_lora(torch.tensor(slots, dtype=torch.int32), tables, spec)
    assert info.span == (2, 6)
    x = torch.randn(7, spec.intermediate_size)
    y0 = torch.randn(7, spec.hidden_size)
    y = y0.clone()
    torch_lora.lora_shrink_expand(x, (y,), storage[1].view(-1), info, (6,))
    A, B = dense[0][0][(1, "down_proj")]
    ref = y0.clone()
    ref[2:6] += 0.7 * (x[2:6] @ A.t()) @ B.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_no_lora_tokens_is_noop():
    spec = _spec()
    tables = LoraTables.create(4, 16)
    assert torch_lora.prepare_lora(torch.full((6,), -1, dtype=torch.int32), tables, spec) is None


# ---- full forward against HF + PEFT --------------------------------------------------------------

ADAPTERS = [
    dict(name="r4", r=4, alpha=8, modules=("q_proj", "v_proj")),
    dict(name="r8", r=8, alpha=16, modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    dict(name="r16", r=16, alpha=16, modules=MODULE_ORDER),
    dict(name="r32", r=32, alpha=32, modules=("gate_proj", "up_proj", "down_proj"), rslora=True),
    dict(name="r64", r=64, alpha=32, modules=("o_proj", "down_proj", "k_proj")),
    dict(name="r12rs", r=12, alpha=24, modules=("v_proj", "up_proj"), rslora=True),
]


@pytest.mark.parametrize("which", ["tiny_gqa_dir", "tiny_gqa3_dir"])
def test_forward_with_lora_matches_peft(which, request):
    path = request.getfixturevalue(which)
    spec, model = load_model(path, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = add_peft_adapters(hf, ADAPTERS, seed=3)
    block_size = 8
    pool = ScatteredPool(model, num_pages=400, block_size=block_size, seed=4)
    tables = LoraTables.create(8, 64)
    slot_of = {}
    for slot, a in enumerate(ADAPTERS):
        w, scale = peft_adapter_weights(peft_model, a["name"], spec, a["modules"])
        expect = a["alpha"] / (a["r"] ** 0.5 if a.get("rslora") else a["r"])
        assert abs(scale - expect) < 1e-6
        install_adapter(
            pool, tables, slot + 1, spec, w, a["modules"], a["r"], scale
        )  # slots 1..6 (0 unused)
        slot_of[a["name"]] = slot + 1
    rng = random.Random(5)
    names = [a["name"] for a in ADAPTERS] + [None, None, "r16"]
    seqs = [[rng.randrange(3, spec.vocab_size) for _ in range(rng.randrange(9, 30))] for _ in names]
    prompt_lens = [max(1, len(s) - rng.randrange(1, 8)) for s in seqs]
    starts = [rng.randrange(0, 6) for _ in seqs]
    lora_slots = [slot_of[n] if n else -1 for n in names]
    outs = run_schedule(
        model,
        pool,
        seqs,
        prompt_lens,
        starts,
        chunk=[rng.choice([3, 5, 16]) for _ in seqs],
        lora_slots=lora_slots,
        lora=tables,
    )
    for name, ids, got in zip(names, seqs, outs):
        ref = peft_logits(peft_model, name, ids)
        if name is not None:
            base = peft_logits(peft_model, None, ids)
            assert rel_err(base, ref) > 1e-2, f"adapter {name} changes nothing: test is vacuous"
        assert rel_err(got, ref) <= TOL, (name, rel_err(got, ref))


def test_smollm_lora_matches_peft(smollm, smollm_dir):
    """SmolLM2 (hidden 576: rows do not divide pages) with two adapters and the base model."""
    spec, model = smollm
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    adapters = [ADAPTERS[2], ADAPTERS[5]]
    peft_model = add_peft_adapters(hf, adapters, seed=6, b_std=0.1)
    pool = ScatteredPool(model, num_pages=200, block_size=16, seed=8)
    tables = LoraTables.create(4, 64)
    for slot, a in enumerate(adapters):
        w, scale = peft_adapter_weights(peft_model, a["name"], spec, a["modules"])
        install_adapter(pool, tables, slot, spec, w, a["modules"], a["r"], scale)
    rng = random.Random(9)
    seqs = [[rng.randrange(3, spec.vocab_size) for _ in range(n)] for n in (22, 18, 12)]
    outs = run_schedule(
        model,
        pool,
        seqs,
        [17, 18, 8],
        [0, 1, 2],
        chunk=[9, 18, 8],
        lora_slots=[0, 1, -1],
        lora=tables,
    )
    for name, ids, got in zip(["r16", "r12rs", None], seqs, outs):
        ref = peft_logits(peft_model, name, ids)
        if name is not None:
            assert rel_err(peft_logits(peft_model, None, ids), ref) > 1e-2
        assert rel_err(got, ref) <= TOL, (name, rel_err(got, ref))
