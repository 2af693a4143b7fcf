"""scripts/gen_synthetic_adapters.py: valid adapters of mixed ranks / modules / target forms."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from adapter_helpers import MAX_RANK, REPO_ROOT

from slora_backend.adapters import AdapterSource
from slora_backend.model.spec import ModelSpec
from slora_testing.synthetic_adapters import load_spec, make_tiny_model

SCRIPT = REPO_ROOT / "scripts" / "gen_synthetic_adapters.py"
COUNT = 60
RANKS = (4, 16, 64)


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_synthetic_adapters", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generates_valid_mixed_adapters(tiny_model_dir: Path, spec: ModelSpec,
                                        tmp_path: Path) -> None:
    out = tmp_path / "syn"
    _script().main(["--model", str(tiny_model_dir), "--out", str(out), "--count", str(COUNT),
                    "--ranks", ",".join(map(str, RANKS)), "--seed", "7"])
    source = AdapterSource(out, spec, MAX_RANK, torch.float32)
    names = source.list_adapters()
    assert len(names) == COUNT
    adapters = [source.load(name) for name in names]
    assert {a.rank for a in adapters} == set(RANKS)
    assert len({a.modules for a in adapters}) > 10
    targets = [json.loads((out / n / "adapter_config.json").read_text())["target_modules"]
               for n in names]
    assert any(isinstance(t, list) for t in targets)
    assert any(isinstance(t, str) and t != "all-linear" for t in targets)  # regex form
    assert any(t == "all-linear" for t in targets)
    assert all(float(b.abs().sum()) > 0 for a in adapters for _, b in a.weights.values())
    assert not list(out.glob(".*"))  # no temp folders left behind


def test_same_seed_same_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = _script()
    for run in ("a", "b"):
        script.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / run),
                     "--count", "3", "--seed", "3"])
    for folder in (tmp_path / "a").iterdir():
        twin = tmp_path / "b" / folder.name
        assert (folder / "adapter_model.safetensors").read_bytes() == \
            (twin / "adapter_model.safetensors").read_bytes()


def test_make_tiny_model(tmp_path: Path) -> None:
    _script().main(["--make-tiny-model", str(tmp_path / "tiny"), "--out", str(tmp_path / "a"),
                    "--count", "2"])
    spec = load_spec(tmp_path / "tiny")
    assert spec.num_layers == 2 and spec.num_kv_heads < spec.num_heads  # GQA
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert len(AdapterSource(tmp_path / "a", spec, MAX_RANK, torch.float32).list_adapters()) == 2


def test_make_tiny_model_refuses_a_tokenizer_folder_without_its_files(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"\['tokenizer_config.json'\]"):
        make_tiny_model(tmp_path / "tiny", tmp_path / "tok")
    assert not (tmp_path / "tiny").exists()  # refused before anything is written


@pytest.mark.parametrize("argv", [["--ranks", "4,x", "--out", "o", "--model", "m"],
                                  ["--ranks", "0", "--out", "o", "--model", "m"],
                                  ["--out", "o"], [], ["--count", "-1", "--out", "o",
                                                       "--model", "m"]])
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _script().parse_args(argv)
    assert info.value.code == 2
