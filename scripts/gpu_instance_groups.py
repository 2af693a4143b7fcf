"""One instance group per GPU for a model of a Triton model repository (hosts with 2+ GPUs).

The committed config.pbtxt says `instance_group [ { count: 1, kind: KIND_AUTO } ]`, which loads
on CPU hosts too. On a host with several GPUs Triton 2.51 turned that into one instance per GPU
all named `<model>_0_0`, and its Python backend crashed on the first requests
(docs/SCALING.md). This writes `<repo>/<model>/configs/<name>.pbtxt`: the same config with one
`KIND_GPU` group per GPU (instances `<model>_0_0`, `<model>_1_0`, ...), for
`tritonserver --model-config-name <name>`; scripts/tritonserver.sh does that by itself.

    python scripts/gpu_instance_groups.py REPOSITORY NUM_GPUS [--model slora]  -> prints <name>
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

CONFIG = "config.pbtxt"
CONFIGS_DIR = "configs"  # Triton's folder of custom configs, chosen by --model-config-name
INSTANCE_GROUP_LINE = re.compile(r"^instance_group[ \t]*\[.*\][ \t]*$", re.MULTILINE)


def config_name(num_gpus: int) -> str:
    return f"gpus{num_gpus}"


def per_gpu_config(config_text: str, num_gpus: int) -> str:
    """`config_text` with its one-line instance_group replaced by one KIND_GPU group per GPU."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    groups = ", ".join(f"{{ count: 1, kind: KIND_GPU, gpus: [ {g} ] }}" for g in range(num_gpus))
    text, n = INSTANCE_GROUP_LINE.subn(f"instance_group [ {groups} ]", config_text)
    if n != 1:
        raise ValueError(f"expected one single-line instance_group in the config, found {n}")
    return text


def write_config(repository: Path, model: str, num_gpus: int) -> str:
    """Write the per-GPU config of `model` in `repository`; returns its --model-config-name."""
    model_dir = repository / model
    name = config_name(num_gpus)
    text = per_gpu_config((model_dir / CONFIG).read_text(), num_gpus)
    (model_dir / CONFIGS_DIR).mkdir(exist_ok=True)
    (model_dir / CONFIGS_DIR / f"{name}.pbtxt").write_text(text)
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("repository", type=Path)
    p.add_argument("num_gpus", type=int)
    p.add_argument("--model", default="slora")
    args = p.parse_args()
    print(write_config(args.repository, args.model, args.num_gpus))


if __name__ == "__main__":
    main()
