"""Reading an adapter's safetensors file at memory speed: one header parse, one scatter read.

A safetensors file is `u64 header length | JSON header | data`, the data being every tensor's
bytes back to back (no holes: the format forbids them). The caller picks where each tensor goes
in the destination (`order`: the host cache stacks each module's factors of all layers, so that
the pool tier copies a module's rows with one op for all layers). When all tensors already have
the model dtype, one `preadv` reads the data region straight into those places (one iovec per
tensor, in file order: no allocation, no copy, no per-tensor Python work beyond the iovec: where
each tensor goes is planned once per header, order and dtype, `ReadPlan`). Otherwise the same
scatter read fills a per-thread staging buffer, reused from load to load, in the same order and
the file's dtype, and one torch op converts it (one per tensor only for a file that mixes
dtypes). File reads and torch ops release the GIL, so loader threads run in parallel.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field

import torch

from slora_backend.adapters.validation import refuse

HEADER_LEN = struct.Struct("<Q")  # the u64 little-endian length that starts a safetensors file
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header
HEADER_PROBE = 1 << 16  # bytes read for the header in one go
SPLIT_BYTES = 16 << 20  # reads larger than twice this are shared among helper threads
METADATA_KEY = "__metadata__"
FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
               "F64": torch.float64}
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # iovecs per preadv


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: its key, dtype name, shape and byte range in the data region."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ReadPlan:
    """Where each tensor of a file goes in the destination, for one destination order and
    dtype: `start[key]` its element offset (read-only: shared by every load of the plan),
    `ranges` each entry's byte range in the destination buffer, in file order (the scatter
    read's iovecs, when the file has one dtype), `src_dtype` that dtype (None: mixed)."""

    start: dict[str, int]
    ranges: tuple[tuple[int, int], ...]
    src_dtype: torch.dtype | None


@dataclass(frozen=True)
class WeightsFile:
    """A parsed header: tensors in file order, where the data starts, how long it is."""

    entries: tuple[TensorEntry, ...]
    data_start: int
    data_len: int
    # read plans by (destination order, dtype): the header is memoized per shape, so thousands
    # of adapters share one plan and a load does no per-tensor bookkeeping
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def header(self) -> list[tuple[str, str, list[int]]]:
        """(key, dtype, shape) triples, as validation.check_header takes them."""
        return [(e.key, e.dtype, list(e.shape)) for e in self.entries]

    def read_plan(self, order: list[str] | None, dtype: torch.dtype) -> ReadPlan:
        """The plan for tensors laid out back to back in `order` (tensor keys; None: file
        order) in `dtype`. ValueError if `order` does not list every tensor once."""
        key = (None if order is None else tuple(order), dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(order, dtype)
        return plan

    def _make_plan(self, order: list[str] | None, dtype: torch.dtype) -> ReadPlan:
        by_key = {e.key: e for e in self.entries}
        placed = [by_key[k] for k in order] if order is not None else list(self.entries)
        if len(placed) != len(by_key) or set(by_key) != {e.key for e in placed}:
            raise ValueError("order must list every tensor of the file once")
        start: dict[str, int] = {}  # element offset in the destination
        elems = 0
        for e in placed:
            start[e.key] = elems
            elems += _numel(e)
        file_dtypes = {FILE_DTYPES[e.dtype] for e in self.entries}
        src_dtype = file_dtypes.pop() if len(file_dtypes) == 1 else None
        width = src_dtype.itemsize if src_dtype is not None else 0
        ranges = tuple((start[e.key] * width, start[e.key] * width + e.end - e.start)
                       for e in self.entries)
        return ReadPlan(start, ranges, src_dtype)


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


def read_header(adapter_id: str, fd: int) -> tuple[bytes, int]:
    """The raw JSON header of the open file `fd` and the file's size (length checked). One
    read covers the length and a header of up to HEADER_PROBE bytes (adapters' are a few tens
    of KB)."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER_PROBE, 0)
    if len(raw) < HEADER_LEN.size:
        raise refuse(adapter_id, "adapter_model.safetensors is too short for a header")
    (header_len,) = HEADER_LEN.unpack(raw[:HEADER_LEN.size])
    if header_len > min(MAX_HEADER_BYTES, size - HEADER_LEN.size):
        raise refuse(adapter_id, f"adapter_model.safetensors is not a valid safetensors file: "
                                 f"header length {header_len} is invalid")
    end = HEADER_LEN.size + header_len
    while len(raw) < end:  # a longer header (reads may also come back short)
        more = os.pread(fd, end - len(raw), len(raw))
        if not more:
            raise refuse(adapter_id, "adapter_model.safetensors is truncated")
        raw += more
    return raw[HEADER_LEN.size:end], size


def parse_header(adapter_id: str, fd: int) -> WeightsFile:
    """Parse and check the header of the open file `fd` (parse_header_bytes)."""
    return parse_header_bytes(adapter_id, *read_header(adapter_id, fd))


def parse_header_bytes(adapter_id: str, raw: bytes, size: int) -> WeightsFile:
    """Parse and check a raw header (read_header) of a file of `size` bytes: tensors tile the
    data region exactly (no overlap, no hole), the region ends at the end of the file, each
    byte range matches its shape and dtype."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(adapter_id, f"adapter_model.safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise refuse(adapter_id, "adapter_model.safetensors header is not a JSON object")
    entries = sorted((_entry(adapter_id, k, v) for k, v in header.items() if k != METADATA_KEY),
                     key=lambda e: e.start)
    offset = 0
    for e in entries:
        width = FILE_DTYPES[e.dtype].itemsize if e.dtype in FILE_DTYPES else None
        if e.start != offset or (width is not None and e.end - e.start != _numel(e) * width):
            raise refuse(adapter_id, f"tensor '{e.key}' has a byte range that does not match "
                                     "its shape or overlaps/leaves a hole")
        offset = e.end
    data_start = HEADER_LEN.size + len(raw)
    if data_start + offset != size:
        raise refuse(adapter_id, "adapter_model.safetensors is truncated or has trailing bytes")
    return WeightsFile(tuple(entries), data_start, offset)


def _numel(e: TensorEntry) -> int:
    numel = 1
    for dim in e.shape:
        numel *= dim
    return numel


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


def read_scatter(fd: int, parts: list[memoryview], offset: int,
                 helpers: Executor | None = None) -> None:
    """Fill `parts` (back to back in the file from `offset`). With `helpers`, a read of more
    than SPLIT_BYTES is cut into pieces of about that size that helper threads read at the same
    time, the calling thread reading the last: one thread copies 5-7 GB/s out of the page
    cache, a 134-MB adapter alone took ~22 ms where a few threads take a few."""
    pieces = _split(parts, offset, helpers)
    futures = [helpers.submit(_preadv_all, fd, group, at) for group, at in pieces[:-1]] \
        if helpers is not None else []
    try:
        _preadv_all(fd, *pieces[-1])
    finally:  # every helper done before the caller may give the destination away
        wait(futures)
    for future in futures:
        future.result()


def _split(parts: list[memoryview], offset: int,
           helpers: Executor | None) -> list[tuple[list[memoryview], int]]:
    """(iovecs, file offset) groups of about SPLIT_BYTES each (one group without helpers)."""
    total = sum(map(len, parts))
    if helpers is None or total < 2 * SPLIT_BYTES:
        return [(parts, offset)]
    groups: list[tuple[list[memoryview], int]] = []
    group: list[memoryview] = []
    size, at = 0, offset
    for part in parts:
        while len(part):  # a part larger than what the group still takes is cut
            take = min(len(part), SPLIT_BYTES - size)
            group.append(part[:take])
            part, size = part[take:], size + take
            if size == SPLIT_BYTES:
                groups.append((group, at))
                group, at, size = [], at + SPLIT_BYTES, 0
    if group:
        groups.append((group, at))
    return groups


def _preadv_all(fd: int, parts: list[memoryview], offset: int) -> None:
    """preadv until `parts` are full: at most IOV_MAX iovecs per call, and reads may come back
    short."""
    todo = [p for p in parts if len(p)]
    i = 0
    while i < len(todo):
        got = os.preadv(fd, todo[i:i + IOV_MAX], offset)
        if got == 0:
            raise OSError("file ended while reading (truncated during the load?)")
        offset += got
        while got and got >= len(todo[i]):
            got -= len(todo[i])
            i += 1
        if got:
            todo[i] = todo[i][got:]


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
              staging: StagingBuffers, order: list[str] | None = None,
              helpers: Executor | None = None) -> dict[str, int]:
    """Read every tensor of `wf` into `out` (uint8, exactly the tensors' bytes in `dtype`),
    laid out back to back in `order` (tensor keys; default: file order); returns key ->
    element offset in `out.view(dtype)` (read-only, shared by the plan's loads; the caller
    makes the views it needs: a torch view per tensor is Python work that grows with the
    adapter). The header must have been validated (float dtypes only). `helpers`: threads that
    share a large read (read_scatter)."""
    plan = wf.read_plan(order, dtype)
    flat = out.view(dtype)
    if plan.src_dtype is not None:  # straight in, or into staging in the same layout, cast once
        dst = out if plan.src_dtype == dtype else staging.get(wf.data_len)
        region = memoryview(dst.numpy())
        read_scatter(fd, [region[lo:hi] for lo, hi in plan.ranges], wf.data_start, helpers)
        if dst is not out:
            flat.copy_(dst.view(plan.src_dtype))
    else:  # mixed dtypes (rare; PEFT writes one): file order into staging, each cast in place
        raw = staging.get(wf.data_len)
        read_scatter(fd, [memoryview(raw.numpy())], wf.data_start, helpers)
        for e in wf.entries:
            chunk = raw[e.start:e.end]
            width = FILE_DTYPES[e.dtype].itemsize
            src = (chunk if e.start % width == 0 else chunk.clone()).view(FILE_DTYPES[e.dtype])
            flat[plan.start[e.key]:plan.start[e.key] + src.numel()].copy_(src)
    return plan.start
