"""Load a Llama-architecture causal LM from an HF directory (safetensors) or a GGUF file.

HF dir: config.json (+ generation_config.json for extra eos ids), model.safetensors or sharded
model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json; tokenizer files alongside.
GGUF: dequantized through transformers' GGUF support (needs the `gguf` package); q/k are
un-permuted by transformers, so the weights match the HF layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .llama import LlamaModel
from .spec import ModelSpec, UnsupportedModelError

if TYPE_CHECKING:  # the parallel package sits above the model
    from slora_backend.parallel.shard import Shard

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def resolve_device(device: torch.device | str) -> torch.device:
    d = str(device)
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(d)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def _read_json(p: Path) -> dict[str, Any]:
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def load_spec(path: str | Path) -> ModelSpec:
    """ModelSpec of an HF dir or GGUF file without loading the weights."""
    p = Path(path)
    if is_gguf(p):
        return _gguf_spec(_gguf_config(p))
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{p}: no config.json (expected an HF model directory or a .gguf file)"
        )
    gen_path = p / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return ModelSpec.from_hf_config(_read_json(cfg_path), gen)


def _safetensors_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({p / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{p}: shards listed in model.safetensors.index.json are missing: {missing}"
            )
        return files
    single = p / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(p.glob("*.safetensors"))
    shards = [s for s in shards if not s.name.startswith("adapter_")]
    if shards:
        return shards
    if (p / "pytorch_model.bin").exists() or list(p.glob("pytorch_model*.bin")):
        raise UnsupportedModelError(
            f"{p}: only safetensors checkpoints are supported (found pytorch_model*.bin)"
        )
    raise FileNotFoundError(f"{p}: no model.safetensors / sharded safetensors found")


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
    shard: Shard | None = None,
) -> tuple[ModelSpec, LlamaModel]:
    """(ModelSpec, LlamaModel) from an HF directory or a .gguf file. `shard`: only one
    tensor-parallel rank's slice of the weights (a model of `shard.local_spec(spec)`); the
    spec returned is the whole model's either way."""
    dt = resolve_dtype(dtype)
    dev = resolve_device(device)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    if is_gguf(p):
        return _load_gguf(p, dt, dev, shard)
    spec = load_spec(p)
    from safetensors import safe_open

    files = _safetensors_files(p)
    with ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files
        ]
        where: dict[str, Any] = {}
        for h in handles:
            for k in h.keys():
                where[k] = h

        def get(name: str) -> torch.Tensor:
            if name not in where:
                raise KeyError(name)
            return where[name].get_tensor(name)

        model = _build(spec, get, dt, dev, shard)
    return spec, model


def _build(spec: ModelSpec, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
           device: torch.device, shard: Shard | None) -> LlamaModel:
    if shard is None:
        return LlamaModel.from_state_dict(spec, get, dtype, device)
    return LlamaModel.from_state_dict(shard.local_spec(spec),
                                      lambda name: shard.take(spec, name, get), dtype, device)


# ---- GGUF ------------------------------------------------------------------------------------


def _read_gguf(p: Path, **kwargs: Any) -> dict[str, Any]:
    """transformers' GGUF reader, its failures turned into UnsupportedModelError."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:  # pragma: no cover
        raise UnsupportedModelError(
            f"loading GGUF needs transformers with GGUF support: {e}"
        ) from e
    try:
        return load_gguf_checkpoint(str(p), **kwargs)
    except (ValueError, NotImplementedError) as e:
        raise UnsupportedModelError(f"{p.name}: {e}") from e


def _gguf_config(p: Path) -> dict[str, Any]:
    parsed = _read_gguf(p, return_tensors=False)
    return parsed["config"]


def _hf_config_dict(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Fill the GGUF-derived config with transformers' defaults (LlamaConfig / MistralConfig)."""
    mt = cfg.get("model_type")
    if mt not in ("llama", "mistral"):
        raise UnsupportedModelError(
            f"GGUF model_type {mt!r} is not supported: "
            "this backend runs Llama-architecture models only"
        )
    from transformers import LlamaConfig, MistralConfig

    conf_cls = LlamaConfig if mt == "llama" else MistralConfig
    conf = conf_cls(**cfg)
    return conf, conf.to_dict()


def _gguf_spec(cfg: dict[str, Any]) -> ModelSpec:
    _, d = _hf_config_dict(cfg)
    return ModelSpec.from_hf_config(d)


class _NameSkeleton:
    """Stands in for the HF model that transformers' GGUF loader maps tensor names against
    (it only reads .config.model_type / .num_hidden_layers, .state_dict() keys and
    .named_children()); avoids parsing the GGUF metadata twice just to build a meta model."""

    MAX_LAYERS = 256

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(model_type="llama", num_hidden_layers=self.MAX_LAYERS)

    def state_dict(self) -> dict[str, None]:
        names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        for i in range(self.MAX_LAYERS):
            pre = f"model.layers.{i}."
            names += [
                pre + f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
            ]
            names += [pre + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            names += [pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"]
        return dict.fromkeys(names)

    def named_children(self) -> list:
        return []


def _load_gguf(p: Path, dtype: torch.dtype, device: torch.device,
               shard: Shard | None) -> tuple[ModelSpec, LlamaModel]:
    parsed = _read_gguf(p, return_tensors=True, model_to_load=_NameSkeleton())
    _, d = _hf_config_dict(parsed["config"])
    spec = ModelSpec.from_hf_config(d)
    if spec.num_layers > _NameSkeleton.MAX_LAYERS:
        raise UnsupportedModelError(f"{p.name}: more than {_NameSkeleton.MAX_LAYERS} layers")
    tensors: dict[str, torch.Tensor] = parsed["tensors"]

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(name)
        return tensors.pop(name)

    model = _build(spec, get, dtype, device, shard)
    return spec, model
