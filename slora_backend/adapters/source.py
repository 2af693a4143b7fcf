"""Disk tier: a folder of HF PEFT adapters, rescanned on demand, validated before loading."""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slora_backend.adapters.validation import (
    MAX_CONFIG_BYTES,
    LoraSettings,
    adapter_numel,
    check_adapter_id,
    check_config,
    check_header,
    factor_shapes,
    refuse,
    tensor_key,
)
from slora_backend.adapters.values import all_finite
from slora_backend.adapters.weights_file import (
    NotRegularFile,
    StagingBuffers,
    WeightsFile,
    open_regular,
    parse_header_bytes,
    read_header,
    read_into,
)
from slora_backend.bounded_json import JsonProblem, load_json
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model.spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
INFO_MEMO_SIZE = 8192  # validated adapter infos kept (a few hundred bytes each)
HEADER_MEMO_SIZE = 64  # distinct validated headers kept (tens of KB each)

Fingerprint = tuple[int, int, int, int]  # (config mtime_ns, config size, weights mtime_ns, size)


@dataclass
class HostAdapter:
    """An adapter in host memory: validated (all but the finite check, which the pool tier
    does during its copy unless the loader did: `finite`), in the model dtype, ready to copy
    into the pool.

    `factors[module]` = (A [L, r, in], B [L, out, r]): every layer's factor of one module
    stacked, so the pool tier writes a module's rows of all layers with one op per run of
    rows. All are views of one flat buffer (in the host cache: a range of its pinned arena),
    laid out module by module (MODULE_ORDER), A of all layers then B of all layers; B's memory
    is B^T [L, r, out] once a host pool's loader has laid it out (prepare_for_host_pool).
    """

    adapter_id: str
    rank: int
    scale: float  # alpha/r, or alpha/sqrt(r) for rsLoRA
    modules: tuple[str, ...]  # subset of MODULE_ORDER, in that order
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int
    fingerprint: Fingerprint | None = None  # files' (mtime, size) when loaded; see AdapterSource
    buffer: torch.Tensor | None = field(default=None, repr=False)  # the flat storage
    # CUDA events recorded after copies from `buffer`: its memory is reused only after the last
    fences: list = field(default_factory=list, repr=False)
    finite: bool | None = None  # every value finite (None: not checked yet)
    # held while a host pool's loader lays B out (AdapterSource.prepare_for_host_pool) and by
    # whoever reads the factors meanwhile (the CPU pool copy)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def weights(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, module) -> (A [r, in], B [out, r]): per-layer views (tests, tools)."""
        return {(layer, m): (a[layer], b[layer]) for m, (a, b) in self.factors.items()
                for layer in range(a.shape[0])}


@dataclass(frozen=True)
class AdapterInfo:
    """What validation of config + safetensors header says, before any weight is read."""

    adapter_id: str
    settings: LoraSettings
    nbytes: int  # host bytes in the model dtype
    fingerprint: Fingerprint


@functools.lru_cache(maxsize=256)
def host_layout(settings: LoraSettings, num_layers: int) -> list[str]:
    """Tensor keys in HostAdapter's buffer order: per module, A of every layer, then B.
    Memoized: thousands of adapters share a few settings (the list is never modified)."""
    return [tensor_key(layer, module, which) for module in settings.modules
            for which in ("A", "B") for layer in range(num_layers)]


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _vanished(adapter_id: str) -> EngineError:
    """A file went away between two looks at it (the adapter is being removed or replaced)."""
    return EngineError(ErrorCode.NOT_FOUND, f"adapter '{adapter_id}' was removed while reading it")


@contextlib.contextmanager
def _regular_file(adapter_id: str, path: Path) -> Iterator[int]:
    """A read-only descriptor of `path`, which must be a regular file (open_regular: a FIFO
    would block open() and read() until someone writes to it, and hold up admission)."""
    try:
        fd = open_regular(str(path))
    except FileNotFoundError:
        raise _vanished(adapter_id) from None
    except NotRegularFile:
        raise refuse(adapter_id, f"{path.name} is not a regular file") from None
    except OSError as exc:
        raise refuse(adapter_id, f"cannot open {path.name}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


class AdapterSource:
    """The adapter folder: `<adapter_dir>/<adapter_id>/{adapter_config.json,
    adapter_model.safetensors}`. Nothing is cached here: every call looks at the disk, so
    adapters added, removed or changed while the server runs are seen at once.
    """

    def __init__(self, adapter_dir: str | Path, spec: ModelSpec, max_rank: int,
                 dtype: torch.dtype, host_pool: bool = False) -> None:
        self.root = Path(adapter_dir)
        if self.root.exists() and not self.root.is_dir():
            raise EngineError.invalid("adapter_dir", f"{str(self.root)!r} is not a directory")
        self.spec = spec
        self.max_rank = max_rank
        self.dtype = dtype
        # the pool is in host memory (a CPU engine): after each load the loader thread does
        # what a GPU does on the device during the pool copy (prepare_for_host_pool)
        self.host_pool = host_pool
        self._infos: OrderedDict[str, AdapterInfo] = OrderedDict()  # validated, LRU first
        self._root: tuple[object, str] | None = None  # (the dir's lstat identity, realpath)
        self._lock = threading.Lock()  # inspect() runs on request threads and loader threads
        self._staging = StagingBuffers()  # per loader thread, for files needing a conversion
        # (raw header, file size, settings) -> the parsed header, checked; LRU first
        self._headers: OrderedDict[tuple[bytes, int, LoraSettings], WeightsFile] = OrderedDict()

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
        return self._locate(adapter_id)[0]

    def fingerprint(self, adapter_id: str) -> Fingerprint:
        """(mtime, size) of both files: changes when the adapter is rewritten on disk."""
        path, fingerprint = self._locate(adapter_id, need_weights=True)
        assert fingerprint is not None
        return fingerprint

    def _locate(self, adapter_id: str,
                need_weights: bool = False) -> tuple[Path, Fingerprint | None]:
        """The adapter's folder, checked (resolve), and with `need_weights` its fingerprint,
        in about eight syscalls: an lstat per entry, a realpath only of a symlink (and of the
        root). Loader threads call this for every load and each syscall lets the GIL go: the
        hundreds that realpath of every file took made a load wait for the engine thread
        hundreds of times."""
        check_adapter_id(adapter_id)
        path = self.root / adapter_id
        root_real = self._root_real()
        stats = []
        for target in (path, path / CONFIG_FILE, path / WEIGHTS_FILE):
            try:
                st = os.lstat(target)
            except (FileNotFoundError, NotADirectoryError):  # (a file in place of the folder)
                stats.append(None)
                continue
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(target)
                if os.path.commonpath([root_real, real]) != root_real:
                    raise refuse(adapter_id, f"'{target.name}' resolves outside the adapter "
                                             "directory (symlink escape)")
                st = _stat_or_none(target)
            stats.append(st)
        folder, cfg, weights = stats
        if folder is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"adapter '{adapter_id}' not found")
        if not stat.S_ISDIR(folder.st_mode) or cfg is None or not stat.S_ISREG(cfg.st_mode):
            raise EngineError(ErrorCode.NOT_FOUND,
                              f"adapter '{adapter_id}' not found (no {CONFIG_FILE})")
        if not need_weights:
            return path, None
        if weights is None:
            self._weights_problem(adapter_id, path)
        return path, (cfg.st_mtime_ns, cfg.st_size, weights.st_mtime_ns, weights.st_size)

    def _root_real(self) -> str:
        """realpath of the adapter dir, recomputed only when the dir's own entry changes (one
        lstat instead of one per path component)."""
        try:
            st = os.lstat(self.root)
            key = (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        with self._lock:
            if self._root is None or self._root[0] != key:
                self._root = (key, os.path.realpath(self.root))
            return self._root[1]

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
        path, fingerprint = self._locate(adapter_id, need_weights=True)
        assert fingerprint is not None
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
        with _regular_file(adapter_id, path / WEIGHTS_FILE) as fd:
            self._header(adapter_id, fd, settings)
        numel = adapter_numel(settings, self.spec)
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()
        return AdapterInfo(adapter_id, settings, nbytes, fingerprint)

    def _header(self, adapter_id: str, fd: int, settings: LoraSettings) -> WeightsFile:
        """The parsed header of the open weights file, checked against the config. Memoized
        by the header's bytes: adapters of one shape share a header (one parse and check for
        thousands of them; the load path reads 8 bytes and the header, no JSON)."""
        try:
            raw, size = read_header(adapter_id, fd)
        except OSError as exc:
            raise refuse(adapter_id, f"{WEIGHTS_FILE} cannot be read: {exc}") from None
        key = (raw, size, settings)
        with self._lock:
            known = self._headers.get(key)
            if known is not None:
                self._headers.move_to_end(key)
                return known
        parsed = parse_header_bytes(adapter_id, raw, size)
        check_header(adapter_id, settings, self.spec, parsed.header())
        with self._lock:
            self._headers[key] = parsed
            while len(self._headers) > HEADER_MEMO_SIZE:
                self._headers.popitem(last=False)
        return parsed

    def load(self, adapter_id: str, out: torch.Tensor | None = None,
             info: AdapterInfo | None = None, helpers: Executor | None = None) -> HostAdapter:
        """Validate config and header and read the weights into `out` (uint8,
        `inspect(adapter_id).nbytes` long, e.g. a region of the host cache's arena; allocated
        when None) in HostAdapter's layout: one scatter read of the data region
        (weights_file). The header is parsed only if unlike every header seen lately.
        Values are not checked here (the pool tier's copy or prepare_for_host_pool does).
        `info`: this adapter's inspect() result, when the caller has it already; `helpers`:
        threads that share the read of a large file."""
        info = info if info is not None else self.inspect(adapter_id)
        settings = info.settings
        path = self.resolve(adapter_id)
        if out is None:
            out = torch.empty(info.nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() != info.nbytes:  # rewritten meanwhile
            raise EngineError(ErrorCode.UNAVAILABLE,
                              f"adapter '{adapter_id}' changed on disk while loading; retry")
        layout = host_layout(settings, self.spec.num_layers)
        with _regular_file(adapter_id, path / WEIGHTS_FILE) as fd:
            # the file may have been rewritten since inspect(): this handle's header decides
            parsed = self._header(adapter_id, fd, settings)
            try:
                starts = read_into(fd, parsed, out, self.dtype, self._staging, layout,
                                   helpers)
            except OSError as exc:
                raise refuse(adapter_id, f"{WEIGHTS_FILE} cannot be read: {exc}") from None
        buffer = out.view(self.dtype)
        factors = {m: tuple(_stacked(buffer, starts[tensor_key(0, m, which)],
                                     (self.spec.num_layers, *shape))
                            for which, shape in zip("AB", factor_shapes(self.spec, m,
                                                                         settings.rank)))
                   for m in settings.modules}
        return HostAdapter(adapter_id=adapter_id, rank=settings.rank, scale=settings.scale,
                           modules=settings.modules, factors=factors, nbytes=info.nbytes,
                           fingerprint=info.fingerprint, buffer=buffer)

    def prepare_for_host_pool(self, adapter: HostAdapter) -> None:
        """What a GPU does on the device during the pool copy, done by a host pool's loader
        thread once the adapter is loaded (its load takes no longer), off the engine loop: the
        finite check, then each B rewritten in its own memory as the pool's B^T rows, so that
        the loop's copy is plain. A pool copy that comes first checks and transposes on the
        way, as on a GPU; one that comes meanwhile waits for the adapter's lock."""
        finite = all_finite(adapter.buffer)  # reads only: a pool copy may read alongside
        with adapter.lock:
            adapter.finite = finite
            if finite:
                adapter.factors = {m: (a, self._transposed_in_place(b))
                                   for m, (a, b) in adapter.factors.items()}

    def _transposed_in_place(self, b: torch.Tensor) -> torch.Tensor:
        """B [L, out, r] (contiguous) rewritten in its own memory as B^T [L, r, out], the
        pool's row layout; returned as the same [L, out, r] view of it. The host -> pool copy
        is then a plain copy: transposing on the way runs at ~3.5 GB/s on a CPU (~11 ms of a
        78-MB SmolLM2 adapter, against ~4 ms plain), on the loop's critical path."""
        layers, out, rank = b.shape
        scratch = self._staging.get(b.numel() * b.element_size()).view(b.dtype).view(b.shape)
        scratch.copy_(b)
        bt = b.view(layers, rank, out)
        bt.copy_(scratch.transpose(1, 2))
        return bt.transpose(1, 2)


def _stacked(buffer: torch.Tensor, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous [L, ...] view of `buffer` from element `start` (host_layout put every
    layer's factor of a module back to back)."""
    numel = 1
    for dim in shape:
        numel *= dim
    return buffer[start:start + numel].view(shape)
