#!/usr/bin/env bash
# Sourced by the GPU scripts (run_issue18_gpu.sh, run_issue19_gpu.sh) with TOKENIZER_DIR: the
# CUDA tests' tiny model reuses SmolLM2's tokenizer files from .cache/models/SmolLM2-135M-Instruct,
# which a fresh device machine lacks (on 2026-12-07 four CUDA tests failed for that alone), so
# TOKENIZER_DIR's files (tokenizer.json, tokenizer_config.json, chat_template.jinja) go there.
smollm_dir=.cache/models/SmolLM2-135M-Instruct
if [ ! -e "$smollm_dir/tokenizer.json" ]; then
    mkdir -p "$smollm_dir" && cp "${1:?TOKENIZER_DIR}"/* "$smollm_dir"/
fi
