"""Helpers shared by tests/adapters (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from pathlib import Path

import torch

from slora_testing.synthetic_adapters import AdapterRecipe

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
MAX_RANK = 64

MakeAdapter = Callable[..., Path]


def recipe(rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"), alpha: float = 16.0,
           use_rslora: bool = False, target_form: str = "list", seed: int = 0) -> AdapterRecipe:
    return AdapterRecipe(rank=rank, modules=modules, alpha=alpha, use_rslora=use_rslora,
                         target_form=target_form, seed=seed)


def resident_pages(memory: torch.Tensor) -> tuple[int, int]:
    """(resident, total) pages of the whole pages inside `memory`, by mincore(2)."""
    begin = -(-memory.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (memory.data_ptr() + memory.numel()) // mmap.PAGESIZE * mmap.PAGESIZE
    pages = (end - begin) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), vec) == 0
    return sum(v & 1 for v in vec), pages
