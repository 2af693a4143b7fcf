#!/usr/bin/env bash
# One GPU, tensor_parallel_size 1: an older tree's engine against this one's, same machine,
# runs alternated (old, new, old, new, ...) so that drift hits both (issue 21: "no cost at 1").
#   bench/compare_tp1_gpu.sh OLD_TREE TOKENIZER_DIR OUT_DIR [ROUNDS]
# OLD_TREE holds slora_backend, kernels, bench and slora_testing of the older commit, e.g.
#   mkdir -p .device/old && git archive COMMIT slora_backend kernels bench slora_testing \
#       | tar -x -C .device/old
# Each run is bench/bench_engine_gpu.py (Llama-7B shape, random fp16, 100 requests, 20
# adapters: base, LoRA from disk, LoRA resident); the summary prints output tokens/s per run.
set -u
old=$(cd "${1:?OLD_TREE}" && pwd)
tok=${2:?TOKENIZER_DIR}
out=${3:?OUT_DIR}
rounds=${4:-2}
new=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
for round in $(seq 1 "$rounds"); do
    for side in old new; do
        tree=$old
        [[ $side == new ]] && tree=$new
        echo "=== round $round, $side ($tree), $(date +%T)"
        PYTHONPATH="$tree:$tree/kernels" timeout 150 python "$tree/bench/bench_engine_gpu.py" \
            --tokenizer "$tok" --num-requests 100 --num-adapters 20 \
            --out "$out/$side-$round.json" >"$out/$side-$round.log" 2>&1
        echo "=== exit $?"
    done
done
python - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
cases = ("base", "lora_cold", "lora_resident")
print("run      " + "  ".join(f"{c:>14}" for c in cases) + "   (output tokens/s)")
for path in sorted(out.glob("*-*.json"), key=lambda p: (p.stem.split("-")[1], p.stem)):
    result = json.loads(path.read_text())
    print(f"{path.stem:8} " + "  ".join(f"{result[c]['output_tokens_per_s']:>14}"
                                        for c in cases))
EOF
