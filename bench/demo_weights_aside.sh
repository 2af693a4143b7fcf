#!/usr/bin/env bash
# Issue 18's call 2 on the GPU host carries .device (tritonserver, the numpy<2 wheels, the
# tokenizer: ~50 MB) beside the working tree, and the device tool sends 64 MiB at most; the
# three demo adapters' weights (adapters/*/adapter_model.safetensors, 30 MB, tracked) would
# take it over, and that call does not use them. Run from the repo root, here, around the call:
#   bash bench/demo_weights_aside.sh out    # the weights to $ASIDE (default below)
#   ...the device call...
#   bash bench/demo_weights_aside.sh back   # and back (the tree is as committed again)
set -euo pipefail
aside=${ASIDE:-/tmp/slora_demo_weights}
case "${1:-}" in
    out)
        mkdir -p "$aside"
        for f in adapters/*/adapter_model.safetensors; do
            mv "$f" "$aside/$(basename "$(dirname "$f")").safetensors"
        done ;;
    back)
        for f in "$aside"/*.safetensors; do
            mv "$f" "adapters/$(basename "$f" .safetensors)/adapter_model.safetensors"
        done ;;
    *) echo "usage: $0 out|back" >&2; exit 2 ;;
esac
