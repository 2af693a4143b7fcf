"""EngineConfig and SamplingParams validation (every refusal names its field)."""

from __future__ import annotations

import os

import pytest

from slora_backend.config import REPO_ROOT, EngineConfig
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.sampling_params import SamplingParams


def refused_field(exc: pytest.ExceptionInfo[EngineError]) -> str:
    assert exc.value.code is ErrorCode.INVALID_ARG
    return exc.value.message


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("max_rank", -1), ("max_num_seqs", 1.5), ("max_waiting", True),
    ("pool_bytes", 0), ("pool_fraction", 0.0), ("pool_fraction", 1.5), ("dtype", "int8"),
    ("device", "tpu"), ("model", ""), ("seed", -1), ("max_num_batched_tokens", "12"),
    ("kernel_backend", "cuda"), ("cuda_graph_max_batch", -1),
    ("async_scheduling", "yes"), ("load_format", "npz"), ("cuda_graph_mixed", "yes"),
    ("host_cache_workers", -1),
])
def test_engine_config_refuses_bad_fields(field: str, value: object) -> None:
    with pytest.raises(EngineError) as exc:
        EngineConfig(**{field: value})
    assert f"'{field}'" in refused_field(exc)


def test_engine_config_defaults_and_aliases() -> None:
    cfg = EngineConfig(dtype="fp16", device="cuda:1")
    assert cfg.dtype == "float16" and cfg.device == "cuda:1"
    cpu = EngineConfig(device="cpu")
    assert str(cpu.torch_dtype) == "torch.float32"  # auto dtype on CPU
    cpus = len(os.sched_getaffinity(0))
    assert cpu.resolved_host_cache_workers == max(1, min(8, cpus // 2))  # auto: half the CPUs
    assert EngineConfig(host_cache_workers=3).resolved_host_cache_workers == 3


def test_from_parameters_with_env_overrides() -> None:
    params = {"block_size": "8", "pool_bytes": "", "max_rank": "32", "dtype": "fp32",
              "adapter_dir": "adapters"}
    env = {"SLORA_MODEL": "/abs/model", "SLORA_MAX_RANK": "16", "SLORA_ADAPTER_DIR": "",
           "UNRELATED": "x"}
    cfg = EngineConfig.from_parameters(params, env=env)
    assert cfg.block_size == 8 and cfg.pool_bytes is None
    assert cfg.max_rank == 16  # env wins over the parameter
    assert cfg.model == "/abs/model"
    assert cfg.adapter_dir == str(REPO_ROOT / "adapters")  # relative -> repo root
    assert cfg.dtype == "float32"


@pytest.mark.parametrize("params,field", [
    ({"block_size": "sixteen"}, "block_size"),
    ({"pool_fraction": "2"}, "pool_fraction"),
    ({"no_such_option": "1"}, "no_such_option"),
])
def test_from_parameters_refuses_by_name(params: dict[str, str], field: str) -> None:
    with pytest.raises(EngineError) as exc:
        EngineConfig.from_parameters(params, env={})
    assert f"'{field}'" in refused_field(exc)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"stop": "x"}, "stop"),
    ({"stop": [""]}, "stop"), ({"stop": ["a"] * 17}, "stop"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_sampling_params_refuse_bad_fields(kwargs: dict, field: str) -> None:
    with pytest.raises(EngineError) as exc:
        SamplingParams(**kwargs)
    assert f"'{field}'" in refused_field(exc)


def test_sampling_params_from_vllm_json() -> None:
    p = SamplingParams.from_dict({"max_tokens": "32", "temperature": "0", "top_k": 5,
                                  "top_p": "0.9", "stop": "###", "ignore_eos": "true",
                                  "seed": "7", "lora_name": "pirate", "stream": False})
    assert p == SamplingParams(max_tokens=32, temperature=0.0, top_p=0.9, top_k=5, seed=7,
                               stop=["###"], ignore_eos=True)
    assert p.greedy
    for bad, field in [({"max_tokens": "many"}, "max_tokens"), ({"ignore_eos": "maybe"},
                       "ignore_eos"), ({"best_of": 2}, "best_of")]:
        with pytest.raises(EngineError) as exc:
            SamplingParams.from_dict(bad)
        assert f"'{field}'" in refused_field(exc)
