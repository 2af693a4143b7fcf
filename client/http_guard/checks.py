"""What the guard refuses in a request body before Triton's HTTP frontend parses it.

Triton 2.51 (and, by reading, every release through 2.71) narrows a JSON integer into the
input's type with a C cast (`"max_tokens": 4294967298` reaches an INT32 input as 2) and
answers a JSON value of the wrong type with HTTP 500; deep nesting crashes it (input values
until 2.58, whole bodies until 2.69; README "Errors"). Every body goes through bounded_json
(slora_backend's one bounded parser: size, depth, integer digits); then generate and infer
bodies are checked against the inputs' datatypes: each value must have the JSON type the
datatype needs and, for integer and float datatypes, lie in its range; a /generate body must
not stream (Triton would fail it only after the model generated it all). `check_body` does all of
it synchronously and touches nothing but its arguments, so the proxy runs it inline for small
bodies and in a worker process for big ones (a GuardError is pickled back).
"""

from __future__ import annotations

from typing import Any

from slora_backend.bounded_json import JsonProblem, load_json
from slora_backend.errors import EngineError
from slora_backend.sampling_params import parse_bool

INT_RANGES = {
    "INT8": (-(1 << 7), (1 << 7) - 1), "INT16": (-(1 << 15), (1 << 15) - 1),
    "INT32": (-(1 << 31), (1 << 31) - 1), "INT64": (-(1 << 63), (1 << 63) - 1),
    "UINT8": (0, (1 << 8) - 1), "UINT16": (0, (1 << 16) - 1),
    "UINT32": (0, (1 << 32) - 1), "UINT64": (0, (1 << 64) - 1),
}
FLOAT_MAX = {"FP16": 65504.0, "BF16": 3.3895313892515355e38, "FP32": 3.4028234663852886e38,
             "FP64": 1.7976931348623157e308}
JSON_TYPES = {"BOOL": ((bool,), "a boolean"), "BYTES": ((str,), "a string"),
              **{t: ((int,), "an integer") for t in INT_RANGES},
              **{t: ((int, float), "a number") for t in FLOAT_MAX}}


class GuardError(ValueError):
    """A refused request: HTTP `status` and a message in Triton's style (`code` prefix)."""

    def __init__(self, message: str, status: int = 400, code: str = "INVALID_ARG") -> None:
        super().__init__(f"{code}: {message}")
        self.message, self.status, self.code = message, status, code

    def __reduce__(self) -> tuple[type[GuardError], tuple[str, int, str]]:
        # the default calls GuardError(*self.args), args being the prefixed text: the copy
        # that comes back from a check worker would read "INVALID_ARG: INVALID_ARG: ..."
        return type(self), (self.message, self.status, self.code)


def check_body(json_part: bytes, max_bytes: int, action: str | None,
               datatypes: dict[str, str] | None, streams_by_default: bool = False) -> None:
    """The whole check of a request body's JSON; GuardError for the first problem.
    `action`: infer, generate or generate_stream for a model's endpoint, None elsewhere (parse
    only); `datatypes`: the model's inputs for generate (None: unknown model, parse only);
    `streams_by_default`: the model streams unless a request says `"stream": false`."""
    parsed = parse_body(json_part, max_bytes)
    if action == "infer":
        check_infer(parsed)
    elif action is not None and datatypes is not None:
        check_generate(parsed, datatypes)
        if action == "generate" and "stream" in datatypes:
            check_one_response(parsed, max_bytes, streams_by_default)


def check_one_response(body: dict[str, Any], max_bytes: int, streams_by_default: bool) -> None:
    """/generate takes exactly one response: Triton fails a streaming request only after the
    model generated all of it (README "HTTP"), so a body whose `stream` is on (the input,
    else the `sampling_parameters` JSON key, as the model reads them, else the model's
    default) is refused before it costs anything. A value the model would refuse is left to
    the model."""
    stream: Any = body.get("stream")
    if stream is None:
        stream = _sampling_key(body.get("sampling_parameters"), "stream", max_bytes)
    try:
        on = streams_by_default if stream is None else parse_bool("stream", stream)
    except EngineError:
        return
    if on:
        raise GuardError("'stream' is on, but /generate takes exactly one response: send "
                         '"stream": false, or use /generate_stream')


def _sampling_key(text: Any, key: str, max_bytes: int) -> Any:
    """`key` of a sampling_parameters JSON string (None if absent or not readable)."""
    if not isinstance(text, str):
        return None
    try:
        data = load_json(text, max_bytes)
    except JsonProblem:
        return None
    return data.get(key) if isinstance(data, dict) else None


def parse_body(raw: bytes, max_bytes: int) -> Any:
    """The body as JSON, bounded (bounded_json); GuardError naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GuardError(f"request body is not UTF-8: {exc}") from None
    try:
        return load_json(text, max_bytes)
    except JsonProblem as exc:
        raise GuardError(f"request body: {exc}") from None


def check_values(name: str, datatype: str, values: list[Any]) -> None:
    """Every value of input `name` fits `datatype` (JSON type, then range)."""
    if datatype not in JSON_TYPES or not values:
        return  # a datatype Triton itself refuses, or nothing to check
    allowed, what = JSON_TYPES[datatype]
    types = set(map(type, values))
    if not types <= set(allowed):  # bool is not int here: type(), not isinstance()
        bad = next(v for v in values if type(v) not in allowed)
        raise GuardError(f"invalid '{name}': expected {what} for {datatype}, got "
                         f"{_show(bad)}")
    if datatype in INT_RANGES:
        low, high = INT_RANGES[datatype]
        _check_range(name, datatype, values, low, high)
    elif datatype in FLOAT_MAX:
        limit = FLOAT_MAX[datatype]
        _check_range(name, datatype, values, -limit, limit)


def _check_range(name: str, datatype: str, values: list[Any], low: float, high: float) -> None:
    smallest, largest = min(values), max(values)  # C speed over a million ids
    if smallest < low or largest > high:
        bad = smallest if smallest < low else largest
        raise GuardError(f"invalid '{name}': {_show(bad)} is out of range for {datatype} "
                         f"[{_show(low)}, {_show(high)}]")


def _show(value: Any) -> str:
    """A value for a message: short, strings marked as such, floats in %g form."""
    if isinstance(value, str):
        text = f"the string {value!r}"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_generate(body: Any, datatypes: dict[str, str]) -> None:
    """A /generate[_stream] body: a JSON object whose keys that name model inputs hold a value
    or a flat list of values of that input's datatype (Triton reads nothing deeper)."""
    if not isinstance(body, dict):
        raise GuardError("request body must be a JSON object")
    for name, value in body.items():
        if name not in datatypes:
            continue  # a request parameter: Triton accepts scalars, refuses the rest with 400
        values = value if isinstance(value, list) else [value]
        if any(type(v) in (list, dict) for v in values):
            raise GuardError(f"invalid '{name}': expected a value or a flat list of values")
        check_values(name, datatypes[name], values)


def check_infer(header: Any) -> None:
    """An /infer JSON (or the JSON header before binary data): `inputs` is a list of objects
    with a string name and datatype, an integer shape, and `data` that fits the datatype."""
    if not isinstance(header, dict):
        raise GuardError("request body must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise GuardError("invalid 'inputs': expected a list of input objects")
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise GuardError(f"invalid 'inputs[{i}]': expected an object")
        name, datatype = spec.get("name"), spec.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise GuardError(f"invalid 'inputs[{i}]': 'name' and 'datatype' must be strings")
        shape = spec.get("shape")
        if not isinstance(shape, list):
            raise GuardError(f"invalid 'inputs[{i}].shape': expected a list of integers")
        check_values(f"{name}.shape", "INT64", shape)
        if "data" in spec:
            check_values(name, datatype, _leaves(spec["data"]))


def _leaves(data: Any) -> list[Any]:
    """The scalars of nested lists (depth already bounded by bounded_json), in order."""
    if not isinstance(data, list):
        return [data]
    if not any(type(v) is list for v in data):
        return data
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out
