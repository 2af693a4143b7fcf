"""Random valid PEFT LoRA adapters (and a tiny random Llama) for tests, scale tests, benchmarks.

Adapters are written directly as safetensors + JSON (no PEFT model per adapter), so thousands
take seconds. The files are exactly what PEFT's save_pretrained writes, so HF+PEFT loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from slora_backend.adapters.source import CONFIG_FILE, WEIGHTS_FILE
from slora_backend.adapters.validation import ALL_LINEAR, MODULE_PARENT, tensor_key
from slora_backend.model.spec import MODULE_ORDER, ModelSpec

# B is non-zero (PEFT inits it to zero) so every adapter changes the output; the scales keep
# the LoRA delta around the size of the base projection's output for unit-size inputs.
A_STD_NUMERATOR = 1.0  # A ~ N(0, 1/in)
B_STD = 0.5  # B ~ N(0, B_STD^2 / r)
RSLORA_FRACTION = 0.2
REGEX_TARGET_FRACTION = 0.1
ALL_LINEAR_FRACTION = 0.1
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# older tokenizer folders lack the others
TOKENIZER_FILES = (*REQUIRED_TOKENIZER_FILES, "chat_template.jinja", "special_tokens_map.json")
TINY_LLAMA = {  # GQA, tied embeddings, SmolLM2's vocabulary so its tokenizer can be reused
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}
# Llama-7B's shape (hidden 4096, 32 layers, 32 heads, mlp 11008, vocab 32000): the scale of
# the S-LoRA paper's benchmarks, built with random weights on the GPU (LlamaModel.random)
LLAMA7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}
TINY_INIT_STD = 0.1  # larger than HF's 0.02: spread-out logits, fewer near-ties in greedy tests


@dataclass(frozen=True)
class AdapterRecipe:
    """What one synthetic adapter looks like."""

    rank: int
    modules: tuple[str, ...]
    alpha: float
    use_rslora: bool
    target_form: str  # "list" | "regex" | "all-linear"
    seed: int


def load_spec(model_dir: str | Path) -> ModelSpec:
    """ModelSpec of an HF model folder (config.json)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelSpec.from_hf_config(cfg)


def target_modules(recipe: AdapterRecipe) -> list[str] | str:
    """The adapter_config.json `target_modules` value for the recipe's form."""
    if recipe.target_form == "all-linear":
        return ALL_LINEAR
    if recipe.target_form == "regex":
        parents = "|".join(sorted({MODULE_PARENT[m] for m in recipe.modules}))
        return rf"model\.layers\.\d+\.({parents})\.({'|'.join(recipe.modules)})"
    return list(recipe.modules)


def adapter_config(recipe: AdapterRecipe, base_model: str | None = None) -> dict:
    """A PEFT 0.2x LoRA adapter_config.json."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": recipe.rank, "lora_alpha": recipe.alpha, "lora_dropout": 0.0,
        "target_modules": target_modules(recipe), "bias": "none", "use_rslora": recipe.use_rslora,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def adapter_tensors(recipe: AdapterRecipe, spec: ModelSpec,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random A [r, in] and non-zero B [out, r] for every layer and target module."""
    rng = np.random.default_rng(recipe.seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module in recipe.modules:
            in_f, out_f = spec.module_dims(module)
            a = rng.standard_normal((recipe.rank, in_f), dtype=np.float32) * (
                A_STD_NUMERATOR / np.sqrt(in_f))
            b = rng.standard_normal((out_f, recipe.rank), dtype=np.float32) * (
                B_STD / np.sqrt(recipe.rank))
            tensors[tensor_key(layer, module, "A")] = torch.from_numpy(a).to(dtype)
            tensors[tensor_key(layer, module, "B")] = torch.from_numpy(b).to(dtype)
    return tensors


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT folder atomically (temp folder + rename): a server scanning the adapter
    directory never sees a half-written adapter."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def link_adapter(src: str | Path, dst: str | Path) -> Path:
    """Another adapter id for the same files: `dst` gets a hard link to each file of `src`
    (thousands of ids cost no disk and one copy in the page cache, as a server's would)."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        os.link(f, dst / f.name)
    return dst


def random_recipe(rng: np.random.Generator, ranks: Sequence[int], seed: int) -> AdapterRecipe:
    """Mixed ranks, random non-empty module subsets, some rsLoRA, all three target forms."""
    rank = int(rng.choice(ranks))
    form_draw = rng.random()
    if form_draw < ALL_LINEAR_FRACTION:
        form, modules = "all-linear", MODULE_ORDER
    else:
        form = "regex" if form_draw < ALL_LINEAR_FRACTION + REGEX_TARGET_FRACTION else "list"
        mask = rng.random(len(MODULE_ORDER)) < 0.5
        mask[rng.integers(len(MODULE_ORDER))] = True  # at least one module
        modules = tuple(m for m, keep in zip(MODULE_ORDER, mask, strict=True) if keep)
    alpha = float(rank * rng.choice([1, 2]))
    return AdapterRecipe(rank=rank, modules=tuple(modules), alpha=alpha,
                         use_rslora=bool(rng.random() < RSLORA_FRACTION), target_form=form,
                         seed=seed)


def adapter_name(index: int, recipe: AdapterRecipe) -> str:
    return f"syn-{index:05d}-r{recipe.rank}"


def make_tiny_model(out_dir: str | Path, tokenizer_from: str | Path | None = None,
                    seed: int = 0, **overrides: object) -> Path:
    """A tiny random Llama (HF folder, fp32 safetensors); tokenizer files copied when given.
    FileNotFoundError at once when `tokenizer_from` lacks one the model cannot load without
    (otherwise a server fails later with an obscure tokenizer error)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if tokenizer_from is not None:
        missing = [n for n in REQUIRED_TOKENIZER_FILES if not (Path(tokenizer_from) / n).is_file()]
        if missing:
            raise FileNotFoundError(f"tokenizer files {missing} not in {tokenizer_from} (`make "
                                    "setup` puts SmolLM2's there; a device machine needs them "
                                    "carried: bench/device_tokenizer.sh)")
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, initializer_range=TINY_INIT_STD)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                shutil.copy(src, out_dir / name)
    return out_dir
