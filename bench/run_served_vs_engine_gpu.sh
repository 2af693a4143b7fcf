#!/usr/bin/env bash
# Served vs in-process throughput on the GPU host, in one device call (docs/BENCHMARKS.md):
#   bash bench/run_served_vs_engine_gpu.sh OUT_DIR TOKENIZER_DIR [DEVICE_DIR]
# DEVICE_DIR (default .device, carried): what ../shared/device/pack-tritonserver.sh packed,
# plus a copy of ../shared/device/gpu-setup.sh. TOKENIZER_DIR: SmolLM2's tokenizer.json.
# Llama-7B shape with random fp16 weights, 100 q,k,v,o adapters (ranks 8-64) + base, 600
# requests of ~128 prompt tokens and exactly 128 output tokens; in-process at 256 and 32 in
# flight, then the real tritonserver at 256 streams, 256 non-streaming, 32 streams.
set -u
out=${1:?OUT_DIR}
tok=${2:?TOKENIZER_DIR}
dev=${3:-.device}
mkdir -p "$out"
# a bare checkout (the GPU host has no editable install): the kernels package is in kernels/
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# shellcheck disable=SC1091
source bench/gpu_server_setup.sh "$dev" "$out/setup.log" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 470 python3 bench/bench_served_vs_engine.py --preset gpu --tokenizer "$tok" --out "$out"
echo "exit $?"
