"""bench/demo_weights_aside.sh: the demo adapters' weights go aside for a device call that must
fit 64 MiB, and come back byte for byte."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "demo_weights_aside.sh"


def _run(tree: Path, aside: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, "ASIDE": str(aside)}, timeout=60)


def test_weights_go_aside_and_come_back(tmp_path: Path) -> None:
    tree, aside = tmp_path / "tree", tmp_path / "aside"
    originals = {}
    for name in ("pirate", "signoff"):
        folder = tree / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        originals[name] = os.urandom(1000)
        (folder / "adapter_model.safetensors").write_bytes(originals[name])
    assert _run(tree, aside, "out").returncode == 0
    assert not list(tree.glob("adapters/*/adapter_model.safetensors"))
    assert (tree / "adapters" / "pirate" / "adapter_config.json").exists()  # configs stay
    assert sorted(p.name for p in aside.iterdir()) == ["pirate.safetensors",
                                                        "signoff.safetensors"]
    assert _run(tree, aside, "back").returncode == 0
    for name, data in originals.items():
        assert (tree / "adapters" / name / "adapter_model.safetensors").read_bytes() == data
    assert not list(aside.iterdir())


def test_usage(tmp_path: Path) -> None:
    res = _run(tmp_path, tmp_path / "aside", "sideways")
    assert res.returncode == 2 and "usage" in res.stderr
