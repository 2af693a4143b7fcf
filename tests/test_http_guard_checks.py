"""client/http_guard/checks.py without a server: what a generate / infer body may hold for each
Triton datatype, and that refusals name the input and the problem."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from client.http_guard.checks import (
    GuardError,
    check_body,
    check_generate,
    check_infer,
    check_values,
    parse_body,
)

# the slora model's generate inputs (a subset of model_repository/slora/config.pbtxt)
DATATYPES = {"text_input": "BYTES", "max_tokens": "INT32", "input_ids": "INT32",
             "seed": "UINT64", "temperature": "FP32", "ignore_eos": "BOOL"}
MIB = 1 << 20


def refused(body: object, match: str) -> None:
    with pytest.raises(GuardError, match=match) as info:
        check_generate(body, DATATYPES)
    assert str(info.value).startswith("INVALID_ARG: ") and info.value.status == 400


def test_generate_accepts_what_triton_reads_right() -> None:
    check_generate({"text_input": "Hi", "max_tokens": 2 ** 31 - 1, "input_ids": [0, 1, 2],
                    "seed": 2 ** 64 - 1, "temperature": 0.5, "ignore_eos": True,
                    "stream": False, "extra_parameter": {"not": "an input"}}, DATATYPES)
    check_generate({"temperature": 1, "input_ids": []}, DATATYPES)  # an int is a number


@pytest.mark.parametrize(("body", "match"), [
    ({"max_tokens": 4294967298}, r"'max_tokens': 4294967298 is out of range for INT32 "
                                 r"\[-2147483648, 2147483647\]"),
    ({"input_ids": [5, 2 ** 32 + 1]}, r"'input_ids': 4294967297 is out of range for INT32"),
    ({"input_ids": [-(2 ** 31) - 1]}, r"'input_ids': -2147483649 is out of range"),
    ({"seed": -1}, r"'seed': -1 is out of range for UINT64"),
    ({"temperature": 1e39}, r"'temperature': 1e\+39 is out of range for FP32"),
    ({"max_tokens": "four"}, r"'max_tokens': expected an integer for INT32, got the string"),
    ({"max_tokens": 4.0}, r"'max_tokens': expected an integer for INT32, got 4"),
    ({"max_tokens": True}, r"'max_tokens': expected an integer for INT32, got True"),
    ({"ignore_eos": 1}, r"'ignore_eos': expected a boolean for BOOL, got 1"),
    ({"text_input": 12}, r"'text_input': expected a string for BYTES, got 12"),
    ({"input_ids": [[1, 2]]}, r"'input_ids': expected a value or a flat list"),
    ({"text_input": {"a": 1}}, r"'text_input': expected a value or a flat list"),
    ([1, 2], r"request body must be a JSON object"),
])
def test_generate_refusals(body: object, match: str) -> None:
    refused(body, match)


def test_parse_body_bounds() -> None:
    assert parse_body(b'{"a": [1, 2]}', MIB) == {"a": [1, 2]}
    for raw, match in [(b'{"text_input": "Hi", ', "request body: not valid JSON"),
                       (b"[" * 40_000 + b"]" * 40_000, "request body: nested deeper than 32"),
                       (b'{"a": "\xff"}', "request body is not UTF-8"),
                       (b"1" * 50, "request body: an integer of 50 digits"),
                       (json.dumps({"s": "x" * 100}).encode(), "longer than 64 characters")]:
        with pytest.raises(GuardError, match=match):
            parse_body(raw, 64 if b"x" * 100 in raw else MIB)


def infer(inputs: object) -> dict:
    return {"inputs": inputs}


def test_infer_checks_data_against_the_requests_datatype() -> None:
    check_infer(infer([{"name": "max_tokens", "datatype": "INT32", "shape": [1, 2],
                        "data": [[1, 2]]},
                       {"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": 5}}]))
    with pytest.raises(GuardError, match=r"'max_tokens': 4294967298 is out of range for INT32"):
        check_infer(infer([{"name": "max_tokens", "datatype": "INT32", "shape": [1, 2],
                            "data": [[1, 4294967298]]}]))
    with pytest.raises(GuardError, match=r"'x': 256 is out of range for UINT8"):
        check_infer(infer([{"name": "x", "datatype": "UINT8", "shape": [2], "data": [0, 256]}]))
    for bad, match in [(infer(5), "'inputs': expected a list"),
                       (infer([7]), r"'inputs\[0\]': expected an object"),
                       (infer([{"name": 1, "datatype": "INT32", "shape": [1]}]),
                        r"'inputs\[0\]': 'name' and 'datatype' must be strings"),
                       (infer([{"name": "a", "datatype": "INT32", "shape": "1"}]),
                        r"'inputs\[0\].shape': expected a list"),
                       (infer([{"name": "a", "datatype": "INT32", "shape": [2 ** 63]}]),
                        r"'a.shape': 9223372036854775808 is out of range for INT64"),
                       ("x", "request body must be a JSON object")]:
        with pytest.raises(GuardError, match=match):
            check_infer(bad)


def test_the_one_bad_id_in_a_million_is_found() -> None:
    ids = list(range(1_000_000)) + [2 ** 31]
    with pytest.raises(GuardError, match="2147483648 is out of range for INT32"):
        check_values("input_ids", "INT32", ids)


@pytest.mark.parametrize(("raw", "action", "datatypes", "match"), [
    (b'{"max_tokens": "four"}', "generate", DATATYPES, "'max_tokens': expected an integer"),
    (b'{"max_tokens": "four"}', "generate_stream", DATATYPES, "'max_tokens': expected an"),
    (b'{"inputs": 5}', "infer", None, "'inputs': expected a list"),
    (b'{"a": ', None, None, "request body: not valid JSON"),
    (b'{"a": ', "generate", None, "request body: not valid JSON"),
])
def test_check_body_parses_then_checks_what_the_action_needs(raw: bytes, action: str | None,
                                                             datatypes: dict | None,
                                                             match: str) -> None:
    with pytest.raises(GuardError, match=match):
        check_body(raw, MIB, action, datatypes)


def test_check_body_without_datatypes_or_action_only_parses() -> None:
    wrong_type = b'{"max_tokens": "four"}'
    check_body(wrong_type, MIB, "generate", None)  # no such model: Triton answers that
    check_body(wrong_type, MIB, None, DATATYPES)  # not a model's infer / generate endpoint


def test_guard_error_survives_pickling() -> None:
    busy = GuardError("the guard is busy", 503, "UNAVAILABLE")
    copy = pickle.loads(pickle.dumps(busy))
    assert (str(copy), copy.status, copy.code) == ("UNAVAILABLE: the guard is busy", 503,
                                                   "UNAVAILABLE")


def test_guard_error_comes_back_from_a_worker_process() -> None:
    """What the proxy does for a big body: check_body in a spawned worker; its refusal comes
    back as the same GuardError (message, status)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        future = pool.submit(check_body, b'{"max_tokens": 4294967298}', MIB, "generate",
                             DATATYPES)
        with pytest.raises(GuardError) as info:
            future.result()
    assert str(info.value) == ("INVALID_ARG: invalid 'max_tokens': 4294967298 is out of range "
                               "for INT32 [-2147483648, 2147483647]")
    assert info.value.status == 400


STREAMING = {**DATATYPES, "stream": "BOOL", "sampling_parameters": "BYTES"}


@pytest.mark.parametrize(("body", "action", "by_default", "refuse"), [
    ({"text_input": "Hi"}, "generate", True, True),  # the model's default: streaming
    ({"text_input": "Hi", "stream": True}, "generate", False, True),
    ({"text_input": "Hi", "sampling_parameters": '{"stream": "yes"}'}, "generate", False, True),
    ({"text_input": "Hi", "stream": False}, "generate", True, False),
    ({"text_input": "Hi", "sampling_parameters": '{"stream": false}'}, "generate", True, False),
    ({"text_input": "Hi"}, "generate", False, False),
    ({"text_input": "Hi"}, "generate_stream", True, False),
    ({"text_input": "Hi", "sampling_parameters": '{"stream": "maybe"}'}, "generate", True,
     False),  # the model refuses what it cannot read, naming it
])
def test_a_streaming_generate_is_refused_before_it_runs(body: dict, action: str,
                                                        by_default: bool, refuse: bool) -> None:
    raw = json.dumps(body).encode()
    if refuse:
        with pytest.raises(GuardError, match="'stream' is on, but /generate takes exactly one"):
            check_body(raw, MIB, action, STREAMING, by_default)
    else:
        check_body(raw, MIB, action, STREAMING, by_default)
