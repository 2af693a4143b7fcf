#!/usr/bin/env bash
# Issue 18 on the GPU host, from the repository root, inside one device call
# (docs/BENCHMARKS.md "S-LoRA's Table 3"):
#   bash bench/run_issue18_gpu.sh OUT_DIR TOKENIZER_DIR [DEVICE_DIR]
# TOKENIZER_DIR: SmolLM2's tokenizer.json (+ tokenizer_config.json). DEVICE_DIR (part ttft
# only): ../shared/device/pack-tritonserver.sh's output plus a copy of gpu-setup.sh.
# PARTS (default "tests,table3") picks what runs, in this order:
#   tests      the CUDA tests of the changed code: the side-stream pool copy, async scheduling,
#              the model on CUDA, the fused layer kernels
#   contention a step's small host -> device copy behind an adapter's large one, and the host
#              wait of a setitem on a busy stream (bench_copy_contention.py)
#   table3     S-LoRA's Table 3: n = 0/5/100/1000/2000, cold and preloaded, 600 requests,
#              Llama-7B shape (bench_table3.py; one engine; stops starting runs in time), with
#              the host's waits for the device counted by source line (--sync-debug)
#   loader     disk -> host GB/s with 1..16 loader threads (bench_adapter_load.py)
#   smallpool  n=2000 cold with the pool at 45% of free memory instead of 80%: the used adapters
#              no longer all fit next to the KV (pool loads / evictions per request)
#   ttft       cold vs warm TTFT of a Llama-7B rank-64 q,k,v,o adapter (134 MB) through the
#              real tritonserver while 64 streams keep it busy (needs DEVICE_DIR)
# A second call: PARTS=loader,smallpool,ttft bash bench/run_issue18_gpu.sh OUT TOK .device
# BUDGET_S (default 540): the whole script's time; each part runs under what is left (and its
# own cap), so the call ends inside the device's 10 minutes.
set -u
out=${1:?OUT_DIR}
tok=${2:?TOKENIZER_DIR}
dev=${3:-}
parts=",${PARTS:-tests,table3},"
budget=${BUDGET_S:-540}
mkdir -p "$out"
# a bare checkout (the GPU host has no editable install): the kernels package is in kernels/
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

left() { echo $((budget - SECONDS)); }
wanted() { [[ $parts == *",$1,"* ]]; }
part() {  # part NAME CAP_SECONDS CMD...: under min(CAP, time left - 10 s); skipped below 30 s
    local name=$1 cap=$2 limit
    shift 2
    wanted "$name" || return 0
    limit=$(($(left) - 10))
    ((cap < limit)) && limit=$cap
    if ((limit < 30)); then
        echo "=== $name: skipped, ${limit}s left"
        return 0
    fi
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "=== $name: exit $? (${SECONDS}s in all)"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# shellcheck disable=SC1091
source bench/device_tokenizer.sh "$tok"
echo "CPUs: $(nproc), memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
part tests 200 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_pool_copy_cuda.py tests/engine/test_async_scheduling.py \
    tests/model/test_model_cuda.py tests/kernels/test_kernel_layer_ops.py
part contention 40 python3 bench/bench_copy_contention.py --out "$out/contention.json"
# the bench starts no run it cannot finish by its deadline (the JSON holds every finished run)
part table3 9999 python3 bench/bench_table3.py --tokenizer "$tok" --out "$out/table3.json" \
    --sync-debug --deadline-s $(($(left) - 40))
part loader 90 python3 bench/bench_adapter_load.py --throughput-only --workers 1,2,4,8,16 \
    --throughput-count 32 --out "$out/adapter_load.json"
part smallpool 200 python3 bench/bench_table3.py --tokenizer "$tok" --ns 2000 --modes cold \
    --pool-fraction 0.45 --out "$out/table3_smallpool.json"
if wanted ttft; then
    # shellcheck disable=SC1091
    source bench/gpu_server_setup.sh "${dev:?DEVICE_DIR needed for ttft}" "$out/setup.log" \
        || exit 1
    work=$(mktemp -d)
    python3 bench/make_served_model.py "$work" --tokenizer "$tok" --num-adapters 0
    part ttft 240 python3 bench/bench_cold_ttft_server.py --serve --adapter-dir "$work/adapters" \
        --base-model "$work/model" --rank 64 --modules q_proj,k_proj,v_proj,o_proj \
        --dtype float16 --load-clients 64 --load-max-tokens 128 --repeats 10 \
        --server-env SLORA_LOAD_FORMAT=dummy,SLORA_MAX_NUM_SEQS=256,SLORA_MAX_NUM_BATCHED_TOKENS=4096,SLORA_POOL_FRACTION=0.8 \
        --out "$out/cold_ttft_gpu.json" --server-log "$out/cold_ttft_server.log"
fi
echo "done in ${SECONDS}s; results in $out"
