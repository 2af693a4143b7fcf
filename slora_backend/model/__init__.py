"""Llama-architecture model over the unified paged pool (see docs/DESIGN.md "Model API")."""

from __future__ import annotations

from typing import Any

from .batch import BatchInput
from .lora import LoraTables, RowPlan, contiguous_runs, plan_adapter_rows, write_adapter_rows
from .spec import MODULE_INDEX, MODULE_ORDER, ModelSpec, UnsupportedModelError

__all__ = [
    "BatchInput",
    "LlamaModel",
    "LoraTables",
    "MODULE_INDEX",
    "MODULE_ORDER",
    "ModelSpec",
    "RowPlan",
    "UnsupportedModelError",
    "contiguous_runs",
    "load_model",
    "load_spec",
    "plan_adapter_rows",
    "write_adapter_rows",
]


def __getattr__(name: str) -> Any:  # lazy: llama/loader import transformers only when needed
    if name == "LlamaModel":
        from .llama import LlamaModel

        return LlamaModel
    if name in ("load_model", "load_spec"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(name)
