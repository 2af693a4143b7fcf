"""An adapter's values: every weight finite in the model dtype (NaN/Inf refused).

The check runs where it costs least: on a GPU, on the device during the pool copy
(pool_copy.py); on a CPU engine, in the loader thread once the adapter is loaded
(AdapterSource.prepare_for_host_pool), off the engine loop, unless the pool copy comes first and
checks on the host; a tensor-parallel GPU engine's rank 0 checks the host buffer at its pool
copy (parallel/adapters.py ShardedCopier, the CPU copier's path). A NaN/Inf refuses the adapter
at its pool copy (AdapterManager), wherever it was found.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from slora_backend.adapters.validation import refuse, tensor_key
from slora_backend.errors import EngineError


def all_finite(buffer: torch.Tensor) -> bool:
    """Every element finite, on the CPU at memory speed: a finite sum proves it (NaN and Inf
    propagate); a sum in the buffer's own dtype is torch's fastest CPU reduction (64 MB fp32:
    18 GB/s, fp16: 8 GB/s; isfinite runs at 0.7). Large finite values may overflow it: then min
    and max decide."""
    return bool(torch.isfinite(buffer.sum())) or bool(finite_flag(buffer))


def finite_flag(buffer: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on the buffer's device (a GPU does not wait for it): every element finite. Min
    and max read the values once and allocate nothing as large as them (NaN propagates into
    both, an Inf into one)."""
    low, high = torch.aminmax(buffer)
    return torch.isfinite(low) & torch.isfinite(high)


def non_finite_error(adapter_id: str,
                     factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> EngineError:
    """The INVALID_ARG naming the first tensor with a NaN/Inf (refusals only)."""
    dtype = next(iter(factors.values()))[0].dtype
    return refuse(adapter_id, f"tensor '{_first_non_finite(factors)}' has non-finite values "
                              f"(NaN/Inf) in {dtype}")


def _first_non_finite(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """The key of the first tensor with a NaN/Inf (a slow scan on the host)."""
    for module, (a, b) in factors.items():
        for which, stacked in (("A", a), ("B", b)):
            bad = ~torch.isfinite(stacked).flatten(1).all(dim=1)
            if bool(bad.any()):
                return tensor_key(int(bad.nonzero()[0]), module, which)
    return "?"
