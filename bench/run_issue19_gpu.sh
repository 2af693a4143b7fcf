#!/usr/bin/env bash
# Issue 19 on one GPU, in one device call (ends within ~9.5 minutes of wall time):
#   bash bench/run_issue19_gpu.sh OUT_DIR TOKENIZER_DIR [OLD_TREES]
# TOKENIZER_DIR: SmolLM2's tokenizer. OLD_TREES (default .device/issue19_old): the older commits'
# engine and bench, one folder per commit, made beforehand from a git checkout (the device
# machine gets the working tree without .git) and carried along:
#   bash bench/run_issue19_gpu.sh --prepare .device/issue19_old      # ~0.8 MB
# 1. CUDA tests: issue 18's side-stream pool copy, the new kernels (fused norm, RoPE + KV
#    write, silu*up, varlen attention), the
#    refactored prefill attention, mixed-step graphs against HF + PEFT and against the eager
#    path, the model on CUDA, async scheduling on CUDA;
# 2. the prefill LoRA kernels (8 x 256 tokens, 8 adapters): MBGMM (eager path; its expand's
#    launch configurations swept first) and the grouped MBGMV (mixed-step graphs) against a
#    device copy of their bytes;
# 3. bench_engine_gpu.py on the issue's workload (Llama-7B shape, random fp16, 600 requests,
#    lengths uniform in [8, 512], EOS ignored, max_num_seqs 256, max_num_batched_tokens 4096):
#    NEW (this tree: base, then LoRA with 100 adapters resident), with per step kind device
#    times and the mixed-step bound; if it fails, again with cuda_graph_mixed off;
# 4. OLD: the same workload on commit c9dfa4d (its own bench script: base, LoRA cold, LoRA
#    resident), then today's main a1824fc if time is left.
# Then a summary table (bench/summarize_issue19.py), printed last and in OUT_DIR/summary.md.
# ONLY_ENGINES=1: parts 3 and 4 only, c9dfa4d alone (a call that must also fit other work).
# OUT_DIR gets at most 8 files: tests.log, bench.log, lora_kernels.json, engine_new.json,
# engine_old.json, engine_main.json, summary.md.
set -u
REVS=(c9dfa4d a1824fc)
[ -n "${ONLY_ENGINES:-}" ] && REVS=(c9dfa4d)
if [ "${1:-}" = --prepare ]; then  # the older trees: engine, kernels, test helpers, the bench
    for rev in "${REVS[@]}"; do
        mkdir -p "${2:?DEST}/$rev"
        paths=(slora_backend kernels bench/bench_engine_gpu.py)
        git cat-file -e "$rev:slora_testing" 2>/dev/null && paths+=(slora_testing)
        git archive "$rev" "${paths[@]}" | tar -x -C "$2/$rev"
    done
    du -sh "$2"
    exit
fi
out=${1:?OUT_DIR}
tok=$(cd "${2:?TOKENIZER_DIR}" && pwd)
old_trees=$(cd "${3:-.device/issue19_old}" 2>/dev/null && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$PWD
scratch=$(mktemp -d /tmp/issue19.XXXXXX)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU host: python3 3.12 with torch, triton, transformers, peft
deadline=$(( $(date +%s) + ${DEADLINE_S:-555} ))  # DEADLINE_S: a shorter call
WORKLOAD=(--tokenizer "$tok" --num-requests 600 --lengths 8,512 --max-num-seqs 256
          --max-num-batched-tokens 4096)

step() {  # step LIMIT LOG NAME CMD... : at most LIMIT seconds and never past the deadline
    local limit=$1 log=$2 name=$3
    shift 3
    local left=$(( deadline - $(date +%s) - 5 ))
    (( left < limit )) && limit=$left
    if (( limit < 30 )); then
        echo "=== $name: skipped (${left}s left)" | tee -a "$out/bench.log"
        return 99
    fi
    local t0=$(date +%s)
    echo "=== $name ($(date +%T), limit ${limit}s): $*" >> "$log"
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$log"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/bench.log"
# shellcheck disable=SC1091
source bench/device_tokenizer.sh "$tok"
new_env=(env "PYTHONPATH=$repo:$repo/kernels")

if [ -z "${ONLY_ENGINES:-}" ]; then
step 130 "$out/tests.log" tests_new "${new_env[@]}" "$PY" -m pytest -q -p no:cacheprovider \
    tests/engine/test_pool_copy_cuda.py tests/kernels/test_kernel_layer_ops.py tests/kernels/test_kernel_varlen_attention.py \
    tests/kernels/test_mixed_graphs.py tests/engine/test_cuda_graph_mixed.py \
    tests/kernels/test_kernel_forward.py tests/model/test_model_cuda.py \
    "tests/engine/test_async_scheduling.py::test_async_equals_sync_on_cuda"
step 40 "$out/tests.log" tests_attention "${new_env[@]}" "$PY" -m pytest -q \
    -p no:cacheprovider tests/kernels/test_kernel_attention.py -k "prefill or kv_write"
grep -E "passed|failed|error" "$out/tests.log" | tail -n 6

# MBGMM expand configurations at 8 and 16 x 256 tokens first (the kept one is then timed)
step 70 "$out/bench.log" lora_kernels "${new_env[@]}" "$PY" bench/bench_lora_kernels.py \
    --sweep mbgmm-expand --cases prefill --out "$scratch/lora"
cp "$scratch/lora/lora_kernels.json" "$out/" 2>/dev/null
fi

if ! step 170 "$out/bench.log" engine_new "${new_env[@]}" "$PY" bench/bench_engine_gpu.py \
        "${WORKLOAD[@]}" --runs base,lora_resident --out "$scratch/new/engine.json"; then
    step 150 "$out/bench.log" engine_new_mixed_off "${new_env[@]}" "$PY" \
        bench/bench_engine_gpu.py "${WORKLOAD[@]}" --runs base,lora_resident \
        --cuda-graph-mixed off --out "$scratch/new/engine.json"
fi
cp "$scratch/new/engine.json" "$out/engine_new.json" 2>/dev/null

for rev in "${REVS[@]}"; do
    name=$([ "$rev" = c9dfa4d ] && echo old || echo main)
    tree=$scratch/$rev
    if [ -n "$old_trees" ] && [ -d "$old_trees/$rev" ]; then
        cp -r "$old_trees/$rev" "$tree"
    elif git cat-file -e "$rev" 2>/dev/null; then
        mkdir -p "$tree" && git archive "$rev" | tar -x -C "$tree"
    else
        echo "=== engine_$name ($rev): no tree (run --prepare and carry it)" | tee -a "$out/bench.log"
        continue
    fi
    # the kernels' package moved under kernels/ after c9dfa4d: both on the path
    (cd "$tree" && step 180 "$out/bench.log" "engine_$name ($rev)" \
        env "PYTHONPATH=$tree:$tree/kernels" "$PY" bench/bench_engine_gpu.py \
        "${WORKLOAD[@]}" --out "$tree/engine.json")
    cp "$tree/engine.json" "$out/engine_$name.json" 2>/dev/null
done

"${new_env[@]}" "$PY" bench/summarize_issue19.py "$out" | tee "$out/summary.md"
rm -rf "$scratch"
