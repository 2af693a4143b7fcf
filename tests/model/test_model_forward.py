"""LlamaModel.forward against HF transformers logits (fp32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import ScatteredPool, hf_logits, make_tiny_llama, rel_err, run_schedule
from transformers import AutoModelForCausalLM

from slora_backend.model import BatchInput, load_model

TOL = 1e-4


def _load_pair(path):
    spec, model = load_model(path, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return spec, model, hf


def _rand_seqs(vocab, lens, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def _check_schedule(model, hf, vocab, lens, prompt_lens, starts, chunk, block_size, seed=0):
    seqs = _rand_seqs(vocab, lens, seed)
    pool = ScatteredPool(
        model,
        num_pages=sum(-(-n // block_size) for n in lens) + 7,
        block_size=block_size,
        seed=seed,
    )
    outs = run_schedule(model, pool, seqs, prompt_lens, starts, chunk)
    for ids, got in zip(seqs, outs):
        ref = hf_logits(hf, ids)
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= TOL, rel_err(got, ref)


@pytest.mark.parametrize("which", ["tiny_gqa_dir", "tiny_gqa3_dir"])
def test_tiny_single_prefill(which, request):
    spec, model, hf = _load_pair(request.getfixturevalue(which))
    _check_schedule(model, hf, spec.vocab_size, [37], [37], [0], chunk=64, block_size=4)


@pytest.mark.parametrize("which", ["tiny_gqa_dir", "tiny_gqa3_dir"])
def test_tiny_chunked_prefill(which, request):
    spec, model, hf = _load_pair(request.getfixturevalue(which))
    # chunks of 5 over a 4-token page size: chunk boundaries inside pages
    _check_schedule(model, hf, spec.vocab_size, [41], [41], [0], chunk=5, block_size=4)


@pytest.mark.parametrize("which", ["tiny_gqa_dir", "tiny_gqa3_dir"])
def test_tiny_mixed_prefill_decode(which, request):
    """Sequences joining at different steps: prefill chunks and decodes in the same batch."""
    spec, model, hf = _load_pair(request.getfixturevalue(which))
    lens = [30, 19, 45, 8, 26, 33]
    prompt_lens = [12, 19, 7, 3, 26, 1]
    starts = [0, 0, 2, 5, 9, 3]
    _check_schedule(
        model,
        hf,
        spec.vocab_size,
        lens,
        prompt_lens,
        starts,
        chunk=[5, 8, 3, 16, 7, 4],
        block_size=4,
        seed=3,
    )


def test_tiny_decode_only_batch(tiny_gqa_dir):
    """All sequences decoding (the batched decode path), different context lengths."""
    spec, model, hf = _load_pair(tiny_gqa_dir)
    lens = [20, 9, 31, 14]
    _check_schedule(
        model,
        hf,
        spec.vocab_size,
        lens,
        [16, 5, 27, 10],
        [0, 0, 0, 0],
        chunk=64,
        block_size=4,
        seed=5,
    )


def test_mistral_and_rope_variants(tmp_path):
    """Mistral arch; Llama-3 rope scaling (llama3) and linear scaling vs HF, positions past the
    original context length so the scaling matters."""
    cases = [
        ("mistral", dict(sliding_window=None)),
        (
            "llama",
            dict(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            ),
        ),
        (
            "llama",
            dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        ),
    ]
    for i, (arch, over) in enumerate(cases):
        d = make_tiny_llama(tmp_path / f"m{i}", seed=10 + i, arch=arch, **over)
        spec, model, hf = _load_pair(d)
        if "rope_parameters" in over:
            assert spec.rope_scaling["rope_type"] == over["rope_parameters"]["rope_type"]
        _check_schedule(
            model,
            hf,
            spec.vocab_size,
            [70, 40],
            [50, 20],
            [0, 1],
            chunk=[13, 20],
            block_size=8,
            seed=i,
        )


def test_logits_indices_subset(tiny_gqa_dir):
    """Only the requested rows come back (fp32), in logits_indices order."""
    spec, model, hf = _load_pair(tiny_gqa_dir)
    ids = _rand_seqs(spec.vocab_size, [10], 0)[0]
    pool = model.allocate_pool(8, 4)
    b = BatchInput.build([(ids, 0, [3, 1, 6], -1)], 4, logits_for="all")
    b.logits_indices = torch.tensor([9, 2, 5])
    out = model.forward(b, pool, None)
    ref = hf_logits(hf, ids)[[9, 2, 5]]
    assert out.dtype == torch.float32 and out.shape == (3, spec.vocab_size)
    assert rel_err(out, ref) <= TOL


def test_smollm_mixed_batch(smollm, smollm_hf):
    """SmolLM2 (GQA 3, tied embeddings): single prefill, chunked prefill, mixed prefill + decode
    with pages scattered in the pool."""
    spec, model = smollm
    lens = [40, 23, 31]
    prompt_lens = [40, 15, 9]  # seq 0: chunked prefill only; others decode after prefill
    _check_schedule(
        model,
        smollm_hf,
        spec.vocab_size,
        lens,
        prompt_lens,
        [0, 1, 3],
        chunk=[16, 23, 9],
        block_size=16,
        seed=7,
    )


def test_bf16_runs(tiny_gqa_dir):
    """bf16 path runs and stays close to fp32 (loose tolerance: bf16 rounding)."""
    _, m32 = load_model(tiny_gqa_dir, torch.float32, "cpu")
    _, m16 = load_model(tiny_gqa_dir, "bf16", "cpu")
    ids = _rand_seqs(256, [12], 1)[0]
    outs = []
    for m in (m32, m16):
        pool = m.allocate_pool(8, 4)
        b = BatchInput.build([(ids[:8], 0, [0, 1, 2], -1)], 4)
        m.forward(b, pool, None)
        b = BatchInput.build([(ids[8:9], 8, [0, 1, 2], -1)], 4)
        outs.append(m.forward(b, pool, None))
    assert outs[1].dtype == torch.float32
    assert rel_err(outs[1], outs[0]) < 0.05
