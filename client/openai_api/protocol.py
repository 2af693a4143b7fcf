"""OpenAI request bodies -> the `slora` model's Triton inputs, validated before anything is sent.

Bodies are bounded (size, JSON nesting depth) and every refusal is an ApiError with OpenAI's
error shape, naming the parameter. Values the engine checks itself (stop string lengths, the
model length) are left to it; its INVALID_ARG message comes back as a 400 naming the input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 1 << 20  # 1 MiB: prompts are bounded by the model length long before that
MAX_JSON_DEPTH = 16  # the deepest legitimate body: {"messages": [{"content": [{...}]}]}
MAX_TOP_LOGPROBS = 20  # chat top_logprobs (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # completions logprobs (OpenAI's bound)
MAX_TEMPERATURE = 2.0  # OpenAI's bound
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# fields the OpenAI SDK may send that change nothing here
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# fields accepted only at OpenAI's neutral value (the engine does not implement them)
NEUTRAL_FIELDS = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "best_of": 1}
# ignore_eos: an extension that vLLM's and Triton's OpenAI servers accept too
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop",
                           "stream", "stream_options", "logit_bias", "ignore_eos"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"invalid '{param}': {message}", param, "invalid_value")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, refused with 400 when too big, malformed or too deep."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(400, f"request body over {MAX_BODY_BYTES} bytes", None, "body_too_large")
    if _nesting(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None,
                       "json_too_deep")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", None, "invalid_json")
    return data


def _nesting(raw: bytes) -> int:
    """Deepest [ / { nesting outside strings, found without parsing (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


@dataclass
class GenerationRequest:
    """A validated OpenAI request: the Triton inputs plus what the response needs."""

    model: str
    adapter_id: str | None
    inputs: dict[str, Any]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs in the response
    chat: bool


def _int(data: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or \
            (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(key, f"must be an integer {bound}, got {value!r}")
    return value


def _number(data: dict[str, Any], key: str, lo: float, hi: float, lo_open: bool) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad(key, f"must be a number in {interval}, got {value!r}")
    return float(value)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"must be a boolean, got {value!r}")
    return value


def _check_fields(data: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in data.items():
        if key in allowed or key in IGNORED_FIELDS:
            continue
        if key in NEUTRAL_FIELDS:
            if value is not None and value != NEUTRAL_FIELDS[key]:
                raise bad(key, f"only {NEUTRAL_FIELDS[key]} is supported, got {value!r}")
            continue
        raise ApiError(400, f"unsupported parameter '{key}'", key, "unsupported_parameter")
    if data.get("logit_bias"):
        raise bad("logit_bias", "is not supported")


def _stop(data: dict[str, Any]) -> list[str] | None:
    stop = data.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "must be a string or a list of strings")
    return stop or None


def _stream_options(data: dict[str, Any], stream: bool) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "must be an object with include_usage")
    return _bool(options, "include_usage")


def _sampling_inputs(data: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {"max_tokens": max_tokens}
    temperature = _number(data, "temperature", 0.0, MAX_TEMPERATURE, lo_open=False)
    top_p = _number(data, "top_p", 0.0, 1.0, lo_open=True)
    seed = _int(data, "seed", 0)
    ignore_eos = _bool(data, "ignore_eos") or None
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed),
                        ("stop", _stop(data)), ("ignore_eos", ignore_eos)):
        if value is not None:
            inputs[name] = value
    return inputs


def _model(data: dict[str, Any], base_id: str) -> tuple[str, str | None]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "a model id is required (GET /v1/models lists them)")
    return model, None if model == base_id else model


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        role = ROLE_ALIASES.get(role, role)
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {list(CHAT_ROLES)}")
        out.append({"role": role, "content": _content(msg.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def chat_request(data: dict[str, Any], base_id: str, default_max_tokens: int
                 ) -> GenerationRequest:
    _check_fields(data, CHAT_FIELDS)
    model, adapter = _model(data, base_id)
    messages = _messages(data)
    max_tokens = _int(data, "max_completion_tokens", 1) or _int(data, "max_tokens", 1)
    stream = _bool(data, "stream")
    top = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not _bool(data, "logprobs"):
        raise bad("top_logprobs", "needs logprobs: true")
    top_logprobs = (top or 0) if _bool(data, "logprobs") else None
    inputs = {"text_input": json.dumps(messages), "chat": True,
              **_sampling_inputs(data, max_tokens or default_max_tokens)}
    return _finish(inputs, model, adapter, stream, _stream_options(data, stream),
                   top_logprobs, chat=True)


def completion_request(data: dict[str, Any], base_id: str) -> GenerationRequest:
    _check_fields(data, COMPLETION_FIELDS)
    model, adapter = _model(data, base_id)
    if _bool(data, "echo"):
        raise bad("echo", "is not supported")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    inputs: dict[str, Any]
    if isinstance(prompt, str) and prompt:
        inputs = {"text_input": prompt}
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        inputs = {"input_ids": prompt}
    else:
        raise bad("prompt", "must be a non-empty string, a list of one string, or token ids")
    max_tokens = _int(data, "max_tokens", 1) or DEFAULT_COMPLETION_MAX_TOKENS
    inputs.update(_sampling_inputs(data, max_tokens))
    stream = _bool(data, "stream")
    top_logprobs = _int(data, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return _finish(inputs, model, adapter, stream, _stream_options(data, stream),
                   top_logprobs, chat=False)


def _finish(inputs: dict[str, Any], model: str, adapter: str | None, stream: bool,
            include_usage: bool, top_logprobs: int | None, chat: bool) -> GenerationRequest:
    inputs["stream"] = stream
    if adapter is not None:
        inputs["adapter_id"] = adapter
    if top_logprobs is not None:
        inputs["sampling_parameters"] = json.dumps({"logprobs": top_logprobs})
    return GenerationRequest(model, adapter, inputs, stream, include_usage, top_logprobs, chat)
