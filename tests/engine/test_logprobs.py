"""Logprobs: compute_logprobs on its own, and the engine's logprobs (sampled token, rank, top-k;
greedy and sampled rows, mixed adapters, rows that did not ask) against HF transformers + PEFT
log-softmax of the same prefixes, within 1e-4."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_fixtures import ADAPTERS, SMOL_DIR

from slora_backend import EngineConfig, EngineError, LLMEngine, SamplingParams
from slora_backend.logprobs import compute_logprobs

ABS_TOL = 1e-4
FP16_ABS_TOL = 2e-2  # the GPU engine runs fp16 (Triton kernels, CUDA graphs) against HF fp32
POOL_BYTES = 64 << 20
CPU = {"dtype": "float32", "device": "cpu", "pool_bytes": POOL_BYTES}
DEMO_ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"


def test_compute_logprobs_matches_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 4
    tokens = torch.tensor([3, 17, 250, 0, 99])
    step = compute_logprobs(logits, tokens, [2, None, 0, 20, 5])
    assert step is not None and step.rows == [0, 2, 3, 4]
    by_row = step.for_rows()
    assert set(by_row) == {0, 2, 3, 4}
    ref = torch.log_softmax(logits.double(), dim=-1)
    for row, lp in by_row.items():
        tok = int(tokens[row])
        assert lp.logprob == pytest.approx(float(ref[row, tok]), abs=1e-5)
        assert lp.rank == int((ref[row] > ref[row, tok]).sum()) + 1
        k = [2, None, 0, 20, 5][row]
        want_ids = torch.topk(ref[row], k).indices.tolist() if k else []
        assert [t for t, _ in lp.top] == want_ids
        for t, v in lp.top:
            assert v == pytest.approx(float(ref[row, t]), abs=1e-5)
    assert compute_logprobs(logits, tokens, [None] * 5) is None


def test_logprobs_validated() -> None:
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(EngineError, match="logprobs"):
            SamplingParams(logprobs=bad)
    assert SamplingParams.from_dict({"logprobs": "3", "n": 1, "frequency_penalty": 0}).logprobs == 3
    with pytest.raises(EngineError, match="'n'"):
        SamplingParams.from_dict({"n": 2})
    with pytest.raises(EngineError, match="presence_penalty"):
        SamplingParams.from_dict({"presence_penalty": 0.5})


def run(model_dir: Path, adapter_dir: Path,
        reqs: list[tuple[str, list[int], str | None, SamplingParams]],
        engine_kw: dict) -> dict[str, dict]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), adapter_dir=str(adapter_dir),
                                    max_num_batched_tokens=64, **engine_kw))
    got = {rid: {"tokens": [], "lps": [], "cum": None, "n_out": 0} for rid, *_ in reqs}
    try:
        for rid, prompt, adapter, params in reqs:
            engine.add_request(rid, prompt_token_ids=prompt, params=params, adapter_id=adapter)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                r = got[out.request_id]
                r["tokens"] += out.new_token_ids
                r["n_out"] += 1
                if out.new_logprobs is not None:
                    assert len(out.new_logprobs) == len(out.new_token_ids)
                    r["lps"] += out.new_logprobs
                    r["cum"] = out.cumulative_logprob
                else:
                    assert out.cumulative_logprob is None
    finally:
        engine.close()
    return got


def check_against_hf(model_dir: Path, adapter_dir: Path, adapters: list[str | None],
                     vocab: int, engine_kw: dict = CPU, tol: float = ABS_TOL) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(1)
    reqs = []
    for i, adapter in enumerate(adapters):
        prompt = torch.randint(3, vocab, (6 + 3 * i,), generator=g).tolist()
        temp = 0.0 if i % 2 == 0 else 0.9  # sampled rows: logprobs stay the raw model's
        k = None if i == 1 else [0, 3, 20, 5][i % 4]
        reqs.append((f"r{i}", prompt, adapter, SamplingParams(
            max_tokens=6, temperature=temp, seed=i, ignore_eos=True, logprobs=k)))
    got = run(model_dir, adapter_dir, reqs, engine_kw)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = sorted({a for a in adapters if a})
    model = PeftModel.from_pretrained(base, adapter_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    for rid, prompt, adapter, params in reqs:
        r = got[rid]
        if params.logprobs is None:
            assert r["lps"] == [] and r["cum"] is None
            continue
        ids = torch.tensor([prompt + r["tokens"][:-1]])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0]
            else:
                model.set_adapter(adapter)
                logits = model(input_ids=ids).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1:].double(), dim=-1)
        assert len(r["lps"]) == len(r["tokens"]) == params.max_tokens
        for pos, (tok, lp) in enumerate(zip(r["tokens"], r["lps"])):
            assert lp.token_id == tok
            assert abs(lp.logprob - float(ref[pos, tok])) <= tol, (rid, pos)
            # rank: among the tokens surely above it, at most those within the tolerance
            lo = int((ref[pos] > ref[pos, tok] + tol).sum()) + 1
            hi = int((ref[pos] > ref[pos, tok] - tol).sum()) + 1
            assert lo <= lp.rank <= hi, (rid, pos)
            if params.greedy:
                assert lp.rank == 1
            assert len(lp.top) == params.logprobs
            for t, v in lp.top:
                assert abs(v - float(ref[pos, t])) <= tol, (rid, pos, t)
            if lp.top:  # the most likely alternatives, in order
                assert lp.top[0][1] == pytest.approx(float(ref[pos].max()), abs=tol)
        assert r["cum"] == pytest.approx(math.fsum(lp.logprob for lp in r["lps"]), abs=1e-6)


def test_logprobs_match_hf_tiny(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    names = [a.name for a in ADAPTERS[:3]]
    check_against_hf(tiny_model_dir, tiny_adapter_dir, [None, names[0], names[1], None,
                                                         names[2], names[0]], vocab=49152)


@pytest.mark.skipif(not (SMOL_DIR / "model.safetensors").exists(),
                    reason="SmolLM2 not converted (run make)")
def test_logprobs_match_hf_smollm2_demo_adapters() -> None:
    check_against_hf(SMOL_DIR, DEMO_ADAPTERS, ["uppercase", None, "signoff", "uppercase"],
                     vocab=49152)


def test_logprobs_on_cuda(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    """The GPU path: fp16, Triton kernels, decode steps from CUDA graphs, async scheduling
    (the logprob copies ride with the token copy)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the GPU machine)")
    names = [a.name for a in ADAPTERS[:3]]
    gpu = {"dtype": "float16", "device": "cuda", "pool_fraction": 0.05,
           "cuda_graph_max_batch": 16, "async_scheduling": "on"}
    check_against_hf(tiny_model_dir, tiny_adapter_dir, [None, names[0], names[1], None,
                                                         names[2], names[0]], vocab=49152,
                     engine_kw=gpu, tol=FP16_ABS_TOL)
