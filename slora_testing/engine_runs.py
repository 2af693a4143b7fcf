"""Greedy engine runs for exactness tests: requests arriving at given steps, every request's
tokens and the logits it sampled from recorded (the engine's logits hook)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slora_backend import LLMEngine, SamplingParams

MAX_STEPS = 2000


@dataclass(frozen=True)
class Req:
    request_id: str
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    arrival_step: int  # the engine step before which it is added


def run_requests(engine: LLMEngine, reqs: list[Req]
                 ) -> tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]]:
    """Run `reqs` (greedy, EOS ignored) to the end: tokens and logits rows per request. Every
    request must end by length without an error, and every KV page come back."""
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in reqs}

    def hook(ids: list[str], rows: torch.Tensor) -> None:
        for rid, row in zip(ids, rows):
            logits[rid].append(row.clone())

    engine.runner.logits_hook = hook
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(reqs):
        for r in reqs:
            if r.arrival_step == step:
                engine.add_request(r.request_id, prompt_token_ids=r.prompt,
                                   params=SamplingParams(max_tokens=r.max_tokens,
                                                         temperature=0.0, ignore_eos=True),
                                   adapter_id=r.adapter)
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                assert out.finish_reason == "length"
                finished.add(out.request_id)
        step += 1
        assert step < MAX_STEPS, "engine did not finish"
    assert engine.stats().pool_pages_kv == 0  # every KV page came back
    return tokens, logits
