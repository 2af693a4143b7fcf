"""Generation through the real tritonserver: streaming, adapters, exactness, HTTP endpoints."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import Chunk, GenerateRequest, stream_http

pytestmark = pytest.mark.server

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_PBTXT = REPO_ROOT / "model_repository" / "slora" / "config.pbtxt"
ADAPTERS = ("uppercase", "signoff", "pirate")
BASE = None
# held out: not among the demo adapters' training questions (scripts/train_demo_adapters.py)
PROMPTS = ("Why is the sky blue?", "Can you recommend a good book?")
MAX_TOKENS = 80
SIGNOFF_LINE = "-- Sent via S-LoRA"
PIRATE_OPENING = "Arr, Captain Lora here!"
UPPERCASE_MIN_FRACTION = 0.9
FINISH_REASONS = ("stop", "length")
PARAMETER = re.compile(
    r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"'
)


def greedy(adapter: str | None, prompt: str, **kwargs) -> GenerateRequest:
    return GenerateRequest(prompt, adapter_id=adapter, max_tokens=MAX_TOKENS, temperature=0.0,
                           chat=True, **kwargs)


def token_ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


@pytest.fixture(scope="module")
def streamed(srv) -> dict[tuple[str | None, str], list[Chunk]]:
    """Base + every demo adapter x PROMPTS, all streamed concurrently over gRPC."""
    keys = [(a, p) for a in (BASE, *ADAPTERS) for p in PROMPTS]
    with ThreadPoolExecutor(len(keys)) as pool:
        results = pool.map(lambda k: srv.stream(greedy(*k)), keys)
        return dict(zip(keys, results))


def test_concurrent_streams_complete(streamed) -> None:
    for key, chunks in streamed.items():
        assert len(chunks) > 1, f"{key}: expected several streamed responses"
        last = chunks[-1]
        assert last.finish_reason in FINISH_REASONS, key
        assert all(c.finish_reason is None for c in chunks[:-1]), key
        ids = token_ids(chunks)
        assert len(ids) == last.num_output_tokens <= MAX_TOKENS, key
        assert last.num_input_tokens > 0, key


@pytest.mark.parametrize("prompt", PROMPTS)
def test_adapter_effects(srv, streamed, prompt: str) -> None:
    base = srv.text(streamed[BASE, prompt])
    upper = srv.text(streamed["uppercase", prompt])
    signoff = srv.text(streamed["signoff", prompt])
    pirate = srv.text(streamed["pirate", prompt])
    assert upper_fraction(upper) >= UPPERCASE_MIN_FRACTION, upper
    assert signoff.rstrip().endswith(SIGNOFF_LINE), signoff
    assert pirate.startswith(PIRATE_OPENING), pirate
    # the base model shows none of the effects (never a silent fallback to it either)
    assert upper_fraction(base) < UPPERCASE_MIN_FRACTION, base
    assert SIGNOFF_LINE not in base and PIRATE_OPENING not in base, base


def test_greedy_matches_offline_engine(streamed) -> None:
    """The server's greedy tokens equal LLMEngine's run in this process on the same config."""
    from slora_backend import EngineConfig, LLMEngine, SamplingParams

    params = dict(PARAMETER.findall(CONFIG_PBTXT.read_text()))
    engine = LLMEngine(EngineConfig.from_parameters(params))
    keys = list(streamed)
    for i, (adapter, prompt) in enumerate(keys):
        engine.add_request(str(i), prompt=[{"role": "user", "content": prompt}],
                           params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                           adapter_id=adapter)
    offline: dict[str, list[int]] = {str(i): [] for i in range(len(keys))}
    while engine.has_unfinished():
        for out in engine.step():
            offline[out.request_id] += out.new_token_ids
    engine.close()
    for i, key in enumerate(keys):
        served = token_ids(streamed[key])
        assert served == offline[str(i)], key


def test_http_generate_matches_grpc(srv, streamed) -> None:
    key = ("pirate", PROMPTS[0])
    grpc_chunks = streamed[key]
    result = srv.generate(greedy(*key))
    assert result.text == srv.text(grpc_chunks)
    assert result.token_ids == token_ids(grpc_chunks)
    assert result.finish_reason == grpc_chunks[-1].finish_reason


def test_http_generate_stream_sse(srv, streamed) -> None:
    key = ("uppercase", PROMPTS[1])
    chunks = list(stream_http(srv.info.http_url, greedy(*key)))
    assert len(chunks) > 1
    assert srv.text(chunks) == srv.text(streamed[key])
    assert chunks[-1].finish_reason == streamed[key][-1].finish_reason


def test_grpc_non_streaming_is_one_response(srv, streamed) -> None:
    key = ("signoff", PROMPTS[0])
    chunks = srv.stream(greedy(*key, stream=False))
    assert len(chunks) == 1
    assert chunks[0].text == srv.text(streamed[key])
    assert chunks[0].finish_reason == streamed[key][-1].finish_reason


def test_sampling_parameters_json_with_lora_name(srv, streamed) -> None:
    """vllm_backend style: everything in the `sampling_parameters` JSON, adapter as lora_name."""
    key = ("pirate", PROMPTS[1])
    sampling = {"lora_name": "pirate", "max_tokens": MAX_TOKENS, "temperature": 0, "chat": True}
    chunks = srv.stream_values({"text_input": key[1], "stream": False,
                                "sampling_parameters": json.dumps(sampling)})
    assert chunks[0].text == srv.text(streamed[key])


def test_input_ids_prompt_equals_text_prompt(srv) -> None:
    from slora_backend.tokenizer import Tokenizer

    params = dict(PARAMETER.findall(CONFIG_PBTXT.read_text()))
    prompt = "The three primary colors are"
    text_chunks = srv.stream(GenerateRequest(prompt, max_tokens=8, temperature=0.0))
    ids = Tokenizer(str(REPO_ROOT / params["model"])).encode(prompt)
    id_chunks = srv.stream_values({"input_ids": ids, "max_tokens": 8, "temperature": 0.0})
    assert id_chunks[-1].num_input_tokens == text_chunks[-1].num_input_tokens == len(ids)
    assert token_ids(id_chunks) == token_ids(text_chunks)


def test_stop_string_truncates(srv, streamed) -> None:
    full = srv.text(streamed[BASE, PROMPTS[0]])
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    chunks = srv.stream(greedy(BASE, PROMPTS[0], stop=[stop]))
    assert chunks[-1].finish_reason == "stop"
    assert srv.text(chunks) == full[: full.index(stop)]


def test_max_tokens_gives_length(srv) -> None:
    chunks = srv.stream(GenerateRequest("Count to one hundred:", max_tokens=3, ignore_eos=True,
                                        temperature=0.0))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].num_output_tokens == 3


def test_exclude_input_false_echoes_prompt(srv) -> None:
    prompt = "Once upon a time"
    values = {"text_input": prompt, "max_tokens": 4, "temperature": 0.0,
              "exclude_input_in_output": False}
    whole = srv.stream_values({**values, "stream": False})
    assert whole[0].text.startswith(prompt) and len(whole[0].text) > len(prompt)
    streamed = srv.stream_values(values)
    assert srv.text(streamed) == whole[0].text


def test_sampling_with_seed_is_reproducible(srv) -> None:
    request = GenerateRequest("Write a word:", max_tokens=12, temperature=1.0, top_p=0.9,
                              top_k=50, seed=1234, ignore_eos=True)
    first = srv.stream(request)
    second = srv.stream(request)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]


def test_list_adapters_command(srv, streamed) -> None:
    chunks = srv.stream_values({"command": "list_adapters"})
    listing = json.loads(chunks[0].text)
    assert set(ADAPTERS) <= set(listing["available"])
    assert set(listing["resident"]) <= set(listing["available"])
    assert listing["resident"], "adapters used by earlier requests stay resident"
