"""Hostile clients and adapters through the real server (issue 17): an adapter named anywhere is
served or refused, never silently replaced by the base model; deep / huge JSON is INVALID_ARG
naming the input or adapter; no hostile prompt or adapter holds up the next request; the server
keeps serving and holds no page afterwards.

One server for the module, with its own adapter directory (a copy of the demo `pirate` adapter,
hostile adapters are added next to it while it runs: the directory is rescanned per request)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client import ClientError, stream_grpc_values

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_ADAPTER = REPO_ROOT / "adapters" / "pirate"
PROBE = {"text_input": "Hi", "max_tokens": 1, "temperature": 0.0}
GOOD = {"text_input": "Hello", "max_tokens": 3, "temperature": 0.0}
# the demo pirate adapter opens its chat answers with "Arr" (tests/server/test_generate.py)
CHAT = {"text_input": "Why is the sky blue?", "chat": True, "max_tokens": 6, "temperature": 0.0}
PIRATE_OPENING = "Arr"
DEEP = 100_000  # nesting levels of the hostile JSON documents (the issue's)
HUGE_INT = "9" * 5000  # digits: over Python's 4300-digit int parsing limit
BASELINE_PROBES = 3
HEAD_START_S = 0.3  # the hostile request is sent first, the probe this much later
# the probe may take this much longer than alone: generous for 2 shared cores, far below the
# seconds (or forever) that a hostile request held every other request up before
STALL_SLACK_S = 1.5
RESPONSE_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile_adapters")
    shutil.copytree(DEMO_ADAPTER, root / "pirate")
    return root


@pytest.fixture(scope="module")
def hostile(triton_server_factory, wrap_server, adapter_dir: Path) -> Iterator[Any]:
    env = {"SLORA_ADAPTER_DIR": str(adapter_dir), "SLORA_MAX_NUM_SEQS": "4"}
    with triton_server_factory(env=env) as server:
        yield wrap_server(server)


def send(srv: Any, values: dict[str, Any]) -> list:
    return list(stream_grpc_values(srv.info.grpc_url, values, timeout=RESPONSE_TIMEOUT_S))


def refused(srv: Any, values: dict[str, Any]) -> str:
    """The error message of a request that must be refused."""
    with pytest.raises(ClientError) as err:
        send(srv, values)
    return str(err.value)


def assert_still_serving(srv: Any) -> None:
    assert send(srv, GOOD)[-1].finish_reason in ("stop", "length")


def make_adapter(adapter_dir: Path, name: str, edit: Callable[[Path], None]) -> str:
    """A copy of the demo adapter, changed by `edit(folder)`."""
    folder = adapter_dir / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(DEMO_ADAPTER, folder)
    edit(folder)
    return name


def config_text(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def config_field(folder: Path, key: str, value: Any) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    config_text(folder, json.dumps({**cfg, key: value}))


# ---------------------------------------------------------------- 1. no silent base model
def test_lora_name_next_to_an_empty_adapter_id_is_used(hostile) -> None:
    message = refused(hostile, {**GOOD, "adapter_id": "",
                                "sampling_parameters": json.dumps({"lora_name": "no-such"})})
    assert "NOT_FOUND" in message and "no-such" in message, message
    by_input = send(hostile, {**CHAT, "adapter_id": "pirate"})
    by_json = send(hostile, {**CHAT, "adapter_id": "",
                             "sampling_parameters": json.dumps({"lora_name": "pirate"})})
    texts = ["".join(c.text for c in chunks) for chunks in (by_input, by_json, send(hostile, CHAT))]
    assert texts[0] == texts[1] and texts[1].startswith(PIRATE_OPENING), texts
    assert not texts[2].startswith(PIRATE_OPENING), texts


@pytest.mark.parametrize("names", [
    {"adapter_id": "pirate", "sampling_parameters": json.dumps({"lora_name": "other"})},
    {"sampling_parameters": json.dumps({"adapter_id": "pirate", "lora_name": "other"})},
], ids=["input-vs-json", "json-vs-json"])
def test_conflicting_adapter_names_are_invalid(hostile, names: dict) -> None:
    message = refused(hostile, {**GOOD, **names})
    assert "INVALID_ARG" in message and "'adapter_id'" in message and "conflicting" in message
    assert_still_serving(hostile)


# ---------------------------------------------------------------- 2. deep / huge JSON
def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


DEEP_ARRAY = nested(DEEP)
BAD_JSON_INPUTS = [
    ({"sampling_parameters": '{"seed": ' + nested(levels) + "}"}, "sampling_parameters")
    for levels in (DEEP, DEEP // 5, 100)  # over the size cap, past recursion, past the depth cap
] + [
    ({"sampling_parameters": '{"seed": ' + HUGE_INT + "}"}, "sampling_parameters"),
    ({"chat": True, "text_input": DEEP_ARRAY}, "text_input"),
    ({"chat": True, "text_input": "[" + HUGE_INT + "]"}, "text_input"),
]


@pytest.mark.parametrize(("values", "field"), BAD_JSON_INPUTS,
                         ids=["params-deep", "params-recursion", "params-depth", "params-int",
                              "chat-deep", "chat-int"])
def test_hostile_json_input_is_invalid_by_name(hostile, values: dict, field: str) -> None:
    message = refused(hostile, {**GOOD, **values})
    assert message.startswith("INVALID_ARG") and f"'{field}'" in message, message[:300]
    assert_still_serving(hostile)


@pytest.mark.parametrize("text", [DEEP_ARRAY, '{"peft_type": "LORA", "r": ' + HUGE_INT + "}"],
                         ids=["deep", "int"])
def test_hostile_adapter_config_is_invalid_by_name(hostile, adapter_dir: Path, text: str) -> None:
    name = make_adapter(adapter_dir, "badjson", lambda f: config_text(f, text))
    message = refused(hostile, {**GOOD, "adapter_id": name})
    assert message.startswith("INVALID_ARG") and f"adapter '{name}'" in message, message[:300]
    assert_still_serving(hostile)


# ---------------------------------------------------------------- 3. the client's input name
def test_out_of_vocabulary_input_ids_name_input_ids(hostile) -> None:
    message = refused(hostile, {"input_ids": [1, 10**9], "max_tokens": 1})
    assert "INVALID_ARG" in message and "'input_ids'" in message, message


# ---------------------------------------------------------------- 4. no request stalls others
def probe_latency(srv: Any) -> float:
    start = time.monotonic()
    assert send(srv, PROBE)[-1].finish_reason in ("stop", "length")
    return time.monotonic() - start


def assert_does_not_stall(srv: Any, values: dict[str, Any], expect: str) -> None:
    """`values` sent, a 1-token probe HEAD_START_S later: the probe is not held up, and the
    hostile request is refused with `expect` in its message."""
    baseline = statistics.median(probe_latency(srv) for _ in range(BASELINE_PROBES))
    outcome: dict[str, str] = {}

    def hostile_request() -> None:
        try:
            send(srv, values)
            outcome["error"] = "(served)"
        except ClientError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=hostile_request, daemon=True)
    thread.start()
    time.sleep(HEAD_START_S)
    waited = probe_latency(srv)
    thread.join(RESPONSE_TIMEOUT_S)
    print(f"probe after a hostile request: {waited:.2f} s (alone {baseline:.2f} s)")
    assert waited < baseline + STALL_SLACK_S, f"probe took {waited:.2f} s (alone {baseline:.2f})"
    assert expect in outcome.get("error", "(no answer)"), outcome
    assert_still_serving(srv)


def test_huge_text_prompt_does_not_stall(hostile) -> None:
    values = {"text_input": "lorem ipsum " * ((16 << 20) // 12), "max_tokens": 1}
    assert_does_not_stall(hostile, values, "cannot fit")


def test_huge_chat_prompt_does_not_stall(hostile) -> None:
    messages = [{"role": "user", "content": "lorem ipsum " * ((4 << 20) // 12)}]
    values = {"text_input": json.dumps(messages), "chat": True, "max_tokens": 1}
    assert_does_not_stall(hostile, values, "cannot fit")


@pytest.mark.parametrize("regex", [r"(?:.|.){0,19}Z", r"(?:.|.){0,40}\d"],
                         ids=["issue", "no-literal"])
def test_backtracking_target_regex_does_not_stall(hostile, adapter_dir: Path, regex: str) -> None:
    name = make_adapter(adapter_dir, "regex", lambda f: config_field(f, "target_modules", regex))
    assert_does_not_stall(hostile, {**PROBE, "adapter_id": name}, f"adapter '{name}'")


def test_fifo_weights_do_not_stall(hostile, adapter_dir: Path) -> None:
    def fifo(folder: Path) -> None:
        (folder / "adapter_model.safetensors").unlink()
        os.mkfifo(folder / "adapter_model.safetensors")

    name = make_adapter(adapter_dir, "fifo", fifo)
    assert_does_not_stall(hostile, {**PROBE, "adapter_id": name}, "not a regular file")


# ---------------------------------------------------------------- nothing leaks
def test_nothing_left_behind(hostile) -> None:
    """After all of the above: no request in the engine, no KV page held."""
    hostile.wait_for(lambda: hostile.metric("slora_requests", state="running") == 0
                     and hostile.metric("slora_requests", state="waiting") == 0
                     and hostile.metric("slora_pool_pages", kind="kv") == 0,
                     IDLE_TIMEOUT_S, "an idle engine with no KV page")
    assert_still_serving(hostile)
