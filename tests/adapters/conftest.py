"""Fixtures: a tiny random Llama (session) and helpers that write PEFT adapters into tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_helpers import MAX_RANK, SMOLLM2_DIR, MakeAdapter, recipe

from slora_backend.adapters import AdapterSource
from slora_backend.model.spec import ModelSpec
from slora_testing.synthetic_adapters import (
    AdapterRecipe,
    adapter_config,
    adapter_tensors,
    load_spec,
    make_tiny_model,
    write_adapter,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_from = SMOLLM2_DIR if SMOLLM2_DIR.is_dir() else None
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=tokenizer_from)


@pytest.fixture(scope="session")
def spec(tiny_model_dir: Path) -> ModelSpec:
    return load_spec(tiny_model_dir)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapters"
    path.mkdir()
    return path


@pytest.fixture
def source(adapter_dir: Path, spec: ModelSpec) -> AdapterSource:
    return AdapterSource(adapter_dir, spec, MAX_RANK, torch.float32)


@pytest.fixture
def make_adapter(adapter_dir: Path, spec: ModelSpec) -> MakeAdapter:
    """make_adapter(name, recipe=..., config_updates={...}, tensor_edit=fn) -> folder.

    `config_updates` overrides adapter_config.json keys (None values delete the key);
    `tensor_edit(tensors)` may change the tensor dict in place before it is written."""

    def make(name: str, adapter_recipe: AdapterRecipe | None = None,
             config_updates: dict | None = None,
             tensor_edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
        rec = adapter_recipe or recipe()
        config = adapter_config(rec)
        for key, value in (config_updates or {}).items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        tensors = adapter_tensors(rec, spec)
        if tensor_edit is not None:
            tensor_edit(tensors)
        return write_adapter(adapter_dir / name, config, tensors)

    return make
