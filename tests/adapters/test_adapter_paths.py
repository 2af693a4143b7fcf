"""adapter_id may not escape the adapter directory; the directory is rescanned on demand."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from adapter_helpers import MakeAdapter, recipe

from slora_backend.adapters import AdapterSource, HostCache
from slora_backend.adapters.source import CONFIG_FILE, WEIGHTS_FILE
from slora_backend.errors import EngineError, ErrorCode

WAIT_S = 30.0

BAD_IDS = ["../x", "..", ".", "", "a/b", "a\\b", "/etc", "/abs/path", "..hidden", "a..b",
           ".hidden", "-flag", "a b", "a\x00b", "ä", "x" * 129, "name\n"]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_ids_refused(source: AdapterSource, bad_id: str) -> None:
    for call in (source.resolve, source.load):
        with pytest.raises(EngineError) as info:
            call(bad_id)
        assert info.value.code == ErrorCode.INVALID_ARG
        assert "adapter_id" in info.value.message


@pytest.mark.parametrize("bad_id", [None, 5, b"bytes", ["a"]])
def test_non_string_ids_refused(source: AdapterSource, bad_id: object) -> None:
    with pytest.raises(EngineError, match="must be a string") as info:
        source.resolve(bad_id)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.INVALID_ARG


def test_longest_allowed_id(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    name = "A1._-" + "z" * 123  # 128 characters, the whole charset
    make_adapter(name)
    assert source.load(name).adapter_id == name


def test_symlinked_folder_out_of_dir_refused(make_adapter: MakeAdapter, source: AdapterSource,
                                             adapter_dir: Path, tmp_path: Path) -> None:
    outside = make_adapter("outside")
    shutil.move(outside, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", adapter_dir / "escape")
    with pytest.raises(EngineError, match="'escape' resolves outside the adapter directory") as e:
        source.load("escape")
    assert e.value.code == ErrorCode.INVALID_ARG
    assert "escape" not in source.list_adapters()


@pytest.mark.parametrize("filename", [CONFIG_FILE, WEIGHTS_FILE])
def test_symlinked_file_out_of_dir_refused(make_adapter: MakeAdapter, source: AdapterSource,
                                           tmp_path: Path, filename: str) -> None:
    folder = make_adapter("leaky")
    secret = tmp_path / "secret"
    shutil.move(folder / filename, secret)
    os.symlink(secret, folder / filename)
    with pytest.raises(EngineError, match=f"'{filename}' resolves outside"):
        source.load("leaky")


def test_symlink_inside_dir_allowed(make_adapter: MakeAdapter, source: AdapterSource,
                                    adapter_dir: Path) -> None:
    make_adapter("real")
    os.symlink(adapter_dir / "real", adapter_dir / "alias")
    assert source.list_adapters() == ["alias", "real"]
    alias, real = source.load("alias"), source.load("real")
    assert torch.equal(alias.buffer, real.buffer)


def test_list_adapters_rescans(make_adapter: MakeAdapter, source: AdapterSource,
                               adapter_dir: Path) -> None:
    assert source.list_adapters() == []
    make_adapter("b")
    make_adapter("a")
    (adapter_dir / "not-an-adapter").mkdir()
    (adapter_dir / "stray.txt").write_text("x")
    assert source.list_adapters() == ["a", "b"]
    shutil.rmtree(adapter_dir / "a")
    assert source.list_adapters() == ["b"]


def test_missing_adapter_dir_is_empty_not_an_error(tmp_path: Path, source: AdapterSource) -> None:
    gone = AdapterSource(tmp_path / "does-not-exist", source.spec, 8, torch.float32)
    assert gone.list_adapters() == []
    with pytest.raises(EngineError) as info:
        gone.resolve("x")
    assert info.value.code == ErrorCode.NOT_FOUND
    (tmp_path / "file").write_text("x")
    with pytest.raises(EngineError, match="'adapter_dir'.*not a directory"):
        AdapterSource(tmp_path / "file", source.spec, 8, torch.float32)


def _bump_mtime(folder: Path) -> None:
    # rewrites within one mtime tick still change the file; make the change visible regardless
    later = time.time() + 5
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        os.utime(folder / name, (later, later))


def test_runtime_add_remove_change(make_adapter: MakeAdapter, source: AdapterSource,
                                   adapter_dir: Path) -> None:
    cache = HostCache(source, capacity_bytes=1 << 24, workers=1, pin_memory=False)
    try:
        with pytest.raises(EngineError) as info:
            cache.wait("late", timeout=WAIT_S)
        assert info.value.code == ErrorCode.NOT_FOUND
        make_adapter("late", recipe(rank=4, seed=1))  # added while running: usable at once
        first = cache.wait("late", timeout=WAIT_S)
        assert first.rank == 4
        assert cache.get("late") is first

        folder = make_adapter("late", recipe(rank=8, seed=2))  # changed: reloaded
        _bump_mtime(folder)
        assert cache.get("late") is None  # stale copy dropped, reload started
        second = cache.wait("late", timeout=WAIT_S)
        assert second.rank == 8 and second is not first
        old_a, new_a = first.weights[(0, "q_proj")][0], second.weights[(0, "q_proj")][0]
        assert not torch.equal(new_a[:4], old_a)

        shutil.rmtree(folder)  # removed: no longer served
        assert cache.get("late") is None
        error = cache.error("late")
        assert error is not None and error.code == ErrorCode.NOT_FOUND
        assert cache.resident() == []
        assert cache.stats()["bytes"] == 0
    finally:
        cache.close()


def test_is_current_tracks_disk_without_loading(make_adapter: MakeAdapter,
                                                source: AdapterSource) -> None:
    folder = make_adapter("tracked")
    cache = HostCache(source, capacity_bytes=1 << 24, workers=1, pin_memory=False)
    try:
        adapter = cache.wait("tracked", timeout=WAIT_S)
        assert cache.is_current(adapter)
        cache.evict("tracked")
        assert cache.is_current(adapter)  # evicted from host RAM, files unchanged
        _bump_mtime(folder)
        assert not cache.is_current(adapter)
        shutil.rmtree(folder)
        assert not cache.is_current(adapter)
        assert cache.stats()["misses"] == 1  # is_current never started a load
    finally:
        cache.close()


def test_inspect_revalidates_a_rewritten_adapter(make_adapter: MakeAdapter,
                                                 source: AdapterSource) -> None:
    make_adapter("swap", recipe(rank=4))
    first = source.inspect("swap")
    assert source.inspect("swap") is first  # memoized while the files are unchanged
    folder = make_adapter("swap", recipe(rank=4), config_updates={"use_dora": True})
    _bump_mtime(folder)
    with pytest.raises(EngineError, match="use_dora"):
        source.inspect("swap")
