"""Helpers for tests, benchmarks and scripts; not part of the runtime packages (slora_backend,
slora_kernels): synthetic PEFT adapters and tiny models (synthetic_adapters), random LoRA pools
and GPU timers for the kernels (kernel_pools)."""
