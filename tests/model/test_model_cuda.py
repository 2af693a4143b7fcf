"""The torch path on CUDA (skipped without a GPU): fp32 / bf16 / fp16 against fp32 on CPU, with
LoRA, chunked prefill and mixed batches; the sampler gives the same tokens on CPU and CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import (
    ScatteredPool,
    add_peft_adapters,
    install_adapter,
    make_tiny_llama,
    peft_adapter_weights,
    rel_err,
    run_schedule,
)
from transformers import AutoModelForCausalLM

from slora_backend.model import LoraTables, load_model
from slora_backend.sampler import Sampler, make_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ADAPTERS = [
    dict(name="a", r=8, alpha=16, modules=("q_proj", "v_proj", "down_proj")),
    dict(
        name="b",
        r=32,
        alpha=8,
        modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rslora=True,
    ),
]


def test_cuda_dtypes_match_cpu(tmp_path):
    d = make_tiny_llama(
        tmp_path / "m",
        seed=1,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=160,
    )
    peft = add_peft_adapters(AutoModelForCausalLM.from_pretrained(d).eval(), ADAPTERS, seed=2)
    rng = random.Random(0)
    seqs = [[rng.randrange(3, 256) for _ in range(n)] for n in (40, 25, 33, 12)]
    results = {}
    for dev, dt in [
        ("cpu", torch.float32),
        ("cuda", torch.float32),
        ("cuda", torch.bfloat16),
        ("cuda", torch.float16),
    ]:
        spec, m = load_model(d, dt, dev)
        pool = ScatteredPool(m, 300, 8, seed=1)
        tables = LoraTables.create(4, 64, dev)
        for s, a in enumerate(ADAPTERS):
            w, sc = peft_adapter_weights(peft, a["name"], spec, a["modules"])
            install_adapter(pool, tables, s, spec, w, a["modules"], a["r"], sc)
        outs = run_schedule(
            m,
            pool,
            seqs,
            [30, 25, 5, 12],
            [0, 1, 2, 0],
            chunk=[7, 25, 5, 4],
            lora_slots=[0, 1, -1, 1],
            lora=tables,
        )
        assert all(o.dtype == torch.float32 for o in outs)
        results[(dev, dt)] = [o.cpu() for o in outs]
    ref = results[("cpu", torch.float32)]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    for (dev, dt), outs in results.items():
        for a, b in zip(outs, ref):
            assert rel_err(a, b) <= tol[dt], (dev, dt, rel_err(a, b))


def test_cuda_sampler_matches_cpu():
    class P:
        temperature = 0.8
        top_k = 20
        top_p = 0.9

    lg = torch.randn(4, 256)
    a = Sampler().sample(lg.cuda(), [P()] * 4, [make_generator(i) for i in range(4)])
    b = Sampler().sample(lg, [P()] * 4, [make_generator(i) for i in range(4)])
    assert a == b
