#!/usr/bin/env bash
# One engine per GPU (Triton instance groups, docs/SCALING.md section 1), measured on a machine
# with G >= 2 GPUs: the real tritonserver serves a Llama-7B-shaped model (random fp16 weights,
# load_format=dummy) with 1, then all G GPUs visible, under the same client load
# (bench_server_throughput.py); per-GPU utilisation is sampled by nvidia-smi meanwhile.
#   [GPU_COUNTS="1 2"] bench/run_multi_gpu.sh OUT_DIR TOKENIZER_DIR [SERVER_CMD...]
# SERVER_CMD: how to start tritonserver (default scripts/tritonserver.sh, which gives each GPU
# its own instance group when 2+ are visible; the model repository is appended).
# docs/BENCHMARKS.md records the output.
set -u
out=${1:?OUT_DIR}
tok=${2:?TOKENIZER_DIR}
shift 2
server=("$@")
[[ ${#server[@]} -gt 0 ]] || server=(scripts/tritonserver.sh)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
python bench/make_served_model.py "$work" --tokenizer "$tok" --num-adapters "${ADAPTERS:-32}" \
    || exit 1
export SLORA_MODEL=$work/model SLORA_ADAPTER_DIR=$work/adapters SLORA_LOAD_FORMAT=dummy
export SLORA_MAX_NUM_SEQS=${MAX_NUM_SEQS:-256} SLORA_MAX_NUM_BATCHED_TOKENS=4096
export SLORA_POOL_FRACTION=0.8 SLORA_MAX_LOADED_ADAPTERS=64
ngpu=$(nvidia-smi -L | wc -l)
for n in ${GPU_COUNTS:-1 $ngpu}; do
    gpus=$(seq -s, 0 $((n - 1)))
    echo "=== $n GPU(s): CUDA_VISIBLE_DEVICES=$gpus ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpus "${server[@]}" --model-repository model_repository \
        >"$out/server-$n.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do
        curl -sf localhost:8000/v2/health/ready >/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 1
    done
    curl -sf localhost:8000/v2/health/ready >/dev/null || { tail -30 "$out/server-$n.log"; exit 1; }
    echo "ready after ${SECONDS}s"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader -l 1 \
        >"$out/smi-$n.csv" &
    smi=$!
    python bench/bench_server_throughput.py --concurrency "${CONCURRENCY:-256}" \
        --num-requests "${REQUESTS:-1536}" --max-tokens 128 --input-tokens 128 \
        --procs "${PROCS:-8}" --adapter-dir "$work/adapters" --out "$out/engines-$n.json"
    kill $smi
    curl -s localhost:8002/metrics | grep -E '^slora_(requests_total|generated_tokens_total)' >"$out/metrics-$n.txt"
    kill -INT $pid
    wait $pid
done
rm -rf "$work"
