"""Reading an adapter's safetensors file at memory speed: one header parse, one `readinto`.

A safetensors file is `u64 header length | JSON header | data`, the data being every tensor's
bytes back to back (no holes: the format forbids them). When all tensors already have the
model dtype, the data region is read with one `readinto` straight into the destination (a
region of the host cache's arena: no allocation, no per-tensor copy) and the factors are views
of it at the file's offsets. Otherwise the data goes into a per-thread staging buffer, reused
from load to load, and is converted in one torch op (one per tensor only for a file that mixes
dtypes). File reads and torch ops release the GIL, so loader threads run in parallel.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from dataclasses import dataclass

import torch

from slora_backend.adapters.validation import refuse

HEADER_LEN = struct.Struct("<Q")  # the u64 little-endian length that starts a safetensors file
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header
METADATA_KEY = "__metadata__"
FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
               "F64": torch.float64}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: its key, dtype name, shape and byte range in the data region."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class WeightsFile:
    """A parsed header: tensors in file order, where the data starts, how long it is."""

    entries: tuple[TensorEntry, ...]
    data_start: int
    data_len: int

    def header(self) -> list[tuple[str, str, list[int]]]:
        """(key, dtype, shape) triples, as validation.check_header takes them."""
        return [(e.key, e.dtype, list(e.shape)) for e in self.entries]


def _entry(adapter_id: str, key: str, info: object) -> TensorEntry:
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list) \
            or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
        raise refuse(adapter_id, f"safetensors header entry '{key}' is malformed")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (start, end, *shape)) or start > end:
        raise refuse(adapter_id, f"safetensors header entry '{key}' has bad offsets or shape")
    return TensorEntry(key, str(info.get("dtype")), shape, start, end)


def parse_header(adapter_id: str, fd: int) -> WeightsFile:
    """Parse and check the header of the open file `fd`: tensors tile the data region exactly
    (no overlap, no hole), the region ends at the end of the file, each byte range matches
    its shape and dtype."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER_LEN.size, 0)
    if len(raw) < HEADER_LEN.size:
        raise refuse(adapter_id, "adapter_model.safetensors is too short for a header")
    (header_len,) = HEADER_LEN.unpack(raw)
    if header_len > min(MAX_HEADER_BYTES, size - HEADER_LEN.size):
        raise refuse(adapter_id, f"adapter_model.safetensors header length {header_len} is "
                                 "invalid")
    try:
        header = json.loads(os.pread(fd, header_len, HEADER_LEN.size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(adapter_id, f"adapter_model.safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise refuse(adapter_id, "adapter_model.safetensors header is not a JSON object")
    entries = sorted((_entry(adapter_id, k, v) for k, v in header.items() if k != METADATA_KEY),
                     key=lambda e: e.start)
    offset = 0
    for e in entries:
        width = FILE_DTYPES[e.dtype].itemsize if e.dtype in FILE_DTYPES else None
        numel = 1
        for dim in e.shape:
            numel *= dim
        if e.start != offset or (width is not None and e.end - e.start != numel * width):
            raise refuse(adapter_id, f"tensor '{e.key}' has a byte range that does not match "
                                     "its shape or overlaps/leaves a hole")
        offset = e.end
    data_start = HEADER_LEN.size + header_len
    if data_start + offset != size:
        raise refuse(adapter_id, "adapter_model.safetensors is truncated or has trailing bytes")
    return WeightsFile(tuple(entries), data_start, offset)


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a socket or a folder: never read from it."""


def open_regular(path: str) -> int:
    """os.open a regular file for reading (a FIFO or device would block or never end).
    O_NONBLOCK: opening a FIFO does not wait for a writer; regular files ignore the flag."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(f"{path} is not a regular file")
    return fd


def read_exact(fd: int, out: memoryview, offset: int) -> None:
    """Fill `out` from the file at `offset` (preadv until full: reads may come back short)."""
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], offset + done)
        if got == 0:
            raise OSError("file ended while reading (truncated during the load?)")
        done += got


class StagingBuffers:
    """One growable byte buffer per thread, kept between loads, for files that need a dtype
    conversion (their raw bytes cannot be read straight into the destination)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._local.buf = buf
        return buf[:nbytes]


def read_into(fd: int, wf: WeightsFile, out: torch.Tensor, dtype: torch.dtype,
              staging: StagingBuffers) -> dict[str, torch.Tensor]:
    """Read every tensor of `wf` into `out` (uint8, exactly the tensors' bytes in `dtype`),
    laid out in file order; returns key -> view of `out` in `dtype`. The header must have been
    validated (float dtypes only)."""
    file_dtypes = {FILE_DTYPES[e.dtype] for e in wf.entries}
    flat = out.view(dtype)
    if file_dtypes == {dtype}:
        read_exact(fd, memoryview(out.numpy()), wf.data_start)  # straight in: no copy at all
    else:
        raw = staging.get(wf.data_len)
        read_exact(fd, memoryview(raw.numpy()), wf.data_start)
        if len(file_dtypes) == 1:  # one conversion over the whole region
            flat.copy_(raw.view(file_dtypes.pop()))
        else:
            _convert_each(wf, raw, flat)
    views: dict[str, torch.Tensor] = {}
    offset = 0
    for e in wf.entries:
        numel = (e.end - e.start) // FILE_DTYPES[e.dtype].itemsize
        views[e.key] = flat[offset:offset + numel].view(e.shape)
        offset += numel
    return views


def _convert_each(wf: WeightsFile, raw: torch.Tensor, flat: torch.Tensor) -> None:
    """A file with several dtypes: each tensor converted on its own (rare; PEFT writes one)."""
    offset = 0
    for e in wf.entries:
        chunk = raw[e.start:e.end]
        width = FILE_DTYPES[e.dtype].itemsize
        src = (chunk if e.start % width == 0 else chunk.clone()).view(FILE_DTYPES[e.dtype])
        flat[offset:offset + src.numel()].copy_(src)
        offset += src.numel()
