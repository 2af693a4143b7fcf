"""ModelSpec: the shape facts of a Llama-architecture causal LM, read from an HF config dict.

Supported: Llama 2 / 3 (GQA, rope scaling "llama3" and "linear"), Mistral (same architecture;
its sliding window is NOT applied: attention is always over the full context, which is exact
for contexts up to `sliding_window` tokens), SmolLM / SmolLM2 (tied embeddings).
Anything else is refused with `UnsupportedModelError` naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slora_backend.pages import page_elems

MODULE_ORDER: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
MODULE_INDEX: dict[str, int] = {m: i for i, m in enumerate(MODULE_ORDER)}
ATTN_MODULES: tuple[str, ...] = MODULE_ORDER[:4]
MLP_MODULES: tuple[str, ...] = MODULE_ORDER[4:]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-architecture causal LM this backend can run."""


def _normalize_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either transformers-4 keys (`rope_theta`,
    `rope_scaling`) or transformers-5 `rope_parameters` ({rope_theta, rope_type, ...})."""
    params = cfg.get("rope_parameters")
    scaling: dict[str, Any] | None = None
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        # transformers 5 may nest per-layer-type parameters ({"full_attention": {...}});
        # Llama does not
        if "rope_theta" not in params and "rope_type" not in params and len(params) == 1:
            only = next(iter(params.values()))
            if isinstance(only, dict):
                params = only
        if params.get("rope_theta") is not None:
            theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    legacy = cfg.get("rope_scaling")
    if isinstance(legacy, dict) and legacy:
        scaling = dict(legacy)
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        scaling["rope_type"] = rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "default":
            scaling = None
        else:
            if "factor" not in scaling:
                raise UnsupportedModelError(f"rope scaling {rope_type!r} needs a 'factor'")
            if rope_type == "llama3":
                for key in (
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ):
                    if key not in scaling:
                        raise UnsupportedModelError(f"rope scaling 'llama3' needs {key!r}")
    return float(theta), scaling


@dataclass
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = (
        None  # None, or {"rope_type": "llama3" | "linear", "factor": ..., ...}
    )
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral: recorded, NOT applied (full attention)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            if int(getattr(self, name)) <= 0:
                raise UnsupportedModelError(f"{name} must be > 0, got {getattr(self, name)}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable linear layer."""
        h, i = self.hidden_size, self.intermediate_size
        dims = {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if module not in dims:
            raise KeyError(f"unknown module {module!r}; expected one of {MODULE_ORDER}")
        return dims[module]

    def page_elems(self, block_size: int) -> int:
        """Elements of one pool page: K and V of `block_size` tokens (one layer)."""
        return page_elems(block_size, self.num_kv_heads, self.head_dim)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_hf_config(
        cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelSpec:
        """From a parsed HF `config.json` (and optionally `generation_config.json` for eos ids)."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} (architectures {archs}) is not supported: "
                "this backend runs "
                f"Llama-architecture causal LMs only (model_type in {SUPPORTED_MODEL_TYPES})"
            )
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise UnsupportedModelError(
                f"architecture {bad[0]!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedModelError(
                "Llama variants with attention_bias / mlp_bias are not supported"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        if int(cfg.get("pretraining_tp", 1) or 1) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = cfg.get("head_dim") or hidden // num_heads
        theta, scaling = _normalize_rope(cfg)

        eos: list[int] = []
        for src in (cfg.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
            if src is None:
                continue
            for e in src if isinstance(src, (list, tuple)) else [src]:
                if int(e) not in eos:
                    eos.append(int(e))
        sliding = cfg.get("sliding_window") if model_type == "mistral" else None
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            model_type=model_type,
            sliding_window=int(sliding) if sliding else None,
        )
