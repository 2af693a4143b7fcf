"""client/openai_api/protocol.py and formatting.py without a server: bounded bodies, OpenAI
parameter rules -> the model's inputs, and vllm_backend logprobs -> OpenAI's formats."""

from __future__ import annotations

import json

import pytest

from client import Chunk
from client.openai_api.formatting import Completion, full_response, stream_chunk
from client.openai_api.protocol import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    ApiError,
    chat_request,
    completion_request,
    parse_body,
)
from client.openai_api.triton import api_error

CHAT = {"model": "pirate", "messages": [{"role": "user", "content": "Hi"}]}


def test_parse_body_bounds() -> None:
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_body(f'{{"a": {nested[1:-1]}}}'.encode()) == {"a": json.loads(nested[1:-1])}
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    # brackets inside strings (with escaped quotes) are not nesting
    assert parse_body(json.dumps({"s": '"[[[' * 50}).encode())["s"].startswith('"[[[')
    for raw, code in ((f'{{"a": {too_deep}}}'.encode(), "json_too_deep"),
                      (b"{", "invalid_json"), (b"\xff\xfe", "invalid_json"),
                      (b'"text"', "invalid_json"),
                      (b" " * (MAX_BODY_BYTES + 1), "body_too_large")):
        with pytest.raises(ApiError) as err:
            parse_body(raw)
        assert err.value.status == 400 and err.value.code == code


def test_chat_request_to_inputs() -> None:
    req = chat_request({**CHAT, "max_completion_tokens": 7, "temperature": 0, "seed": 3,
                        "stop": "x", "logprobs": True, "top_logprobs": 4, "stream": True,
                        "stream_options": {"include_usage": True}, "n": 1, "user": "u"},
                       base_id="slora", default_max_tokens=256)
    assert req.adapter_id == "pirate" and req.top_logprobs == 4 and req.include_usage
    assert req.inputs == {
        "text_input": json.dumps([{"role": "user", "content": "Hi"}]), "chat": True,
        "max_tokens": 7, "temperature": 0.0, "seed": 3, "stop": ["x"], "stream": True,
        "adapter_id": "pirate", "sampling_parameters": json.dumps({"logprobs": 4})}
    base = chat_request({**CHAT, "model": "slora", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]}, "slora", 256)
    assert base.adapter_id is None and "adapter_id" not in base.inputs
    assert json.loads(base.inputs["text_input"]) == [{"role": "system", "content": "ab"}]
    assert base.inputs["max_tokens"] == 256 and base.top_logprobs is None


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                            "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"tools": []}, "tools"),
    ({"seed": -1}, "seed"), ({"stop": [1]}, "stop"), ({"model": ""}, "model"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
])
def test_chat_request_refusals_name_the_parameter(extra: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        chat_request({**CHAT, **extra}, "slora", 256)
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_request() -> None:
    req = completion_request({"model": "slora", "prompt": ["Hi"], "logprobs": 2}, "slora")
    assert req.inputs["text_input"] == "Hi" and req.inputs["max_tokens"] == 16
    ids = completion_request({"model": "slora", "prompt": [1, 2, 3]}, "slora")
    assert ids.inputs["input_ids"] == [1, 2, 3]
    for bad, param in (({"logprobs": 6}, "logprobs"), ({"echo": True}, "echo"),
                       ({"prompt": ""}, "prompt")):
        with pytest.raises(ApiError) as err:
            completion_request({"model": "slora", "prompt": "Hi", **bad}, "slora")
        assert err.value.param == param


def test_model_errors_mapped() -> None:
    assert api_error("NOT_FOUND: adapter 'x' not found").status == 404
    err = api_error("INVALID_ARG: invalid 'adapter_id': bad characters")
    assert (err.status, err.param) == (400, "model")
    err = api_error("INVALID_ARG: invalid 'max_tokens': too long")
    assert (err.status, err.param) == (400, "max_tokens")
    assert api_error("UNAVAILABLE: queue full").status == 503
    assert api_error("INTERNAL: boom").status == 500


def entry(tok: int, lp: float, rank: int, text: str) -> dict:
    return {str(tok): {"logprob": lp, "rank": rank, "decoded_token": text}}


def test_logprob_formats() -> None:
    # a sampled token of rank 3 with top-2 alternatives: the chosen one is the output id,
    # not the lowest rank, and only ranks 1..k are alternatives
    pos = {**entry(5, -0.1, 1, "A"), **entry(6, -2.0, 2, "B"), **entry(7, -3.0, 3, "C")}
    chunk = Chunk("C", [7], "length", 4, 1, logprobs=[pos])
    chat = chat_request({**CHAT, "logprobs": True, "top_logprobs": 2}, "slora", 4)
    c = Completion(chat)
    c.add(chunk)
    (item,) = full_response(c)["choices"][0]["logprobs"]["content"]
    assert (item["token"], item["logprob"], item["bytes"]) == ("C", -3.0, [67])
    assert [t["token"] for t in item["top_logprobs"]] == ["A", "B"]
    body = full_response(c)
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert body["choices"][0]["finish_reason"] == "length" and body["object"] == "chat.completion"
    cmpl = Completion(completion_request({"model": "slora", "prompt": "x", "logprobs": 1},
                                         "slora"))
    pairs = cmpl.add(chunk)
    lp = stream_chunk(cmpl, "C", pairs, None)["choices"][0]["logprobs"]
    assert lp == {"tokens": ["C"], "token_logprobs": [-3.0], "top_logprobs": [{"A": -0.1}],
                  "text_offset": [0]}
