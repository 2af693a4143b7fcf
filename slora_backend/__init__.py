"""S-LoRA multi-adapter serving engine (used by the Triton Python backend model).

Names are imported lazily so that light modules (errors, config) do not pull in torch and the
model code.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EngineConfig": "slora_backend.config",
    "EngineError": "slora_backend.errors",
    "ErrorCode": "slora_backend.errors",
    "SamplingParams": "slora_backend.sampling_params",
    "LLMEngine": "slora_backend.engine.engine",
    "EngineLoop": "slora_backend.engine.loop",
    "EngineStats": "slora_backend.engine.engine",
    "RequestOutput": "slora_backend.engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slora_backend' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
