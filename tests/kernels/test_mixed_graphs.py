"""Mixed steps (prefill chunks beside decode tokens) through MixedGraphs (model/mixed_graphs.py)
against HF + PEFT: steps padded to token buckets of both attention tiles, stale rows of a larger
earlier step left in the buffers, many adapters of mixed ranks and module subsets beside base
rows. On CUDA the graphs are captured and replayed (and compared with the eager fp16 path);
elsewhere the same static buffers run eagerly under the Triton interpreter."""

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
from test_kernel_forward import ADAPTERS, BLOCK_SIZE, DEVICE, TOL, setup  # noqa: E402, F401
from transformers import AutoModelForCausalLM  # noqa: E402

from slora_backend.model import LoraTables, load_model  # noqa: E402
from slora_backend.model import mixed_graphs as mg  # noqa: E402
from slora_backend.model.llama import TRITON_BACKEND  # noqa: E402
from slora_backend.model.mixed_graphs import MixedGraphs, attention_tile, mixed_token_buckets  # noqa: E402

MAX_TOKENS = 96


def test_mixed_token_buckets():
    assert mixed_token_buckets(32) == [32]
    assert mixed_token_buckets(100) == [64, 100]
    buckets = mixed_token_buckets(4096)
    assert buckets[:3] == [64, 128, 192] and buckets[15:18] == [1024, 1280, 1536]
    assert buckets[-1] == 4096 and len(buckets) == 28
    assert attention_tile(1024) == mg.SMALL_TILE and attention_tile(1280) == mg.LARGE_TILE


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 16, 32, 64, 96 tokens: tiny steps reach every bucket and both tiles."""
    monkeypatch.setattr(mg, "FINE_STEP", 16)
    monkeypatch.setattr(mg, "FINE_MAX", 32)
    monkeypatch.setattr(mg, "COARSE_STEP", 32)


def schedule(spec, rng):
    """Sequences of a mixed schedule: staggered arrivals, chunked prompts, decode tails."""
    names = ["r4", "r16", None, "r32", "r64", "r16", None, "r4"]
    seqs = [[rng.randrange(3, spec.vocab_size) for _ in range(rng.randrange(9, 40))]
            for _ in names]
    prompt_lens = [max(1, len(s) - rng.randrange(2, 9)) for s in seqs]
    starts = [0, 0, 0, 1, 2, 2, 4, 5]
    chunks = [rng.choice([5, 16, 24, 40]) for _ in seqs]
    return names, seqs, prompt_lens, starts, chunks


def test_mixed_graph_steps_match_peft(setup, small_buckets):  # noqa: F811
    spec, model, peft_model, pool, tables, slot_of = setup
    graphs = MixedGraphs(model, pool.storage, tables, max_tokens=MAX_TOKENS,
                         max_seqs=MAX_TOKENS, max_blocks=8)
    assert graphs.sizes == [16, 32, 64, 96]
    if DEVICE == "cuda":
        graphs.capture(torch.cuda.graph_pool_handle())
    used = []

    def forward(batch):
        assert graphs.fits(batch)
        used.append(graphs.bucket(batch.num_tokens))
        # a view of the graphs' logits buffer, which the next step overwrites
        return graphs.run(batch, tables.modules_of(batch.lora_host())).clone()

    names, seqs, prompt_lens, starts, chunks = schedule(spec, random.Random(17))
    outs = run_schedule(model, pool, seqs, prompt_lens, starts, chunks,
                        lora_slots=[slot_of[n] if n else -1 for n in names], lora=tables,
                        forward=forward)
    assert {16, 32, 64} <= set(used), used  # both attention tiles (64 > FINE_MAX)
    for name, ids, got in zip(names, seqs, outs):
        assert rel_err(got.cpu(), peft_logits(peft_model, name, ids)) <= TOL, name


def test_mixed_graphs_refuse_what_does_not_fit(setup, small_buckets):  # noqa: F811
    spec, model, _, pool, tables, _ = setup
    graphs = MixedGraphs(model, pool.storage, tables, max_tokens=32, max_seqs=4, max_blocks=2)
    from slora_backend.model import BatchInput

    def batch(n_tokens, n_seqs, pages=1):
        per = n_tokens // n_seqs
        return BatchInput.build([(list(range(3, 3 + per)), 0, list(range(pages)), -1)
                                 for _ in range(n_seqs)], BLOCK_SIZE)

    assert graphs.fits(batch(8, 2))
    assert not graphs.fits(batch(40, 2, pages=3))  # too many tokens, too wide
    assert not graphs.fits(batch(5, 5))  # too many sequences


def run_fp16(model, spec, peft, sched, use_graphs: bool) -> list[torch.Tensor]:
    """The schedule on a fresh pool (the same NaN-laced garbage) through the eager path or the
    captured mixed-step graphs."""
    names, seqs, prompt_lens, starts, chunks = sched
    pool = ScatteredPool(model, num_pages=300, block_size=BLOCK_SIZE, seed=4)
    tables = LoraTables.create(6, 64, "cuda")
    slot_of = {}
    for slot, a in enumerate(ADAPTERS, start=1):
        w, scale = peft_adapter_weights(peft, a["name"], spec, a["modules"])
        install_adapter(pool, tables, slot, spec, w, a["modules"], a["r"], scale)
        slot_of[a["name"]] = slot
    forward = None
    if use_graphs:
        graphs = MixedGraphs(model, pool.storage, tables, max_tokens=512, max_seqs=512,
                             max_blocks=8)
        graphs.capture(torch.cuda.graph_pool_handle())

        def forward(batch):
            return graphs.run(batch, tables.modules_of(batch.lora_host())).clone()
    return run_schedule(model, pool, seqs, prompt_lens, starts, chunks,
                        lora_slots=[slot_of[n] if n else -1 for n in names], lora=tables,
                        forward=forward)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: fp16 graphs against the eager path")
def test_mixed_graphs_match_eager_fp16(tmp_path):
    """Replayed mixed-step graphs (fp16, varlen attention, grouped LoRA) give the logits of the
    eager fp16 path (prefill attention, MBGMM) on the same schedule."""
    path = make_tiny_llama(tmp_path / "m", seed=9, hidden_size=128, num_attention_heads=8,
                           num_key_value_heads=2, intermediate_size=256)
    peft = add_peft_adapters(AutoModelForCausalLM.from_pretrained(path).eval(), ADAPTERS, seed=1)
    spec, model = load_model(path, torch.float16, "cuda")
    model.set_backend(TRITON_BACKEND)
    sched = schedule(spec, random.Random(23))
    eager, graphs = (run_fp16(model, spec, peft, sched, g) for g in (False, True))
    for name, a, b in zip(sched[0], eager, graphs):
        assert rel_err(b, a) <= 1e-2, name
