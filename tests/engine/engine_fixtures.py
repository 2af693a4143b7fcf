"""Helpers for engine tests: a tiny random GQA Llama dir and PEFT adapters with non-zero B."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SMOL_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B_STD = 0.05  # PEFT initialises lora_B to zero: randomise it so every adapter changes outputs


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: int
    modules: tuple[str, ...]
    rslora: bool = False


# >= 6 adapters: ranks 4..64, different module subsets, one rsLoRA
ADAPTERS = (
    AdapterSpec("a_r4_qv", 4, 8, ("q_proj", "v_proj")),
    AdapterSpec("a_r8_all", 8, 16, ALL_MODULES),
    AdapterSpec("a_r16_mlp", 16, 16, ("gate_proj", "up_proj", "down_proj")),
    AdapterSpec("a_r32_attn", 32, 64, ("q_proj", "k_proj", "v_proj", "o_proj")),
    AdapterSpec("a_r64_ko_down", 64, 32, ("k_proj", "o_proj", "down_proj")),
    AdapterSpec("a_r16_rslora", 16, 32, ("q_proj", "up_proj", "o_proj"), rslora=True),
)


def tiny_llama_config():  # noqa: ANN201 (transformers type)
    from transformers import LlamaConfig

    # vocab of SmolLM2 so its tokenizer files can be reused; GQA ratio 2
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                       max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0)


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (SMOL_DIR / name).exists():
            shutil.copy(SMOL_DIR / name, out / name)
    return out


def make_adapters(model_dir: Path, out: Path, specs: tuple[AdapterSpec, ...] = ADAPTERS,
                  seed: int = 1) -> Path:
    """Write PEFT adapters (save_pretrained) with random non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(specs):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.modules),
                         use_rslora=spec.rslora, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, B_STD)
        peft_model.save_pretrained(out / spec.name)
    return out
