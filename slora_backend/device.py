"""The engine's GPU as the calling thread's current CUDA device.

Triton kernels launch on the current device's current stream, and CUDA graphs, events and
pinned buffers belong to the current device too, whatever device the tensors are on. The
current device is per thread, and 0 by default: an engine on cuda:1 (the second instance of a
Triton model on a 2-GPU host) sets it in every thread that does CUDA work for it.
"""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device with an index: a bare "cuda" is the calling thread's current
    GPU, so that the engine's other threads can be bound to the same one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def use_device(device: torch.device | str) -> None:
    """Make `device` this thread's current CUDA device (nothing to do for the CPU)."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
