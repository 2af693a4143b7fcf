"""Request parsing of the Triton model (slora_backend/triton_io.py), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slora_backend.errors import EngineError, ErrorCode
from slora_backend.triton_io import client_error, parse_command, parse_request


def getter(**values):
    """Inputs as the Triton model sees them: numpy arrays, BYTES as object arrays of bytes."""
    def to_array(value):
        items = value if isinstance(value, list) else [value]
        if isinstance(items[0], str):
            return np.array([v.encode() for v in items], dtype=np.object_)
        return np.array(items)

    arrays = {k: to_array(v) for k, v in values.items()}
    return arrays.get


def test_defaults_and_tensor_inputs() -> None:
    req = parse_request(getter(text_input="hi", max_tokens=np.int32(5), temperature=np.float32(0),
                               stop=["a", "b"], ignore_eos=True))
    assert req.prompt == "hi" and req.prompt_token_ids is None and req.adapter_id is None
    assert (req.params.max_tokens, req.params.temperature, req.params.stop) == (5, 0.0, ["a", "b"])
    assert req.params.ignore_eos is True
    assert req.stream is True and req.exclude_input_in_output is True and req.echo_text == ""


def test_tensor_inputs_win_over_sampling_parameters() -> None:
    sampling = json.dumps({"max_tokens": 9, "top_k": 3, "lora_name": "pirate", "stream": False})
    req = parse_request(getter(text_input="hi", max_tokens=np.int32(4),
                               sampling_parameters=sampling))
    assert (req.params.max_tokens, req.params.top_k) == (4, 3)
    assert req.adapter_id == "pirate" and req.stream is False


@pytest.mark.parametrize(("text", "value"), [("yes", True), ("0", False), (" TRUE ", True)])
def test_json_booleans_take_the_same_strings_everywhere(text: str, value: bool) -> None:
    """stream / exclude_input_in_output (read by the model) and ignore_eos (a sampling
    parameter) accept the same spellings, as vllm_backend clients send them."""
    sampling = json.dumps({"stream": text, "exclude_input_in_output": text, "ignore_eos": text})
    req = parse_request(getter(text_input="hi", sampling_parameters=sampling))
    assert req.stream is value and req.exclude_input_in_output is value
    assert req.params.ignore_eos is value


def test_empty_adapter_id_means_base() -> None:
    assert parse_request(getter(text_input="hi", adapter_id="")).adapter_id is None


def test_chat_plain_text_and_message_list() -> None:
    plain = parse_request(getter(text_input="hi", chat=True))
    assert plain.prompt == [{"role": "user", "content": "hi"}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    listed = parse_request(getter(text_input=json.dumps(messages),
                                  sampling_parameters=json.dumps({"chat": True})))
    assert listed.prompt == messages
    # without chat a JSON-looking prompt is just text
    assert parse_request(getter(text_input=json.dumps(messages))).prompt == json.dumps(messages)


def test_echo_when_input_not_excluded() -> None:
    req = parse_request(getter(text_input="Once", exclude_input_in_output=False))
    assert req.echo_text == "Once"


def test_input_ids() -> None:
    req = parse_request(getter(input_ids=[5, 6, 7]))
    assert req.prompt is None and req.prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize(("values", "field"), [
    ({}, "text_input"),
    ({"text_input": ""}, "text_input"),
    ({"text_input": ["a", "b"]}, "text_input"),
    ({"text_input": "hi", "input_ids": [1]}, "input_ids"),
    ({"input_ids": [-1]}, "input_ids"),
    ({"input_ids": [1], "chat": True}, "chat"),
    ({"text_input": "[1, 2]", "chat": True}, "text_input"),
    ({"text_input": "hi", "sampling_parameters": "[]"}, "sampling_parameters"),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"chat": "maybe"})}, "chat"),
    ({"text_input": "hi", "top_p": np.float32(2.0)}, "top_p"),
])
def test_refusals_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(EngineError) as err:
        parse_request(getter(**values))
    assert err.value.code == ErrorCode.INVALID_ARG and f"'{field}'" in err.value.message


def test_invalid_utf8_is_refused() -> None:
    get = {"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}.get
    with pytest.raises(EngineError, match="'text_input'.*UTF-8"):
        parse_request(get)


def test_commands() -> None:
    assert parse_command(getter(text_input="hi")) is None
    assert parse_command(getter(command="list_adapters")).command == "list_adapters"
    with pytest.raises(EngineError, match="'command'"):
        parse_command(getter(command="format_disk"))


@pytest.mark.parametrize(("values", "adapter"), [
    ({"adapter_id": "", "sampling_parameters": json.dumps({"lora_name": "x"})}, "x"),
    ({"sampling_parameters": json.dumps({"adapter_id": "x", "lora_name": "x"})}, "x"),
    ({"adapter_id": "x", "sampling_parameters": json.dumps({"lora_name": ""})}, "x"),
    ({"adapter_id": "", "sampling_parameters": json.dumps({"lora_name": None})}, None),
])
def test_an_adapter_named_anywhere_is_used(values: dict, adapter: str | None) -> None:
    assert parse_request(getter(text_input="hi", **values)).adapter_id == adapter


def test_conflicting_adapter_names_are_refused() -> None:
    sampling = json.dumps({"lora_name": "b"})
    with pytest.raises(EngineError, match="'adapter_id'.*conflicting") as err:
        parse_request(getter(text_input="hi", adapter_id="a", sampling_parameters=sampling))
    assert err.value.code is ErrorCode.INVALID_ARG


@pytest.mark.parametrize(("values", "field"), [
    ({"sampling_parameters": '{"seed": ' + "[" * 5000 + "]" * 5000 + "}"},
     "sampling_parameters"),
    ({"sampling_parameters": '{"seed": ' + "9" * 5000 + "}"}, "sampling_parameters"),
    ({"sampling_parameters": '{"seed": ' + "[" * 40 + "]" * 40 + "}"}, "sampling_parameters"),
    ({"chat": True, "text_input": "[" * 100_000}, "text_input"),
    ({"chat": True, "text_input": "[" + "1" * 5000 + "]"}, "text_input"),
])
def test_hostile_json_is_invalid_by_name(values: dict, field: str) -> None:
    with pytest.raises(EngineError) as err:
        parse_request(getter(**{"text_input": "hi", **values}))
    assert err.value.code is ErrorCode.INVALID_ARG and f"'{field}'" in err.value.message


def test_client_error_names_the_clients_input() -> None:
    err = client_error(EngineError.invalid("prompt_token_ids", "must be integers in [0, 10)"))
    assert "invalid 'input_ids': must be integers" in err.message
    assert err.field == "input_ids" and err.code is ErrorCode.INVALID_ARG
    other = EngineError.invalid("max_tokens", "must be >= 1")
    assert client_error(other) is other
