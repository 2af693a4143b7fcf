"""Tensor parallelism (S-LoRA's third idea): one engine over several devices of one host.

shard.py (what each rank keeps: Megatron for the base, S-LoRA's partition for the adapters),
comm.py (the process groups and collectives), step.py / kernel_lora.py (the sharded LoRA of a
step, torch and triton backends), adapters.py (adapter shares into every rank's pool),
executor.py (one rank's part of a step), driver.py (rank 0: workers, supervision, the step
plan), worker.py (ranks 1..tp-1). docs/DESIGN.md "Tensor parallelism".
"""
