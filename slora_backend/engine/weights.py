"""What an engine builds from its config before anything else: the model's weights (all of
them, or one tensor-parallel rank's share) and the size of its unified pool. Shared by the
engine and the tensor-parallel worker processes (slora_backend/parallel/worker.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slora_backend.config import DEFAULT_CPU_POOL_BYTES, EngineConfig
from slora_backend.errors import EngineError
from slora_backend.memory_pool import pages_for_bytes
from slora_backend.model import LlamaModel, ModelSpec, UnsupportedModelError, load_model, load_spec

if TYPE_CHECKING:
    from slora_backend.parallel.shard import Shard

MIN_POOL_PAGES = 2


def load_weights(config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None = None) -> tuple[ModelSpec, LlamaModel]:
    """load_model (or random weights for load_format 'dummy') with its failures turned into an
    EngineError naming the 'model' field. `shard`: one tensor-parallel rank's share (the spec
    returned is the whole model's; the model's own is its share's)."""
    try:
        if config.load_format == "dummy":
            spec = load_spec(config.model)
            local = spec if shard is None else shard.local_spec(spec)
            return spec, LlamaModel.random(local, dtype, device, seed=config.seed)
        return load_model(config.model, dtype, device, shard)
    except (FileNotFoundError, UnsupportedModelError) as err:
        raise EngineError.invalid("model", str(err)) from err


def pool_pages(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype,
               device: torch.device) -> int:
    """Pages of the unified pool: `pool_bytes`, else `pool_fraction` of the free GPU memory,
    else DEFAULT_CPU_POOL_BYTES (per device: `spec` is the model, or a rank's share)."""
    page_elems = spec.page_elems(config.block_size)
    pool_bytes = config.pool_bytes
    if pool_bytes is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pool_bytes = int(free * config.pool_fraction)
    elif pool_bytes is None:
        pool_bytes = DEFAULT_CPU_POOL_BYTES
    pages = pages_for_bytes(pool_bytes, spec.num_layers, page_elems, dtype)
    if pages < MIN_POOL_PAGES:
        raise EngineError.invalid("pool_bytes", f"{pool_bytes} bytes hold only {pages} pages "
                                                f"of {config.block_size} tokens")
    return pages
