"""weights_file: the one-read safetensors reader against safetensors' own loader, and the
header checks that refuse a file rewritten or damaged between validation and load."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora_backend.adapters import weights_file
from slora_backend.adapters.weights_file import (
    StagingBuffers,
    open_regular,
    parse_header,
    read_into,
)
from slora_backend.errors import EngineError, ErrorCode

TENSORS = {"b": (3, 5), "a": (4, 2), "c": (7,)}


def _write(path: Path, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen).to(dtypes[k]) for k, shape in TENSORS.items()}
    save_file(tensors, str(path))
    return tensors


def _read(path: Path, dtype: torch.dtype, order: list[str] | None = None,
          out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    fd = open_regular(str(path))
    try:
        wf = parse_header("x", fd)
        numel = sum(t.numel() for t in load_file(str(path)).values())
        if out is None:
            out = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        starts = read_into(fd, wf, out, dtype, StagingBuffers(), order)
        flat = out.view(dtype)
        return {e.key: flat[starts[e.key]:starts[e.key] + math.prod(e.shape)].view(e.shape)
                for e in wf.entries}
    finally:
        os.close(fd)


@pytest.mark.parametrize("file_dtypes, dtype", [
    ({"a": torch.float16, "b": torch.float16, "c": torch.float16}, torch.float16),  # direct
    ({"a": torch.float16, "b": torch.float16, "c": torch.float16}, torch.float32),  # one cast
    ({"a": torch.float32, "b": torch.bfloat16, "c": torch.float16}, torch.float32),  # mixed
])
def test_read_equals_safetensors(tmp_path: Path, file_dtypes: dict, dtype: torch.dtype) -> None:
    path = tmp_path / "w.safetensors"
    _write(path, file_dtypes)
    views = _read(path, dtype)
    reference = load_file(str(path))
    assert set(views) == set(reference)
    for key, tensor in reference.items():
        assert views[key].dtype == dtype and torch.equal(views[key], tensor.to(dtype))


@pytest.mark.parametrize("file_dtypes, dtype", [
    (dict.fromkeys(TENSORS, torch.float16), torch.float16),  # scattered straight in
    (dict.fromkeys(TENSORS, torch.float16), torch.float32),  # scattered into staging, one cast
    ({"a": torch.float32, "b": torch.bfloat16, "c": torch.float16}, torch.float32),  # mixed
])
def test_read_places_tensors_in_the_given_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                file_dtypes: dict, dtype: torch.dtype) -> None:
    # the file holds a, b, c (safetensors sorts); the destination wants c, a, b back to back
    monkeypatch.setattr(weights_file, "IOV_MAX", 2)  # more tensors than one preadv may take
    path = tmp_path / "w.safetensors"
    _write(path, file_dtypes)
    out = torch.empty(sum(math.prod(s) for s in TENSORS.values()) * dtype.itemsize,
                      dtype=torch.uint8)
    views = _read(path, dtype, ["c", "a", "b"], out)
    reference = load_file(str(path))
    flat = out.view(dtype)
    expected = torch.cat([reference[k].to(dtype).flatten() for k in ("c", "a", "b")])
    assert torch.equal(flat, expected)
    for key, tensor in reference.items():
        assert torch.equal(views[key], tensor.to(dtype))
    with pytest.raises(ValueError, match="every tensor"):
        _read(path, dtype, ["c", "a"])


def test_loads_of_one_header_share_one_read_plan(tmp_path: Path) -> None:
    # adapters of one shape share their parsed header; the per-tensor bookkeeping of where
    # each tensor goes is done once per (order, dtype), not at every load
    path = tmp_path / "w.safetensors"
    reference = _write(path, dict.fromkeys(TENSORS, torch.float16))
    fd = open_regular(str(path))
    try:
        wf = parse_header("x", fd)
        outs = [torch.empty(wf.data_len, dtype=torch.uint8) for _ in range(2)]
        starts = [read_into(fd, wf, out, torch.float16, StagingBuffers(), ["c", "a", "b"])
                  for out in outs]
        assert starts[0] is starts[1] and starts[0] == {"c": 0, "a": 7, "b": 15}
        assert torch.equal(outs[0], outs[1])
        assert read_into(fd, wf, outs[0], torch.float16, StagingBuffers()) == \
            {"a": 0, "b": 8, "c": 23}  # another order: its own plan
        assert torch.equal(outs[0].view(torch.float16)[8:23].view(3, 5), reference["b"])
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw + b"\0", "trailing"),
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: (1 << 40).to_bytes(8, "little") + raw[8:], "header length"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "header is not JSON"),
])
def test_damaged_files_are_refused(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "w.safetensors"
    _write(path, dict.fromkeys(TENSORS, torch.float16))
    path.write_bytes(damage(path.read_bytes()))
    fd = open_regular(str(path))
    try:
        with pytest.raises(EngineError, match=message) as info:
            parse_header("x", fd)
    finally:
        os.close(fd)
    assert info.value.code == ErrorCode.INVALID_ARG and "'x'" in info.value.message


def test_overlapping_ranges_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _write(path, dict.fromkeys(TENSORS, torch.float16))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    # move "c" onto the start of the data: its length is right, only the tiling check can tell
    meta = json.loads(header)
    start, end = meta["c"]["data_offsets"]
    meta["c"]["data_offsets"] = [0, end - start]
    text = json.dumps(meta, separators=(",", ":")).encode()
    assert len(text) <= n
    text = text.ljust(n)  # safetensors pads its header with spaces too
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    fd = open_regular(str(path))
    try:
        with pytest.raises(EngineError, match="overlaps"):
            parse_header("x", fd)
    finally:
        os.close(fd)


def test_a_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        os.close(open_regular(str(fifo)))


def test_header_longer_than_one_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_file, "HEADER_PROBE", 16)  # the header takes several reads
    path = tmp_path / "w.safetensors"
    _write(path, dict.fromkeys(TENSORS, torch.float32))
    views = _read(path, torch.float32)
    assert all(torch.equal(views[k], t) for k, t in load_file(str(path)).items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_large_read_is_shared_by_helper_threads(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 dtype: torch.dtype) -> None:
    # pieces of 8 bytes: tensors are cut across pieces, pieces across tensors
    monkeypatch.setattr(weights_file, "SPLIT_BYTES", 8)
    path = tmp_path / "w.safetensors"
    _write(path, dict.fromkeys(TENSORS, torch.float16))
    fd = open_regular(str(path))
    try:
        wf = parse_header("x", fd)
        out = torch.empty(wf.data_len // 2 * dtype.itemsize, dtype=torch.uint8)
        with ThreadPoolExecutor(2) as helpers:
            starts = read_into(fd, wf, out, dtype, StagingBuffers(), ["c", "a", "b"], helpers)
    finally:
        os.close(fd)
    reference = load_file(str(path))
    flat = out.view(dtype)
    for key, tensor in reference.items():
        got = flat[starts[key]:starts[key] + tensor.numel()].view(tensor.shape)
        assert torch.equal(got, tensor.to(dtype))
