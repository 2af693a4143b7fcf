"""The OpenAI API (client/openai_api) with the official `openai` SDK, against the real
tritonserver: models, a demo adapter's effect, streaming == non-streaming, logprobs, usage,
errors in OpenAI's shape; bad bodies are refused by this server and never reach Triton; a
client that disconnects cancels its request on the server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(openai_api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_api}/v1", api_key="unused", max_retries=0)


def mostly_upper(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.8 * len(letters)


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "slora" and {"uppercase", "signoff", "pirate"} <= set(ids[1:])
    assert client.models.retrieve("pirate").id == "pirate"


def test_chat_adapter_effect_and_stream_equals_whole(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="uppercase", messages=QUESTION,
                                           temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert mostly_upper(text), text
    assert whole.choices[0].finish_reason in ("stop", "length")
    base = client.chat.completions.create(model="slora", messages=QUESTION, temperature=0,
                                          max_tokens=24).choices[0].message.content
    assert not mostly_upper(base), base
    chunks = list(client.chat.completions.create(
        model="uppercase", messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_length_and_stop(client: openai.OpenAI) -> None:
    r = client.completions.create(model="slora", prompt="One, two, three,", max_tokens=3,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="pirate", messages=QUESTION, temperature=0,
                                       max_completion_tokens=40, stop=["Captain"])
    assert r.choices[0].finish_reason == "stop"
    assert "Captain" not in r.choices[0].message.content


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="signoff", messages=QUESTION, temperature=0,
                                       max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token  # greedy: the most likely one
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True)
    streamed = [i for c in client.chat.completions.create(
        model="signoff", messages=QUESTION, temperature=0, max_tokens=8, logprobs=True,
        top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs
        for i in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]
    c = client.completions.create(model="slora", prompt="The sky is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    plain = client.chat.completions.create(model="slora", messages=QUESTION, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="slora", messages=QUESTION, temperature=-1)
    assert err.value.body["param"] == "temperature" and "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="slora", messages=QUESTION, n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # the engine's check, mapped back
        client.completions.create(model="slora", prompt="Hi", max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


def triton_requests(triton_server: Any) -> float:
    text = requests.get(triton_server.metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("slora_requests_total{"))


def test_bad_bodies_refused_here(openai_api: str, triton_server: Any) -> None:
    before = triton_requests(triton_server)
    url = f"{openai_api}/v1/chat/completions"
    deep = '{"model": "slora", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = json.dumps({"model": "slora", "messages": [{"role": "user",
                                                        "content": "x" * (2 << 20)}]})
    for body, code in (("{not json", "invalid_json"), (deep, "json_too_deep"),
                       (huge, "body_too_large"), ("[1, 2]", "invalid_json")):
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
        assert r.status_code == 400, (code, r.text[:200])
        error = r.json()["error"]
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    time.sleep(0.5)  # metrics are refreshed every 50 ms
    assert triton_requests(triton_server) == before  # nothing reached the model


def count(triton_server: Any, outcome: str) -> float:
    text = requests.get(triton_server.metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("slora_requests_total{") and f'outcome="{outcome}"' in line)


def wait_cancelled(triton_server: Any, target: float) -> None:
    deadline = time.monotonic() + 30
    while count(triton_server, "cancelled") < target:
        assert time.monotonic() < deadline, "the server never cancelled the request"
        time.sleep(0.2)


LONG = {"model": "slora", "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 2000,
        "temperature": 0, "ignore_eos": True}


def test_disconnect_cancels_on_server(openai_api: str, triton_server: Any) -> None:
    cancelled = count(triton_server, "cancelled")
    with requests.post(f"{openai_api}/v1/completions", json={**LONG, "stream": True},
                       stream=True, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
    wait_cancelled(triton_server, cancelled + 1)
    with pytest.raises(requests.ReadTimeout):  # not streaming: the client gives up waiting
        requests.post(f"{openai_api}/v1/completions", json=LONG, timeout=(10, 1.5))
    wait_cancelled(triton_server, cancelled + 2)


def test_overload_429(triton_server: Any, openai_api_factory: Any) -> None:
    with openai_api_factory(triton_server.grpc_url, "--max-in-flight", "1") as url:
        cancelled = count(triton_server, "cancelled")
        with requests.post(f"{url}/v1/completions", json={**LONG, "stream": True},
                           stream=True, timeout=60) as first:
            lines = first.iter_lines()  # kept: dropping it would close the connection
            assert next(lines).startswith(b"data: ")
            r = requests.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2},
                              timeout=30)
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
        wait_cancelled(triton_server, cancelled + 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="slora", prompt="Hi", max_tokens=2).usage
