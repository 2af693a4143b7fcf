"""scripts/gpu_instance_groups.py and its use by scripts/tritonserver.sh: with 2+ GPUs visible
the launcher gives each GPU its own instance group (--model-config-name), else it leaves the
committed config alone. The launched binary here prints its arguments (no GPU in CI; the
per-GPU config served on 2 H200s, docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_instance_groups import per_gpu_config, tensor_parallel_size  # noqa: E402

CONFIG = ROOT / "model_repository" / "slora" / "config.pbtxt"
TWO_GPUS = ("instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0 ] }, "
            "{ count: 1, kind: KIND_GPU, gpus: [ 1 ] } ]")


def test_per_gpu_config_replaces_only_the_instance_group() -> None:
    text = CONFIG.read_text()
    out = per_gpu_config(text, 2)
    assert TWO_GPUS in out and "kind: KIND_AUTO" not in out
    assert [ln for ln in out.splitlines() if not ln.startswith("instance_group")] == \
        [ln for ln in text.splitlines() if not ln.startswith("instance_group")]
    assert per_gpu_config(text, 3).count("kind: KIND_GPU") == 3
    with pytest.raises(ValueError):
        per_gpu_config(text, 0)
    with pytest.raises(ValueError, match="instance_group"):
        per_gpu_config("name: \"slora\"\n", 2)


def test_tensor_parallel_engines_take_every_tp_th_gpu() -> None:
    text = CONFIG.read_text()
    assert tensor_parallel_size(text, {}) == 1  # the committed config
    assert tensor_parallel_size(text, {"SLORA_TENSOR_PARALLEL_SIZE": "4"}) == 4
    groups = [ln for ln in per_gpu_config(text, 8, 4).splitlines()
              if ln.startswith("instance_group")]
    assert groups == ["instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0 ] }, "
                      "{ count: 1, kind: KIND_GPU, gpus: [ 4 ] } ]"]
    assert per_gpu_config(text, 3, 2).count("kind: KIND_GPU") == 1  # GPU 2 left over
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        per_gpu_config(text, 2, 4)


@pytest.fixture()
def launch(tmp_path: Path):
    """Run scripts/tritonserver.sh with TRITONSERVER=/bin/echo (it execs that binary with the
    arguments it would give tritonserver, as in tests/docker); returns them."""
    repository = tmp_path / "repo"
    (repository / "slora").mkdir(parents=True)
    shutil.copy(CONFIG, repository / "slora" / "config.pbtxt")

    def run(gpus: str, *extra: str, tp: str = "") -> list[str]:
        env = dict(os.environ, TRITONSERVER="/bin/echo", SLORA_LAUNCH_GPUS=gpus,
                   SLORA_TENSOR_PARALLEL_SIZE=tp)
        out = subprocess.run([str(ROOT / "scripts" / "tritonserver.sh"), "--model-repository",
                              str(repository), *extra], env=env, capture_output=True,
                             text=True, check=True, timeout=60)
        return out.stdout.split()

    return run, repository


def test_launcher_gives_each_gpu_a_group(launch) -> None:
    run, repository = launch
    args = run("2")
    assert args[args.index("--model-config-name") + 1] == "gpus2"
    assert TWO_GPUS in (repository / "slora" / "configs" / "gpus2.pbtxt").read_text()
    for gpus in ("0", "1"):  # CPU host, one GPU: the committed KIND_AUTO config
        assert "--model-config-name" not in run(gpus)
    mine = run("2", "--model-config-name", "mine")  # the caller's choice wins
    assert mine.count("--model-config-name") == 1 and "mine" in mine
    tp = run("4", tp="2")  # two engines of 2 GPUs each
    assert tp[tp.index("--model-config-name") + 1] == "gpus4_tp2"
    assert (repository / "slora" / "configs" / "gpus4_tp2.pbtxt").read_text().count(
        "kind: KIND_GPU") == 2
