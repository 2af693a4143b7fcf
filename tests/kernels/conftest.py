"""Kernel tests: on a machine without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1).

The variable must be set before any ``@triton.jit`` function is created, so it is set here,
before this folder imports triton or the kernels; a kernels module that something else imported
earlier (another conftest, the engine) is reloaded so that its kernels are interpreted.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in (
        "slora_kernels.lora_common",
        "slora_kernels.lora_shrink",
        "slora_kernels.lora_expand",
        "slora_kernels.lora_grouped",
        "slora_kernels.lora",
        "slora_kernels.paged_attention",
        "slora_kernels.varlen_attention",
        "slora_kernels.rms_norm",
        "slora_kernels.rope_kv",
        "slora_kernels.silu_mul",
        "slora_kernels",
    ):
        if name in sys.modules:
            importlib.reload(sys.modules[name])

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
