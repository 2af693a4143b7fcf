"""triton_io's vllm_backend flags and response tensors (response_tensors), without a server."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from slora_backend.logprobs import TokenLogprobs
from slora_backend.triton_io import parse_request, response_tensors


def getter(**values):
    def to_array(value):
        return np.array([value.encode()] if isinstance(value, str) else [value],
                        dtype=np.object_ if isinstance(value, str) else None)

    return {k: to_array(v) for k, v in values.items()}.get


@dataclass
class Out:
    finished: bool = True
    finish_reason: str | None = "length"
    num_input_tokens: int = 7
    num_output_tokens: int = 9
    cumulative_logprob: float | None = -1.5


def tensors(req, out=None, ids=(4, 5), logprobs=None) -> dict[str, np.ndarray]:
    return dict(response_tensors(req, out or Out(), "ab", list(ids), logprobs,
                                 decode=lambda t: f"<{t}>"))


def test_flags_and_logprobs_requests() -> None:
    plain = parse_request(getter(text_input="hi"))
    assert plain.flags == frozenset() and plain.params.logprobs is None
    assert set(tensors(plain)) == {"text_output", "output_ids", "num_input_tokens",
                                   "num_output_tokens", "finish_reason"}
    assert tensors(plain)["num_output_tokens"].tolist() == [9]  # the running total
    # a logprobs key asks for the output; return_logprobs false keeps it off
    keyed = parse_request(getter(text_input="hi", sampling_parameters='{"logprobs": 2}'))
    assert "return_logprobs" in keyed.flags and keyed.params.logprobs == 2
    off = parse_request(getter(text_input="hi", sampling_parameters='{"logprobs": 2}',
                               return_logprobs=False))
    assert "return_logprobs" not in off.flags and off.params.logprobs == 2
    # the flags alone: the sampled token's logprob is computed (no alternatives)
    cum = parse_request(getter(text_input="hi", return_cumulative_logprob=True,
                               return_num_output_tokens=True))
    assert cum.params.logprobs == 0
    out = tensors(cum)
    assert out["cumulative_logprob"].dtype == np.float32 and out["cumulative_logprob"][0] == -1.5
    assert out["num_output_tokens"].tolist() == [2]  # vllm_backend: this response's tokens
    assert "logprobs" not in out


def test_logprobs_json_is_vllm_backends_format() -> None:
    req = parse_request(getter(text_input="hi", return_logprobs=True,
                               sampling_parameters='{"logprobs": 2}'))
    lps = [TokenLogprobs(4, -0.5, 1, ((4, -0.5), (8, -1.0))),
           TokenLogprobs(5, -3.0, 7, ((6, -0.1), (4, -2.5)))]
    body = json.loads(tensors(req, logprobs=lps)["logprobs"][0])
    assert body == [
        {"4": {"logprob": -0.5, "rank": 1, "decoded_token": "<4>"},
         "8": {"logprob": -1.0, "rank": 2, "decoded_token": "<8>"}},
        {"6": {"logprob": -0.1, "rank": 1, "decoded_token": "<6>"},
         "4": {"logprob": -2.5, "rank": 2, "decoded_token": "<4>"},
         "5": {"logprob": -3.0, "rank": 7, "decoded_token": "<5>"}}]
    streaming = tensors(req, Out(finished=False), ids=(), logprobs=[])
    assert json.loads(streaming["logprobs"][0]) == [] and "finish_reason" not in streaming
