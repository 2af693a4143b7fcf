"""Triton request parsing for the `slora` model (model_repository/slora/1/model.py).

Kept free of `triton_python_backend_utils` so that it imports anywhere: the model passes a
getter that returns an input tensor as a numpy array (or None when the input is absent).
Every refusal is an EngineError INVALID_ARG naming the offending input / JSON key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from slora_backend.bounded_json import JsonProblem, load_json
from slora_backend.errors import EngineError
from slora_backend.logprobs import TokenLogprobs
from slora_backend.sampling_params import SamplingParams, parse_bool

InputGetter = Callable[[str], "np.ndarray | None"]

# Inputs that map 1:1 onto SamplingParams fields (tensor inputs win over sampling_parameters).
SCALAR_SAMPLING_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
# `command` values (a request with a command and no prompt is a control request).
COMMAND_LIST_ADAPTERS = "list_adapters"
COMMANDS = (COMMAND_LIST_ADAPTERS,)
CHAT_ROLES = ("system", "user", "assistant")
# Defaults of the boolean inputs (documented in README "Interface").
DEFAULT_STREAM = True
DEFAULT_EXCLUDE_INPUT = True
DEFAULT_CHAT = False
# vllm_backend's optional output flags (Triton's OpenAI frontend sends them)
RETURN_FLAGS = ("return_finish_reason", "return_cumulative_logprob", "return_logprobs",
                "return_num_input_tokens", "return_num_output_tokens")
MAX_SAMPLING_JSON_CHARS = 1 << 16  # sampling_parameters: a few keys and <= 16 stop strings
MAX_CHAT_JSON_CHARS = 1 << 23  # chat messages; the engine bounds the prompt by tokens after
# more token ids than any context this server can hold; bounds the conversion to Python ints
MAX_INPUT_IDS = 1 << 20
# where a request may name its adapter: the `adapter_id` input, then these sampling_parameters keys
ADAPTER_JSON_KEYS = ("adapter_id", "lora_name")
# engine argument -> the Triton input a client sent it as (errors name what the client sent)
ENGINE_FIELD_INPUTS = {"prompt_token_ids": "input_ids", "prompt": "text_input"}


@dataclass
class ParsedRequest:
    """A generation request, validated and ready for EngineLoop.add_request."""

    prompt: str | list[dict[str, str]] | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    adapter_id: str | None
    stream: bool = DEFAULT_STREAM
    exclude_input_in_output: bool = DEFAULT_EXCLUDE_INPUT
    # text put before the completion when exclude_input_in_output is false
    echo_text: str = ""
    # RETURN_FLAGS given true; return_logprobs is also implied by a `logprobs` JSON key
    flags: frozenset[str] = frozenset()


@dataclass
class ParsedCommand:
    """A control request (no generation): e.g. `list_adapters`."""

    command: str


def _one(get: InputGetter, name: str) -> Any | None:
    """The single element of a [1]-shaped input, or None when absent."""
    arr = get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise EngineError.invalid(name, f"expected exactly one element, got {flat.size}")
    return flat[0]


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EngineError.invalid(name, f"not valid UTF-8: {exc}") from None
    if isinstance(value, str):
        return value
    raise EngineError.invalid(name, f"expected a UTF-8 string, got {type(value).__name__}")


def _one_text(get: InputGetter, name: str) -> str | None:
    value = _one(get, name)
    return None if value is None else _text(name, value)


def _one_bool(get: InputGetter, name: str) -> bool | None:
    value = _one(get, name)
    return None if value is None else bool(value)


def _python_scalar(name: str, value: Any) -> Any:
    """numpy scalar -> plain Python (SamplingParams checks types strictly)."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise EngineError.invalid(name, f"unexpected value {value!r}")


def _parse_json(name: str, text: str, max_chars: int) -> Any:
    try:
        return load_json(text, max_chars)
    except JsonProblem as exc:
        raise EngineError.invalid(name, str(exc)) from None


def _sampling_json(get: InputGetter) -> dict[str, Any]:
    text = _one_text(get, "sampling_parameters")
    if text is None or not text.strip():
        return {}
    data = _parse_json("sampling_parameters", text, MAX_SAMPLING_JSON_CHARS)
    if not isinstance(data, dict):
        raise EngineError.invalid("sampling_parameters", "must be a JSON object")
    return data


def _json_bool(data: dict[str, Any], key: str) -> bool | None:
    if key not in data:
        return None
    return parse_bool(key, data[key])


def _adapter_id(get: InputGetter, data: dict[str, Any]) -> str | None:
    """The adapter named by the `adapter_id` input and/or the `adapter_id` / `lora_name` JSON
    keys. Empty or absent everywhere = base model; names that differ are refused, so a request
    that names an adapter is never served by another one (or by the base model)."""
    named = {"adapter_id": _one_text(get, "adapter_id") or None}
    for key in ADAPTER_JSON_KEYS:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise EngineError.invalid(key, f"must be a string, got {value!r}")
        named[f"sampling_parameters.{key}"] = value or None
    given = {where: name for where, name in named.items() if name is not None}
    if len(set(given.values())) > 1:
        raise EngineError.invalid("adapter_id", f"conflicting adapter names: {given}")
    return next(iter(given.values()), None)


def _stop_strings(get: InputGetter) -> list[str] | None:
    arr = get("stop")
    if arr is None:
        return None
    return [_text("stop", v) for v in np.asarray(arr).reshape(-1)]


def _sampling_params(get: InputGetter, data: dict[str, Any]) -> SamplingParams:
    merged = dict(data)
    for name in SCALAR_SAMPLING_INPUTS:
        value = _one(get, name)
        if value is not None:
            merged[name] = _python_scalar(name, value)
    stop = _stop_strings(get)
    if stop is not None:
        merged["stop"] = stop
    return SamplingParams.from_dict(merged)


def _chat_messages(text: str) -> list[dict[str, str]]:
    """A chat prompt: a JSON list of {role, content} messages, or plain text = one user turn."""
    stripped = text.strip()
    if not stripped.startswith("["):
        return [{"role": "user", "content": text}]
    messages = _parse_json("text_input", stripped, MAX_CHAT_JSON_CHARS)
    if not isinstance(messages, list) or not messages:
        raise EngineError.invalid("text_input", "chat messages must be a non-empty JSON list")
    for i, msg in enumerate(messages):
        ok = (
            isinstance(msg, dict)
            and set(msg) == {"role", "content"}
            and msg["role"] in CHAT_ROLES
            and isinstance(msg["content"], str)
        )
        if not ok:
            raise EngineError.invalid(
                "text_input",
                f"chat message {i} must be {{\"role\": one of {list(CHAT_ROLES)}, "
                f"\"content\": string}}, got {msg!r}",
            )
    return messages


def _input_ids(get: InputGetter) -> list[int] | None:
    arr = get("input_ids")
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size == 0:
        raise EngineError.invalid("input_ids", "must not be empty")
    if flat.size > MAX_INPUT_IDS:  # checked before any per-id work
        raise EngineError.invalid("input_ids", f"more than {MAX_INPUT_IDS} token ids")
    if flat.min() < 0:
        raise EngineError.invalid("input_ids", "token ids must be >= 0")
    return flat.astype(np.int64).tolist()


def client_error(exc: EngineError) -> EngineError:
    """An engine refusal as the client should read it: naming the Triton input the client sent
    (`input_ids`, `text_input`), not the engine's argument (`prompt_token_ids`, `prompt`)."""
    return exc.renamed(ENGINE_FIELD_INPUTS)


def parse_command(get: InputGetter) -> ParsedCommand | None:
    """The control command of a request, or None for a generation request."""
    command = _one_text(get, "command")
    if command is None or not command.strip():
        return None
    command = command.strip()
    if command not in COMMANDS:
        known = list(COMMANDS)
        raise EngineError.invalid("command", f"unknown command {command!r}; known: {known}")
    return ParsedCommand(command)


def parse_request(get: InputGetter) -> ParsedRequest:
    """Validate a generation request's inputs (see README "Interface")."""
    data = _sampling_json(get)
    text = _one_text(get, "text_input")
    ids = _input_ids(get)
    if text is not None and ids is not None:
        raise EngineError.invalid("input_ids", "give either text_input or input_ids, not both")
    if ids is None and (text is None or not text):
        raise EngineError.invalid("text_input", "a prompt is required (text_input or input_ids)")
    chat = _one_bool(get, "chat")
    if chat is None:
        chat = _json_bool(data, "chat")
    stream = _one_bool(get, "stream")
    if stream is None:
        stream = _json_bool(data, "stream")
    exclude = _one_bool(get, "exclude_input_in_output")
    if exclude is None:
        exclude = _json_bool(data, "exclude_input_in_output")
    if chat and ids is not None:
        raise EngineError.invalid("chat", "chat needs text_input (messages), not input_ids")
    prompt: str | list[dict[str, str]] | None = text
    if chat and text is not None:
        prompt = _chat_messages(text)
    exclude = DEFAULT_EXCLUDE_INPUT if exclude is None else exclude
    flags = return_flags(get, data)
    return ParsedRequest(
        prompt=prompt if ids is None else None,
        prompt_token_ids=ids,
        params=_with_logprobs(_sampling_params(get, data), flags),
        adapter_id=_adapter_id(get, data),
        stream=DEFAULT_STREAM if stream is None else stream,
        exclude_input_in_output=exclude,
        echo_text="" if exclude or text is None else text,
        flags=flags,
    )


def return_flags(get: InputGetter, data: dict[str, Any]) -> frozenset[str]:
    """The RETURN_FLAGS inputs that are true. A `logprobs` key in sampling_parameters asks for
    the `logprobs` output too, unless the `return_logprobs` input says false."""
    flags = {name for name in RETURN_FLAGS if _one_bool(get, name)}
    if "logprobs" in data and _one(get, "return_logprobs") is None:
        flags.add("return_logprobs")
    return frozenset(flags)


def _with_logprobs(params: SamplingParams, flags: frozenset[str]) -> SamplingParams:
    """The logprob outputs need the sampled tokens' logprobs (no alternatives unless asked)."""
    wanted = {"return_logprobs", "return_cumulative_logprob"} & flags
    if wanted and params.logprobs is None:
        return dataclasses.replace(params, logprobs=0)
    return params


class OutputLike(Protocol):
    """What response_tensors reads of an engine RequestOutput."""

    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    cumulative_logprob: float | None


def logprobs_json(logprobs: list[TokenLogprobs], decode: Callable[[int], str]) -> str:
    """vllm_backend's `logprobs` output: per token {token_id: {logprob, rank, decoded_token}}
    with the sampled token (its own rank) and the alternatives (ranks 1..k)."""
    positions = []
    for lp in logprobs:
        entry = {str(tok): {"logprob": value, "rank": rank, "decoded_token": decode(tok)}
                 for rank, (tok, value) in enumerate(lp.top, start=1)}
        entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": lp.rank,
                                            "decoded_token": decode(lp.token_id)})
        positions.append(entry)
    return json.dumps(positions)


def response_tensors(req: ParsedRequest, out: OutputLike, text: str, token_ids: list[int],
                     logprobs: list[TokenLogprobs] | None,
                     decode: Callable[[int], str]) -> list[tuple[str, np.ndarray]]:
    """One response's output tensors (README "Outputs"): `text`, `token_ids` and `logprobs`
    are what this response carries (the new ones when streaming, all of them at the end)."""
    # vllm_backend counts the tokens of each response (its clients sum them over a stream);
    # without its flag, num_output_tokens is this model's running total
    num_output = len(token_ids) if "return_num_output_tokens" in req.flags \
        else out.num_output_tokens
    tensors = [
        ("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        ("output_ids", np.array(token_ids, dtype=np.int32)),
        ("num_input_tokens", np.array([out.num_input_tokens], dtype=np.uint32)),
        ("num_output_tokens", np.array([num_output], dtype=np.uint32)),
    ]
    if out.finished:
        tensors.append(("finish_reason",
                        np.array([(out.finish_reason or "").encode()], dtype=np.object_)))
    if "return_logprobs" in req.flags:
        body = logprobs_json(logprobs or [], decode)
        tensors.append(("logprobs", np.array([body.encode("utf-8")], dtype=np.object_)))
    if "return_cumulative_logprob" in req.flags:
        total = out.cumulative_logprob or 0.0
        tensors.append(("cumulative_logprob", np.array([total], dtype=np.float32)))
    return tensors
