"""One instance group per GPU for a model of a Triton model repository (hosts with 2+ GPUs).

The committed config.pbtxt says `instance_group [ { count: 1, kind: KIND_AUTO } ]`, which loads
on CPU hosts too. On a host with several GPUs Triton 2.51 turned that into one instance per GPU
all named `<model>_0_0`, and its Python backend crashed on the first requests
(docs/SCALING.md). This writes `<repo>/<model>/configs/<name>.pbtxt`: the same config with one
`KIND_GPU` group per GPU (instances `<model>_0_0`, `<model>_1_0`, ...), for
`tritonserver --model-config-name <name>`; scripts/tritonserver.sh does that by itself.

With tensor parallelism (`tensor_parallel_size` tp > 1: the config's parameter, or the env var
SLORA_TENSOR_PARALLEL_SIZE that overrides it) one instance spans tp GPUs: the groups sit on
GPUs 0, tp, 2 tp, ... (NUM_GPUS // tp engines), and each engine takes the tp GPUs from its
group's (docs/SCALING.md "Tensor parallelism").

    python scripts/gpu_instance_groups.py REPOSITORY NUM_GPUS [--model slora]  -> prints <name>
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

CONFIG = "config.pbtxt"
CONFIGS_DIR = "configs"  # Triton's folder of custom configs, chosen by --model-config-name
INSTANCE_GROUP_LINE = re.compile(r"^instance_group[ \t]*\[.*\][ \t]*$", re.MULTILINE)
TP_PARAMETER = re.compile(r'key:\s*"tensor_parallel_size"\s*value:\s*\{\s*string_value:\s*"(\d*)"')
TP_ENV = "SLORA_TENSOR_PARALLEL_SIZE"


def config_name(num_gpus: int, tp: int = 1) -> str:
    return f"gpus{num_gpus}" if tp == 1 else f"gpus{num_gpus}_tp{tp}"


def tensor_parallel_size(config_text: str, env: dict[str, str]) -> int:
    """The env var, else the config's parameter, else 1 (as the engine reads them)."""
    match = TP_PARAMETER.search(config_text)
    value = env.get(TP_ENV, "").strip() or (match.group(1) if match else "")
    return int(value) if value else 1


def per_gpu_config(config_text: str, num_gpus: int, tp: int = 1) -> str:
    """`config_text` with its one-line instance_group replaced by one KIND_GPU group per
    engine: on every GPU, or on GPUs 0, tp, 2 tp, ... when an engine spans tp GPUs."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if tp < 1 or tp > num_gpus:
        raise ValueError(f"tensor_parallel_size {tp} needs 1 to {num_gpus} GPUs per engine")
    groups = ", ".join(f"{{ count: 1, kind: KIND_GPU, gpus: [ {g} ] }}"
                       for g in range(0, num_gpus - tp + 1, tp))
    text, n = INSTANCE_GROUP_LINE.subn(f"instance_group [ {groups} ]", config_text)
    if n != 1:
        raise ValueError(f"expected one single-line instance_group in the config, found {n}")
    return text


def write_config(repository: Path, model: str, num_gpus: int,
                 env: dict[str, str] | None = None) -> str:
    """Write the per-GPU config of `model` in `repository`; returns its --model-config-name."""
    model_dir = repository / model
    base = (model_dir / CONFIG).read_text()
    tp = tensor_parallel_size(base, dict(os.environ) if env is None else env)
    name = config_name(num_gpus, tp)
    text = per_gpu_config(base, num_gpus, tp)
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
