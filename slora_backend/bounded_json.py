"""The one place that parses untrusted JSON (sampling_parameters, chat messages, adapter configs).

Python's json module raises RecursionError for deep nesting and ValueError for integers of more
than 4300 digits, and its cost grows with the text: this bounds size, depth and integer length
and turns every failure into a `JsonProblem` (a ValueError) that the caller names.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 32  # the deepest legitimate document here (chat messages) is 3 levels deep
MAX_INT_DIGITS = 40  # a seed (< 2**64) has at most 20 digits; a sign and slack on top
# only a text with a longer run of digits can hold a too-long integer: the per-integer hook (a
# Python call per number, seconds for a million input ids) runs only then. The run is found at
# C speed (digits -> "0", the rest -> " ", then a substring search; a regex took 120 ms on the
# 9 MB of 2^20 ids, json.loads itself 90 ms)
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)
_CONTAINERS = (dict, list)


class JsonProblem(ValueError):
    """Why a JSON text was refused; the caller adds which input or file it was."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonProblem(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _has_long_digit_run(text: str) -> bool:
    return _LONG_RUN in text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZEROS)


def _check_depth(value: Any) -> None:
    """Iterative (the parse succeeded below the recursion limit, but deeper than we accept).
    The top level is depth 1, a child one deeper than its container. Only containers are
    visited, and a list of scalars is scanned at C speed (`map(type, ...)`)."""
    stack = [(value, 1)] if type(value) in _CONTAINERS else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if type(item) is dict else item
        if not children:
            continue
        if depth >= MAX_JSON_DEPTH:  # its children are deeper than the bound
            raise JsonProblem(f"nested deeper than {MAX_JSON_DEPTH} levels")
        types = set(map(type, children))
        if dict in types or list in types:
            stack.extend((child, depth + 1) for child in children
                         if type(child) in _CONTAINERS)


def load_json(text: str, max_chars: int) -> Any:
    """Parse `text`; JsonProblem for text over `max_chars`, bad JSON, deep nesting, huge ints."""
    if len(text) > max_chars:
        raise JsonProblem(f"longer than {max_chars} characters ({len(text)})")
    parse_int = _parse_int if _has_long_digit_run(text) else None
    try:
        value = json.loads(text, parse_int=parse_int)
    except RecursionError:
        raise JsonProblem(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except JsonProblem:
        raise
    except ValueError as exc:  # JSONDecodeError, or a number Python refuses
        raise JsonProblem(f"not valid JSON: {exc}") from None
    _check_depth(value)
    return value
