"""Helpers shared by tests/adapters (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import ctypes
import mmap
import threading
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


class ManualFence:
    """A CUDA event's interface (query, synchronize) for a host -> device copy that completes
    when the test says so (`complete`); `waited_on` is set by the first synchronize, which
    fails after `timeout` seconds rather than hang a test."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.waited_on = threading.Event()
        self._done = threading.Event()
        self._timeout = timeout

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self.waited_on.set()
        if not self._done.wait(self._timeout):
            raise AssertionError("a fence was waited for that never completed")

    def complete(self) -> None:
        self._done.set()
