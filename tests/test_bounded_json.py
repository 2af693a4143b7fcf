"""slora_backend/bounded_json.py: the bounds hold at their edges (depth, integer digits, size),
bad JSON is a JsonProblem, and a million-id list takes the fast path (no per-integer hook)."""

from __future__ import annotations

import json

import pytest

from slora_backend import bounded_json
from slora_backend.bounded_json import MAX_INT_DIGITS, MAX_JSON_DEPTH, JsonProblem, load_json

BIG = 1 << 26


@pytest.mark.parametrize(("inner", "levels"), [("", 0), ("1", 1), ("{}", 1), ('{"a": 1}', 2)])
def test_depth_bound_counts_every_level(inner: str, levels: int) -> None:
    """The top level is depth 1; a scalar or an empty container counts as its own level."""
    fits = MAX_JSON_DEPTH - levels  # lists around `inner` that still fit the bound
    assert load_json("[" * fits + inner + "]" * fits, BIG) is not None
    with pytest.raises(JsonProblem, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        load_json("[" * (fits + 1) + inner + "]" * (fits + 1), BIG)


def test_deep_nesting_far_beyond_the_recursion_limit() -> None:
    with pytest.raises(JsonProblem, match="nested deeper"):
        load_json("[" * 100_000 + "]" * 100_000, BIG)
    with pytest.raises(JsonProblem, match="nested deeper"):
        load_json('{"a":' * 50_000 + "1" + "}" * 50_000, BIG)


def test_integer_digits_bound_and_digits_inside_strings() -> None:
    assert load_json("9" * MAX_INT_DIGITS, BIG) == int("9" * MAX_INT_DIGITS)
    with pytest.raises(JsonProblem, match=f"integer of {MAX_INT_DIGITS + 1} digits"):
        load_json("[1, " + "9" * (MAX_INT_DIGITS + 1) + "]", BIG)
    with pytest.raises(JsonProblem, match="digits"):
        load_json("9" * 5000, BIG)  # beyond Python's own 4300-digit limit: the same refusal
    long_digits = "7" * 100
    assert load_json(json.dumps({"s": long_digits}), BIG) == {"s": long_digits}


def test_size_and_syntax() -> None:
    with pytest.raises(JsonProblem, match="longer than 10 characters"):
        load_json("[" + "1," * 10 + "1]", 10)
    for bad in ("{", "[1,]", "{'a': 1}", "", "NaN-"):
        with pytest.raises(JsonProblem, match="not valid JSON"):
            load_json(bad, BIG)


def test_a_million_ids_skip_the_per_integer_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bounded_json, "_parse_int", lambda text: calls.append(text))
    ids = list(range(1_000_000))
    assert load_json(json.dumps({"input_ids": ids}), BIG) == {"input_ids": ids}
    assert calls == []
