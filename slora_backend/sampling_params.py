"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slora_backend.errors import EngineError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**64 - 1
MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's top_logprobs bound, vLLM's default

# JSON keys of Triton's vllm_backend `sampling_parameters` that are not sampling parameters:
# the Triton model reads them itself, from_dict leaves them alone.
PASSTHROUGH_KEYS = frozenset(
    {"lora_name", "adapter_id", "stream", "chat", "exclude_input_in_output", "return_finish_reason"}
)
# vllm_backend accepts numbers and booleans as strings too; these say how to convert them.
_INT_KEYS = frozenset({"max_tokens", "top_k", "seed", "logprobs"})
# OpenAI fields that Triton's OpenAI frontend always puts in sampling_parameters (its
# defaults): accepted at these neutral values only, since the engine does not implement them
NEUTRAL_KEYS = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0}
_FLOAT_KEYS = frozenset({"temperature", "top_p"})
_BOOL_KEYS = frozenset({"ignore_eos"})
_TRUE_STRINGS = frozenset({"true", "1", "yes"})
_FALSE_STRINGS = frozenset({"false", "0", "no"})


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError.invalid(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise EngineError.invalid(name, f"must be {bound}, got {value}")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EngineError.invalid(name, f"must be a finite number, got {value!r}")


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 = greedy; top_k 0 or -1 = off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's `logprobs`: None = none; k = the sampled token's logprob and the k most likely
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise EngineError.invalid("temperature", f"must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise EngineError.invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, -1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        self._check_stop()
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise EngineError.invalid("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")

    def _check_stop(self) -> None:
        if not isinstance(self.stop, list):
            raise EngineError.invalid("stop", f"must be a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise EngineError.invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise EngineError.invalid(
                    "stop", f"each must be a non-empty string of <= {MAX_STOP_STRING_CHARS} chars"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from vllm_backend-style JSON keys; unknown keys are refused by name."""
        if not isinstance(d, dict):
            raise EngineError.invalid("sampling_parameters", "must be a JSON object")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in PASSTHROUGH_KEYS:
                continue
            if key in NEUTRAL_KEYS:
                _check_neutral(key, value)
                continue
            if key not in _INT_KEYS | _FLOAT_KEYS | _BOOL_KEYS | {"stop"}:
                raise EngineError.invalid(key, "unknown sampling parameter")
            kwargs[key] = _convert(key, value)
        return cls(**kwargs)


def _check_neutral(key: str, value: Any) -> None:
    neutral = NEUTRAL_KEYS[key]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != neutral:
        raise EngineError.invalid(key, f"only {neutral} is supported, got {value!r}")


def _convert(key: str, value: Any) -> Any:
    """vllm_backend clients send numbers/booleans as strings too; accept both."""
    if key == "stop":
        return [value] if isinstance(value, str) else value
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if key in _INT_KEYS:
            return int(text)
        if key in _FLOAT_KEYS:
            return float(text)
    except ValueError:
        raise EngineError.invalid(key, f"not a number: {value!r}") from None
    return parse_bool(key, value)


def parse_bool(key: str, value: Any) -> bool:
    """A JSON boolean, or a string true/false/1/0/yes/no (any case): INVALID_ARG otherwise."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE_STRINGS:
        return True
    if text in _FALSE_STRINGS:
        return False
    raise EngineError.invalid(key, f"must be a boolean, got {value!r}")
