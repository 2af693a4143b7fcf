"""Disk tier: a folder of HF PEFT adapters, rescanned on demand, validated before loading."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from slora_backend.adapters.validation import (
    MAX_CONFIG_BYTES,
    LoraSettings,
    check_adapter_id,
    check_config,
    check_header,
    expected_shapes,
    refuse,
    tensor_key,
)
from slora_backend.bounded_json import JsonProblem, load_json
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model.spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PROC_FD_DIR = "/proc/self/fd"  # Linux: a path that opens an already open descriptor's file
INFO_MEMO_SIZE = 8192  # validated adapter infos kept (a few hundred bytes each)

Fingerprint = tuple[int, int, int, int]  # (config mtime_ns, config size, weights mtime_ns, size)


@dataclass
class HostAdapter:
    """An adapter in host memory: validated, in the model dtype, ready to copy into the pool.

    All factors are views of one flat buffer (one pinned allocation per adapter on CUDA).
    """

    adapter_id: str
    rank: int
    scale: float  # alpha/r, or alpha/sqrt(r) for rsLoRA
    modules: tuple[str, ...]  # subset of MODULE_ORDER, in that order
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (A [r, in], B [out, r])
    nbytes: int
    fingerprint: Fingerprint | None = None  # files' (mtime, size) when loaded; see AdapterSource
    buffer: torch.Tensor | None = field(default=None, repr=False)  # the flat storage

    def weights_on(self, device: torch.device) -> dict[tuple[int, str],
                                                       tuple[torch.Tensor, torch.Tensor]]:
        """`weights` on `device`: one copy of the flat buffer (asynchronous from pinned memory),
        the factors as views of it at the same offsets. Per-factor copies would cost a host
        round trip each: 256 of them for a 32-layer q,k,v,o adapter."""
        if self.buffer is None or device.type == "cpu":
            return self.weights
        flat = self.buffer.to(device, non_blocking=True)
        base = self.buffer.data_ptr()
        size = self.buffer.element_size()

        def on_device(t: torch.Tensor) -> torch.Tensor:
            return flat.as_strided(t.shape, t.stride(), (t.data_ptr() - base) // size)

        return {key: (on_device(a), on_device(b)) for key, (a, b) in self.weights.items()}


@dataclass(frozen=True)
class AdapterInfo:
    """What validation of config + safetensors header says, before any weight is read."""

    adapter_id: str
    settings: LoraSettings
    nbytes: int  # host bytes in the model dtype
    fingerprint: Fingerprint


def _vanished(adapter_id: str) -> EngineError:
    """A file went away between two looks at it (the adapter is being removed or replaced)."""
    return EngineError(ErrorCode.NOT_FOUND, f"adapter '{adapter_id}' was removed while reading it")


@contextlib.contextmanager
def _regular_file(adapter_id: str, path: Path) -> Iterator[int]:
    """A read-only descriptor of `path`, which must be a regular file. Opened non-blocking: a
    FIFO would block open() and read() until someone writes to it (and hold up admission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _vanished(adapter_id) from None
    except OSError as exc:
        raise refuse(adapter_id, f"cannot open {path.name}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refuse(adapter_id, f"{path.name} is not a regular file")
        os.set_blocking(fd, True)  # a regular file: reads never block on a writer
        yield fd
    finally:
        os.close(fd)


class AdapterSource:
    """The adapter folder: `<adapter_dir>/<adapter_id>/{adapter_config.json,
    adapter_model.safetensors}`. Nothing is cached here: every call looks at the disk, so
    adapters added, removed or changed while the server runs are seen at once.
    """

    def __init__(self, adapter_dir: str | Path, spec: ModelSpec, max_rank: int,
                 dtype: torch.dtype) -> None:
        self.root = Path(adapter_dir)
        if self.root.exists() and not self.root.is_dir():
            raise EngineError.invalid("adapter_dir", f"{str(self.root)!r} is not a directory")
        self.spec = spec
        self.max_rank = max_rank
        self.dtype = dtype
        self._infos: OrderedDict[str, AdapterInfo] = OrderedDict()  # validated, LRU first
        self._lock = threading.Lock()  # inspect() runs on request threads and loader threads

    def list_adapters(self) -> list[str]:
        """Ids of the folders that look like adapters (have a config), rescanned on each call."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(os.listdir(self.root)):
            try:
                self.resolve(entry)
            except EngineError:
                continue
            found.append(entry)
        return found

    def resolve(self, adapter_id: str) -> Path:
        """The adapter's folder. INVALID_ARG for a bad id or a path escaping the adapter dir,
        NOT_FOUND when there is no such adapter."""
        check_adapter_id(adapter_id)
        path = self.root / adapter_id
        if not os.path.lexists(path):
            raise EngineError(ErrorCode.NOT_FOUND, f"adapter '{adapter_id}' not found")
        root_real = os.path.realpath(self.root)
        for target in (path, path / CONFIG_FILE, path / WEIGHTS_FILE):
            real = os.path.realpath(target)
            if os.path.commonpath([root_real, real]) != root_real:
                raise refuse(adapter_id, f"'{target.name}' resolves outside the adapter "
                                         "directory (symlink escape)")
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            raise EngineError(ErrorCode.NOT_FOUND,
                              f"adapter '{adapter_id}' not found (no {CONFIG_FILE})")
        return path

    def fingerprint(self, adapter_id: str) -> Fingerprint:
        """(mtime, size) of both files: changes when the adapter is rewritten on disk."""
        path = self.resolve(adapter_id)
        if not (path / WEIGHTS_FILE).exists():
            self._weights_problem(adapter_id, path)
        try:
            cfg, weights = (path / CONFIG_FILE).stat(), (path / WEIGHTS_FILE).stat()
        except FileNotFoundError:
            raise _vanished(adapter_id) from None
        return (cfg.st_mtime_ns, cfg.st_size, weights.st_mtime_ns, weights.st_size)

    def _weights_problem(self, adapter_id: str, path: Path) -> None:
        if (path / PICKLE_WEIGHTS_FILE).exists():
            raise refuse(adapter_id, f"only {WEIGHTS_FILE} is accepted; {PICKLE_WEIGHTS_FILE} "
                                     "(pickle, can run code when loaded) is refused: convert it "
                                     "to safetensors")
        raise refuse(adapter_id, f"{WEIGHTS_FILE} is missing")

    def _read_config(self, adapter_id: str, path: Path) -> object:
        with _regular_file(adapter_id, path / CONFIG_FILE) as fd:
            data = os.read(fd, MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise refuse(adapter_id, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            return load_json(data.decode("utf-8"), MAX_CONFIG_BYTES)
        except UnicodeDecodeError as exc:
            raise refuse(adapter_id, f"{CONFIG_FILE} is not valid JSON (not UTF-8): {exc}") \
                from None
        except JsonProblem as exc:
            raise refuse(adapter_id, f"{CONFIG_FILE}: {exc}") from None

    def inspect(self, adapter_id: str) -> AdapterInfo:
        """Validate config and safetensors header (no weight is read); the size it will take.

        Runs on the request path (add_request), so a result is memoized until the files
        change (fingerprint); refusals are not memoized."""
        path = self.resolve(adapter_id)
        fingerprint = self.fingerprint(adapter_id)
        with self._lock:
            known = self._infos.get(adapter_id)
            if known is not None and known.fingerprint == fingerprint:
                self._infos.move_to_end(adapter_id)
                return known
        info = self._inspect(adapter_id, path, fingerprint)
        with self._lock:
            self._infos[adapter_id] = info
            self._infos.move_to_end(adapter_id)
            while len(self._infos) > INFO_MEMO_SIZE:
                self._infos.popitem(last=False)
        return info

    def _inspect(self, adapter_id: str, path: Path, fingerprint: Fingerprint) -> AdapterInfo:
        settings = check_config(adapter_id, self._read_config(adapter_id, path), self.spec,
                                self.max_rank)
        with self._open(adapter_id, path) as handle:
            self._check_header(adapter_id, settings, handle)
        numel = sum(a * b for a, b in expected_shapes(settings, self.spec).values())
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()
        return AdapterInfo(adapter_id, settings, nbytes, fingerprint)

    def _open(self, adapter_id: str, path: Path) -> Any:
        # safetensors opens the very file checked (/proc/self/fd): no swap after the check
        with _regular_file(adapter_id, path / WEIGHTS_FILE) as fd:
            try:
                return safe_open(f"{PROC_FD_DIR}/{fd}", framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise refuse(adapter_id, f"{WEIGHTS_FILE} is not a valid safetensors file: "
                                         f"{exc}") from None

    def _check_header(self, adapter_id: str, settings: LoraSettings, handle: Any) -> None:
        header = []
        for key in handle.keys():
            tensor_slice = handle.get_slice(key)
            header.append((key, tensor_slice.get_dtype(), tensor_slice.get_shape()))
        check_header(adapter_id, settings, self.spec, header)

    def load(self, adapter_id: str, pin_memory: bool = False) -> HostAdapter:
        """Validate fully (config, header, finite values), then read into one flat buffer."""
        info = self.inspect(adapter_id)
        settings = info.settings
        path = self.resolve(adapter_id)
        buffer = torch.empty(info.nbytes // torch.empty((), dtype=self.dtype).element_size(),
                             dtype=self.dtype, pin_memory=pin_memory)
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        offset = 0
        with self._open(adapter_id, path) as handle:
            # the file may have been rewritten since inspect(): check this handle's header too
            self._check_header(adapter_id, settings, handle)
            for layer in range(self.spec.num_layers):
                for module in settings.modules:
                    pair = []
                    for which in ("A", "B"):
                        key = tensor_key(layer, module, which)
                        source = handle.get_tensor(key)
                        view = buffer[offset:offset + source.numel()].view(source.shape)
                        view.copy_(source)
                        offset += source.numel()
                        pair.append(view)
                    weights[(layer, module)] = (pair[0], pair[1])
        self._check_finite(adapter_id, buffer, weights)
        return HostAdapter(adapter_id=adapter_id, rank=settings.rank, scale=settings.scale,
                           modules=settings.modules, weights=weights, nbytes=info.nbytes,
                           fingerprint=info.fingerprint, buffer=buffer)

    def _check_finite(self, adapter_id: str, buffer: torch.Tensor,
                      weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """All values finite in the model dtype (after conversion: fp32 -> fp16 can overflow).

        A finite fp32 sum proves every element finite (NaN or Inf would propagate) and is ~20x
        faster than isfinite on CPU half types; only when it is not finite (a bad value, or a
        legitimately overflowing sum) are the tensors checked one by one to name the culprit."""
        if bool(torch.isfinite(buffer.sum(dtype=torch.float32))):
            return
        for (layer, module), pair in weights.items():
            for which, tensor in zip("AB", pair):
                if not bool(torch.isfinite(tensor).all()):
                    key = tensor_key(layer, module, which)
                    raise refuse(adapter_id, f"tensor '{key}' has non-finite values (NaN/Inf) "
                                             f"in {self.dtype}")
