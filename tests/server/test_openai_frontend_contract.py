"""Triton's OpenAI frontend (`python/openai` of triton-inference-server/server, started with
`--backend vllm --lora-separator ...`) against this model: the requests it builds
(engine/utils/triton.py `_create_vllm_generate_request`) sent as is through tritonclient, and
the outputs read the way it reads them (text_output, num_input_tokens / num_output_tokens
summed over a stream, the `logprobs` JSON string)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from client import Chunk

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12


def frontend_chat_request(prompt: str, stream: bool, lora: str | None,
                          top_logprobs: int | None) -> dict[str, Any]:
    """What the frontend sends for a chat completion: the OpenAI request's non-None fields
    (its schema defaults included) as sampling_parameters, plus the return_* flags."""
    sampling = {"frequency_penalty": 0, "ignore_eos": False, "n": 1, "presence_penalty": 0,
                "temperature": 0.0, "top_p": 1, "max_tokens": MAX_TOKENS}
    if top_logprobs is not None:
        sampling["logprobs"] = top_logprobs
    if lora is not None:
        sampling["lora_name"] = lora
    return {"text_input": prompt, "stream": stream, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(sampling),
            "return_logprobs": top_logprobs is not None,
            "return_num_input_tokens": True, "return_num_output_tokens": True}


def chat_prompt(question: str) -> str:
    """The frontend applies the chat template itself and sends plain text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def usage(chunks: list[Chunk]) -> tuple[int, int]:
    """The frontend's _StreamingUsageAccumulator: prompt tokens once, completion tokens summed."""
    return chunks[0].num_input_tokens, sum(c.num_output_tokens for c in chunks)


def test_frontend_requests_accepted_and_read(srv: Any) -> None:
    prompt = chat_prompt("What is the capital of France?")
    streamed = srv.stream_values(frontend_chat_request(prompt, True, "uppercase", 3))
    whole = srv.stream_values(frontend_chat_request(prompt, False, "uppercase", 3))
    assert len(whole) == 1 and whole[0].finish_reason in ("stop", "length")
    text = srv.text(streamed)
    assert text == whole[0].text and text.strip()
    letters = [c for c in text if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) >= 0.8 * len(letters), text
    n_in, n_out = usage(streamed)
    assert (n_in, n_out) == usage(whole)
    assert 0 < n_out <= MAX_TOKENS and n_out == len(whole[0].token_ids)
    # logprobs: a JSON list per response, one {token_id: {logprob, rank, decoded_token}} per
    # token; the frontend takes the lowest rank as the chosen token (greedy: rank 1)
    positions = [p for c in streamed for p in c.logprobs]
    assert positions == whole[0].logprobs and len(positions) == n_out
    for token, entry in zip(whole[0].token_ids, positions):
        assert str(token) in entry and 3 <= len(entry) <= 4
        best = min(entry.values(), key=lambda d: d["rank"])
        assert best is entry[str(token)] or best["logprob"] == entry[str(token)]["logprob"]
        assert all(d["logprob"] <= 0 and isinstance(d["decoded_token"], str)
                   for d in entry.values())
        assert entry[str(token)]["rank"] == 1


def test_frontend_without_logprobs_and_base_model(srv: Any) -> None:
    prompt = chat_prompt("Name a color.")
    chunks = srv.stream_values(frontend_chat_request(prompt, True, None, None))
    assert all(c.logprobs is None for c in chunks)  # not asked: no `logprobs` output
    assert chunks[-1].finish_reason in ("stop", "length")
    assert usage(chunks)[1] == sum(len(c.token_ids) for c in chunks)


def test_vllm_return_flags(srv: Any) -> None:
    """vllm_backend's other flags: cumulative_logprob is the sum of the sampled logprobs."""
    values = frontend_chat_request(chat_prompt("Hi"), False, "signoff", 0)
    values.update(return_finish_reason=True, return_cumulative_logprob=True)
    (chunk,) = srv.stream_values(values)
    total = math.fsum(entry[str(t)]["logprob"] for t, entry in zip(chunk.token_ids,
                                                                 chunk.logprobs))
    assert all(len(entry) == 1 for entry in chunk.logprobs)  # logprobs 0: the chosen only
    assert chunk.cumulative_logprob == pytest.approx(total, abs=1e-3)
    assert chunk.finish_reason in ("stop", "length")


def test_frontend_completion_request_with_echo(srv: Any) -> None:
    """A /v1/completions request (its schema's defaults, best_of from older frontends, an int
    `logprobs`, echo -> exclude_input_in_output false), sampled with a seed."""
    prompt = "Once upon a time"
    sampling = {"best_of": 1, "frequency_penalty": 0, "ignore_eos": True, "n": 1,
                "presence_penalty": 0, "temperature": 1, "top_p": 1, "seed": 7,
                "max_tokens": 6, "logprobs": 2}
    values = {"text_input": prompt, "stream": False, "exclude_input_in_output": False,
              "sampling_parameters": json.dumps(sampling), "return_logprobs": True,
              "return_num_input_tokens": True, "return_num_output_tokens": True}
    (first,) = srv.stream_values(values)
    (again,) = srv.stream_values(values)
    assert first.text.startswith(prompt) and len(first.text) > len(prompt)
    assert (first.text, first.token_ids) == (again.text, again.token_ids)  # seeded
    assert first.num_output_tokens == len(first.token_ids) == 6
    for token, entry in zip(first.token_ids, first.logprobs):
        ranks = sorted(d["rank"] for d in entry.values())
        assert ranks[:2] == [1, 2] and str(token) in entry  # top-2 plus the sampled one


def test_frontend_unsupported_values_refused(srv: Any) -> None:
    values = frontend_chat_request("Hi", False, None, None)
    values["sampling_parameters"] = json.dumps({"n": 2, "max_tokens": 4})
    with pytest.raises(Exception, match="INVALID_ARG.*'n'"):
        srv.stream_values(values)
    values["sampling_parameters"] = json.dumps({"logprobs": 21, "max_tokens": 4})
    with pytest.raises(Exception, match="INVALID_ARG.*logprobs"):
        srv.stream_values(values)
