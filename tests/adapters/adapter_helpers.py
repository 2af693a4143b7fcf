"""Helpers shared by tests/adapters (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slora_testing.synthetic_adapters import AdapterRecipe

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
MAX_RANK = 64

MakeAdapter = Callable[..., Path]


def recipe(rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"), alpha: float = 16.0,
           use_rslora: bool = False, target_form: str = "list", seed: int = 0) -> AdapterRecipe:
    return AdapterRecipe(rank=rank, modules=modules, alpha=alpha, use_rslora=use_rslora,
                         target_form=target_form, seed=seed)
