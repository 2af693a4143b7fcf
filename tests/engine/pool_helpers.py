"""Helpers shared by the pool-tier tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slora_backend.adapters.adapter_manager import AdapterManager
from slora_backend.adapters.validation import tensor_key
from slora_backend.model.spec import MODULE_INDEX


def assert_rows_equal(mgr: AdapterManager, slot: int, adapter_dir: Path, name: str,
                      modules: tuple[str, ...], rank: int) -> None:
    """Every A row and B^T row the slot tables point at equals the adapter's file."""
    tensors = load_file(adapter_dir / name / "adapter_model.safetensors")
    dtype, device = mgr.storage.tensor.dtype, mgr.storage.tensor.device
    for module in modules:
        m = MODULE_INDEX[module]
        assert int(mgr.tables.ranks[slot, m]) == rank
        for layer in range(mgr.spec.num_layers):
            a = tensors[tensor_key(layer, module, "A")].to(device, dtype)
            b = tensors[tensor_key(layer, module, "B")].to(device, dtype)
            flat = mgr.storage.flat(layer)
            for j in range(rank):
                ap, bp = int(mgr.tables.a_ptr[slot, m, j]), int(mgr.tables.b_ptr[slot, m, j])
                assert torch.equal(flat[ap:ap + a.shape[1]], a[j])
                assert torch.equal(flat[bp:bp + b.shape[0]], b[:, j])


def poisoned_copy(adapter_dir: Path, tmp_path: Path, source_name: str, key: str,
                  value: float, name: str = "bad") -> Path:
    """A copy of `adapter_dir` under `tmp_path` with one more adapter, `name`: `source_name`
    with `value` in tensor `key` (a NaN, an Inf, a number the model dtype cannot hold)."""
    adapters = tmp_path / "adapters"
    shutil.copytree(adapter_dir, adapters)
    shutil.copytree(adapters / source_name, adapters / name)
    path = adapters / name / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[key][0, 0] = value
    save_file(tensors, path)
    return adapters
