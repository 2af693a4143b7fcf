"""Validation of PEFT LoRA adapters against the base model, before anything is allocated.

Every refusal is an EngineError (INVALID_ARG, or NOT_FOUND for a missing adapter) whose message
names the adapter and the problem, so a client can fix its adapter without reading server logs.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex

from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model.spec import MODULE_ORDER, ModelSpec

MAX_ADAPTER_ID_LEN = 128
# first char alphanumeric: rules out "", ".", "..", hidden folders and leading dashes
ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KiB; refuse to parse anything huge
# a target_modules regex runs on the request path against every module name: its length and
# its total matching time are bounded (a backtracking regex doubles its time per repetition)
MAX_TARGET_REGEX_CHARS = 4096
TARGET_REGEX_BUDGET_S = 0.05

MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
ALL_LINEAR = "all-linear"  # PEFT shorthand: every linear layer except the output layer
EMBED_MODULE = "model.embed_tokens"
LM_HEAD_MODULE = "lm_head"
# PEFT's on-disk key of a LoRA weight (the adapter name is stripped by save_pretrained)
LORA_KEY_RE = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight"
)
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# PEFT features this server does not implement: config field -> what it is. A field is refused
# when it is set to anything but its "off" value (None / False / empty).
UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "layer-selective LoRA",
    "layers_pattern": "layer-selective LoRA",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "fan_in_fan_out": "transposed (Conv1D-style) weights",
    "lora_bias": "LoRA bias terms",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA",
    "exclude_modules": "module exclusion lists",
    "megatron_config": "Megatron parallel layers",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "loftq_config": "LoftQ (adapter made for a quantized base)",
}
# initialisations that also rewrite the base weights: the adapter is wrong on the original base
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraSettings:
    """What the adapter config says, after validation."""

    rank: int
    alpha: float
    use_rslora: bool
    modules: tuple[str, ...]  # subset of MODULE_ORDER, in that order

    @property
    def scale(self) -> float:
        """alpha/sqrt(r) for rsLoRA, else alpha/r (PEFT's scaling)."""
        denom = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / denom


def refuse(adapter_id: str, problem: str) -> EngineError:
    """The INVALID_ARG error for a bad adapter."""
    return EngineError(ErrorCode.INVALID_ARG, f"adapter '{adapter_id}': {problem}")


def check_adapter_id(adapter_id: Any) -> str:
    """An adapter id is a plain folder name: bounded length and charset, no path parts."""
    if not isinstance(adapter_id, str):
        raise EngineError.invalid("adapter_id",
                                  f"must be a string, got {type(adapter_id).__name__}")
    if len(adapter_id) > MAX_ADAPTER_ID_LEN:
        raise EngineError.invalid(
            "adapter_id", f"longer than {MAX_ADAPTER_ID_LEN} characters: {adapter_id[:32]!r}...")
    if not ADAPTER_ID_RE.fullmatch(adapter_id) or ".." in adapter_id:
        raise EngineError.invalid(
            "adapter_id",
            f"{adapter_id!r} must be a folder name of letters, digits, '.', '_', '-' "
            "starting with a letter or digit (no path separators, no '..')")
    return adapter_id


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _check_unsupported(adapter_id: str, cfg: Mapping[str, Any]) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise refuse(adapter_id, f"peft_type {peft_type!r} is not supported (only 'LORA')")
    for field, what in UNSUPPORTED_FIELDS.items():
        if not _is_off(cfg.get(field)):
            raise refuse(adapter_id, f"'{field}' ({what}) is not supported, got {cfg[field]!r}")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise refuse(adapter_id, f"bias={bias!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise refuse(adapter_id, f"init_lora_weights={init!r} modifies the base model weights "
                                 "and is not supported (convert the adapter to plain LoRA)")


def _check_rank_alpha(adapter_id: str, cfg: Mapping[str, Any], max_rank: int) -> tuple[int, float]:
    rank = cfg.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise refuse(adapter_id, f"'r' must be an integer >= 1, got {rank!r}")
    if rank > max_rank:
        raise refuse(adapter_id, f"rank r={rank} exceeds the server's max_rank={max_rank}")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise refuse(adapter_id, f"'lora_alpha' must be a finite number, got {alpha!r}")
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise refuse(adapter_id, f"'use_rslora' must be true or false, got {use_rslora!r}")
    return rank, float(alpha)


@lru_cache(maxsize=16)
def _base_module_names(num_layers: int) -> tuple[tuple[str, tuple[int, str] | None], ...]:
    """Every named module of an HF Llama, with (layer, module) for the LoRA-able projections."""
    names: list[tuple[str, tuple[int, str] | None]] = [
        ("model", None), (EMBED_MODULE, None), ("model.layers", None), ("model.norm", None),
        ("model.rotary_emb", None), (LM_HEAD_MODULE, None)]
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        names += [(prefix, None), (f"{prefix}.self_attn", None), (f"{prefix}.mlp", None),
                  (f"{prefix}.input_layernorm", None), (f"{prefix}.post_attention_layernorm", None),
                  (f"{prefix}.mlp.act_fn", None)]
        names += [(f"{prefix}.{MODULE_PARENT[m]}.{m}", (i, m)) for m in MODULE_ORDER]
    return tuple(names)


def _matches(target: str, name: str) -> bool:
    # PEFT's rule for list entries: the full name, or a dotted suffix of it
    return name == target or name.endswith("." + target)


class _TargetProblem(ValueError):
    """A target_modules problem; the caller adds the adapter id."""


def _classify(what: str, matched: list[tuple[str, tuple[int, str] | None]]
              ) -> frozenset[tuple[int, str]]:
    """The (layer, module) pairs a target selects; refuses embeddings, lm_head, non-linears."""
    if not matched:
        raise _TargetProblem(f"target module {what} does not exist in the base model "
                             f"(supported: {', '.join(MODULE_ORDER)})")
    for name, pair in matched:
        if name == EMBED_MODULE:
            raise _TargetProblem(f"target {what} selects the embedding: embedding LoRA is not "
                                 "supported")
        if name == LM_HEAD_MODULE:
            raise _TargetProblem(f"target {what} selects lm_head: lm_head LoRA is not supported")
        if pair is None:
            raise _TargetProblem(f"target {what} selects '{name}', which is not a linear "
                                 f"projection (supported: {', '.join(MODULE_ORDER)})")
    return frozenset(pair for _, pair in matched if pair is not None)


def _regex_matches(pattern: str, names: tuple[tuple[str, tuple[int, str] | None], ...]
                   ) -> list[tuple[str, tuple[int, str] | None]]:
    """The names a target_modules regex fullmatches (PEFT's rule), in bounded time."""
    if len(pattern) > MAX_TARGET_REGEX_CHARS:
        raise _TargetProblem(f"target_modules regex is longer than {MAX_TARGET_REGEX_CHARS} "
                             "characters")
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise _TargetProblem(f"target_modules regex {pattern!r} is invalid: {exc}") from None
    deadline = time.monotonic() + TARGET_REGEX_BUDGET_S
    matched = []
    try:
        for name, pair in names:
            if compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 0.0)):
                matched.append((name, pair))
    except TimeoutError:
        raise _TargetProblem(f"target_modules regex {pattern!r} takes longer than "
                             f"{TARGET_REGEX_BUDGET_S} s to match the model's module names "
                             "(catastrophic backtracking?)") from None
    return matched


@lru_cache(maxsize=4096)
def _resolve_targets(targets: str | tuple[str, ...], num_layers: int
                     ) -> frozenset[tuple[int, str]]:
    """Memoized: thousands of adapters share a few target lists, and matching scans every
    module name of the model (this runs on the request path, in add_request)."""
    names = _base_module_names(num_layers)
    if targets == ALL_LINEAR:
        return frozenset(pair for _, pair in names if pair is not None)
    if isinstance(targets, str):
        return _classify(f"regex {targets!r}", _regex_matches(targets, names))
    pairs: set[tuple[int, str]] = set()
    for target in targets:
        pairs |= _classify(repr(target), [(n, p) for n, p in names if _matches(target, n)])
    return frozenset(pairs)


def _target_pairs(adapter_id: str, targets: Any, num_layers: int) -> frozenset[tuple[int, str]]:
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        key: str | tuple[str, ...] = tuple(targets)
    elif isinstance(targets, str):
        key = targets
    else:
        raise refuse(adapter_id, "'target_modules' must be a non-empty list of module names "
                                 f"or a regex string, got {targets!r}")
    try:
        return _resolve_targets(key, num_layers)
    except _TargetProblem as exc:
        raise refuse(adapter_id, str(exc)) from None


def _uniform_modules(adapter_id: str, pairs: frozenset[tuple[int, str]], num_layers: int
                     ) -> tuple[str, ...]:
    """The pool keeps one module set per adapter: every layer must have the same modules."""
    modules, problem = _modules_of(pairs, num_layers)
    if problem:
        raise refuse(adapter_id, problem)
    return modules


@lru_cache(maxsize=4096)
def _modules_of(pairs: frozenset[tuple[int, str]], num_layers: int) -> tuple[tuple[str, ...], str]:
    """(modules in MODULE_ORDER, "") or ((), why not uniform). Memoized like _resolve_targets,
    whose results it takes: adapters of one config share them (add_request validates each new
    adapter on the request path)."""
    modules = {m for _, m in pairs}
    per_layer: dict[int, set[str]] = {layer: set() for layer in range(num_layers)}
    for layer, module in pairs:
        per_layer[layer].add(module)
    for layer, have in per_layer.items():
        if have != modules:
            return (), (f"target_modules select {sorted(have)} in layer {layer} but "
                         f"{sorted(modules)} overall: layer-selective LoRA is not supported")
    return tuple(m for m in MODULE_ORDER if m in modules), ""


def check_config(adapter_id: str, cfg: Any, spec: ModelSpec, max_rank: int) -> LoraSettings:
    """Validate adapter_config.json contents; returns the settings the loader needs."""
    if not isinstance(cfg, dict):
        raise refuse(adapter_id, "adapter_config.json must hold a JSON object")
    _check_unsupported(adapter_id, cfg)
    rank, alpha = _check_rank_alpha(adapter_id, cfg, max_rank)
    if "target_modules" not in cfg:
        raise refuse(adapter_id, "adapter_config.json has no 'target_modules'")
    pairs = _target_pairs(adapter_id, cfg["target_modules"], spec.num_layers)
    modules = _uniform_modules(adapter_id, pairs, spec.num_layers)
    return LoraSettings(rank=rank, alpha=alpha, use_rslora=cfg.get("use_rslora", False),
                        modules=modules)


def tensor_key(layer: int, module: str, which: str) -> str:
    """The safetensors key PEFT writes for a LoRA factor (which: 'A' or 'B')."""
    prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
    return f"{prefix}.lora_{which}.weight"


def _explain_key(key: str) -> str:
    """Why an unexpected tensor key is refused, by feature name where we can tell."""
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vector (DoRA is not supported)"
    if "lora_embedding" in key or "embed_tokens" in key:
        return "embedding weights (embedding LoRA is not supported)"
    if "lm_head" in key:
        return "lm_head weights (lm_head LoRA is not supported)"
    if "modules_to_save" in key or ".lora_" not in key:
        return "a full module weight (modules_to_save is not supported)"
    if key.endswith(".bias"):
        return "a LoRA bias (lora_bias is not supported)"
    return "not a LoRA A/B weight of a supported projection"


def factor_shapes(spec: ModelSpec, module: str, rank: int) -> tuple[tuple[int, int],
                                                                   tuple[int, int]]:
    """(A, B) shapes of one layer's factors of `module`: [r, in], [out, r]."""
    d_in, d_out = spec.module_dims(module)
    return (rank, d_in), (d_out, rank)


def expected_shapes(settings: LoraSettings, spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every tensor key the adapter must contain, with its shape (A [r, in], B [out, r])."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(spec.num_layers):
        for module in settings.modules:
            a, b = factor_shapes(spec, module, settings.rank)
            shapes[tensor_key(layer, module, "A")] = a
            shapes[tensor_key(layer, module, "B")] = b
    return shapes


def adapter_numel(settings: LoraSettings, spec: ModelSpec) -> int:
    """Elements of all the adapter's factors: expected_shapes' total without building its
    keys (add_request inspects every adapter it has not seen: ~1 ms of keys per adapter for
    Llama-7B on the CPU)."""
    per_layer = sum(ra * ca + rb * cb for (ra, ca), (rb, cb) in
                    (factor_shapes(spec, m, settings.rank) for m in settings.modules))
    return spec.num_layers * per_layer


def check_header(adapter_id: str, settings: LoraSettings, spec: ModelSpec,
                 header: Iterable[tuple[str, str, list[int]]]) -> None:
    """Validate the safetensors header (key, dtype, shape) against the config and the model."""
    expected = expected_shapes(settings, spec)
    seen: set[str] = set()
    for key, dtype, shape in header:
        if key not in expected:
            match = LORA_KEY_RE.fullmatch(key)
            if match and int(match.group(1)) >= spec.num_layers:
                raise refuse(adapter_id, f"tensor '{key}' is for layer {match.group(1)} but the "
                                         f"base model has {spec.num_layers} layers")
            if match:
                raise refuse(adapter_id, f"tensor '{key}' is for module '{match.group(3)}', which "
                                         f"target_modules does not list")
            raise refuse(adapter_id, f"unexpected tensor '{key}': {_explain_key(key)}")
        if dtype not in SAFETENSORS_FLOAT_DTYPES:
            raise refuse(adapter_id, f"tensor '{key}' has dtype {dtype}; expected a float type "
                                     f"({', '.join(SAFETENSORS_FLOAT_DTYPES)})")
        if tuple(shape) != expected[key]:
            raise refuse(adapter_id, f"tensor '{key}' has shape {list(shape)}, expected "
                                     f"{list(expected[key])} (rank {settings.rank}, base model "
                                     "dims)")
        seen.add(key)
    missing = [k for k in expected if k not in seen]
    if missing:
        raise refuse(adapter_id, f"missing tensor '{missing[0]}' ({len(missing)} missing in all)")
