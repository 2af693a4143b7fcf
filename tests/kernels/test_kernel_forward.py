"""The model's triton backend (kernel_ops.KernelStep) end to end against HF transformers + PEFT:
chunked prefill, mixed prefill/decode steps and decode-only steps over a scattered, NaN-filled
pool, many adapters of mixed ranks and module subsets plus base-model tokens; and the decode
CUDA-graph buffers (model/cuda_graphs.py: padding, static metadata) run eagerly. On a machine
without CUDA the kernels run under the Triton interpreter (conftest.py)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import (  # noqa: E402
    ScatteredPool,
    add_peft_adapters,
    install_adapter,
    make_tiny_llama,
    peft_adapter_weights,
    peft_logits,
    rel_err,
    run_schedule,
)
from transformers import AutoModelForCausalLM  # noqa: E402

import slora_kernels.lora  # noqa: E402
from slora_backend.model import BatchInput, LoraTables, load_model  # noqa: E402
from slora_backend.model.cuda_graphs import (  # noqa: E402
    ALL_MODULES,
    ATTENTION_MODULES,
    DecodeGraphs,
    graph_batch_sizes,
    lora_variant,
)
from slora_backend.model.llama import TRITON_BACKEND  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # fp32 kernels against HF fp32
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [
    dict(name="r4", r=4, alpha=8, modules=("q_proj", "v_proj")),
    dict(name="r16", r=16, alpha=16, modules=ALL),
    dict(name="r32", r=32, alpha=32, modules=("gate_proj", "up_proj", "down_proj"), rslora=True),
    dict(name="r64", r=64, alpha=32, modules=("o_proj", "down_proj", "k_proj")),
]
BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A GQA-3 tiny Llama (hidden 96: not a power of two), its PEFT twin, a scattered pool
    holding every adapter, and the slot of each adapter name."""
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=7, hidden_size=96,
                           num_attention_heads=6, num_key_value_heads=2, intermediate_size=160)
    spec, model = load_model(path, torch.float32, DEVICE)
    model.set_backend(TRITON_BACKEND)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = add_peft_adapters(hf, ADAPTERS, seed=3)
    pool = ScatteredPool(model, num_pages=300, block_size=BLOCK_SIZE, seed=4)
    tables = LoraTables.create(6, 64, DEVICE)
    slot_of = {}
    for slot, a in enumerate(ADAPTERS, start=1):
        w, scale = peft_adapter_weights(peft_model, a["name"], spec, a["modules"])
        install_adapter(pool, tables, slot, spec, w, a["modules"], a["r"], scale)
        slot_of[a["name"]] = slot
    return spec, model, peft_model, pool, tables, slot_of


def test_triton_backend_matches_peft(setup):
    spec, model, peft_model, pool, tables, slot_of = setup
    rng = random.Random(5)
    names = ["r4", "r16", None, "r32", "r64", "r16", None]
    seqs = [[rng.randrange(3, spec.vocab_size) for _ in range(rng.randrange(9, 24))]
            for _ in names]
    prompt_lens = [max(1, len(s) - rng.randrange(2, 7)) for s in seqs]
    outs = run_schedule(model, pool, seqs, prompt_lens, [rng.randrange(0, 4) for _ in seqs],
                        chunk=[rng.choice([3, 5, 16]) for _ in seqs],
                        lora_slots=[slot_of[n] if n else -1 for n in names], lora=tables)
    for name, ids, got in zip(names, seqs, outs):
        assert rel_err(got.cpu(), peft_logits(peft_model, name, ids)) <= TOL, name


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("grouped_min_tokens", [1, slora_kernels.lora.GROUPED_MIN_TOKENS],
                         ids=["grouped-mbgmv", "per-token-mbgmv"])
def test_decode_graph_buffers_pad_and_match_peft(setup, grouped_min_tokens, monkeypatch):
    """Decode steps through DecodeGraphs.run (padded to a graph size, stale rows from a larger
    earlier step left in the buffers) give the logits HF + PEFT give at those positions. On CUDA
    the graphs are captured and replayed; elsewhere the same buffers run eagerly. Both decode
    LoRA kernels: grouped by adapter (r16 serves two sequences) and per token."""
    monkeypatch.setattr(slora_kernels.lora, "GROUPED_MIN_TOKENS", grouped_min_tokens)
    spec, model, peft_model, pool, tables, slot_of = setup
    rng = random.Random(11)
    names = ["r64", None, "r4", "r16", "r32", "r16"]
    prompts = [[rng.randrange(3, spec.vocab_size) for _ in range(n)]
               for n in (13, 9, 17, 8, 11, 6)]
    decode_steps = 3
    pages = [pool.take(-(-(len(p) + decode_steps) // BLOCK_SIZE)) for p in prompts]
    slots = [slot_of[n] if n else -1 for n in names]
    prefill = BatchInput.build([(p, 0, pg, s) for p, pg, s in zip(prompts, pages, slots)],
                               BLOCK_SIZE, device=DEVICE)
    model.forward(prefill, pool.storage, tables)
    graphs = DecodeGraphs(model, pool.storage, tables, max_batch=8, max_blocks=4)
    if DEVICE == "cuda":
        graphs.capture()  # the real thing: replayed graphs (the warm-up writes no KV: slot -1)
    seqs = [list(p) for p in prompts]
    for step in range(decode_steps):
        live = range(len(seqs)) if step != 1 else range(3)  # a smaller step pads stale rows
        for i in live:
            seqs[i].append(rng.randrange(3, spec.vocab_size))
        batch = BatchInput.build([(seqs[i][-1:], len(seqs[i]) - 1, pages[i], slots[i])
                                  for i in live], BLOCK_SIZE)
        assert graphs.fits(batch)
        logits = graphs.run(batch, tables.modules_of(slots[i] for i in live))
        assert logits.shape == (len(live), spec.vocab_size)
        for row, i in enumerate(live):
            ref = peft_logits(peft_model, names[i], seqs[i])[-1]
            assert rel_err(logits[row].cpu(), ref) <= TOL, (step, names[i])
        if step == 1:  # keep the skipped sequences in step: feed their token eagerly
            for i in range(3, len(seqs)):
                seqs[i].append(rng.randrange(3, spec.vocab_size))
            rest = BatchInput.build([(seqs[i][-1:], len(seqs[i]) - 1, pages[i], slots[i])
                                     for i in range(3, len(seqs))], BLOCK_SIZE, device=DEVICE)
            model.forward(rest, pool.storage, tables)


def test_decode_graph_lora_variants_match_peft(setup):
    """A decode step replays the graph of the smallest LoRA variant that covers its adapters'
    modules: q,v-only adapters skip the MLP call sites, an MLP adapter needs them all."""
    spec, model, peft_model, pool, tables, slot_of = setup
    assert lora_variant(tables.modules_of([slot_of["r4"], -1])) == ATTENTION_MODULES
    assert lora_variant(tables.modules_of([slot_of["r4"], slot_of["r32"]])) == ALL_MODULES
    assert lora_variant(tables.modules_of([-1, -1])) == frozenset()
    rng = random.Random(13)
    graphs = DecodeGraphs(model, pool.storage, tables, max_batch=4, max_blocks=4)
    if DEVICE == "cuda":
        graphs.capture()
    for names in (["r4", None], ["r32", "r4"], [None]):
        slots = [slot_of[n] if n else -1 for n in names]
        seqs = [[rng.randrange(3, spec.vocab_size) for _ in range(rng.randrange(5, 12))]
                for _ in names]
        pages = [pool.take(-(-len(s) // BLOCK_SIZE)) for s in seqs]
        prefill = BatchInput.build([(s[:-1], 0, pg, sl) for s, pg, sl in zip(seqs, pages, slots)],
                                   BLOCK_SIZE, device=DEVICE)
        model.forward(prefill, pool.storage, tables)
        batch = BatchInput.build([(s[-1:], len(s) - 1, pg, sl)
                                  for s, pg, sl in zip(seqs, pages, slots)], BLOCK_SIZE)
        logits = graphs.run(batch, tables.modules_of(slots))
        for row, (name, ids) in enumerate(zip(names, seqs)):
            assert rel_err(logits[row].cpu(), peft_logits(peft_model, name, ids)[-1]) <= TOL, name
