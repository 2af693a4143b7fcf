#!/usr/bin/env bash
# Everything measured on the GPU machine in one go (docs/BENCHMARKS.md records its output):
#   bench/run_gpu_suite.sh OUT_DIR TOKENIZER_DIR
# 1. the engine end to end at Llama-7B scale, LoRA vs base (bench_engine_gpu.py);
# 2. the kernel and CUDA tests at real shapes (tests/kernels, tests/model/test_model_cuda.py,
#    the CUDA cases of tests/engine/test_async_scheduling.py and test_logprobs.py);
# 3. profiles of decode and prefill steps (profile_engine_gpu.py);
# 4. the LoRA kernel, attention and adapter-load benchmarks, and the side-stream overlap
#    experiment (bench_lora_overlap.py).
# Each step has its own time limit so that one stuck step leaves the others' results.
set -u
out=${1:?OUT_DIR}
tok=${2:?TOKENIZER_DIR}
mkdir -p "$out"
# a bare checkout (the GPU host has no editable install): the kernels package is in kernels/
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS NAME CMD...
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "=== $name: exit $?"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
step 220 engine python bench/bench_engine_gpu.py --tokenizer "$tok" --out "$out/engine_gpu.json"
step 300 tests python -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_model_cuda.py \
    tests/engine/test_async_scheduling.py tests/engine/test_logprobs.py
step 120 profile_decode python bench/profile_engine_gpu.py --tokenizer "$tok"
step 120 profile_prefill python bench/profile_engine_gpu.py --tokenizer "$tok" --phase prefill
step 200 lora_kernels python bench/bench_lora_kernels.py --sweep grouped,mbgmm-expand --out "$out"
step 60 lora_overlap python bench/bench_lora_overlap.py
step 50 attention python bench/bench_attention.py --out "$out"
step 50 adapter_load python bench/bench_adapter_load.py --llama7b --no-ttft \
    --out "$out/adapter_load.json"
