#!/usr/bin/env bash
# Container entry point (docker/Dockerfile).
#   no arguments, or only options ('-...'): the README's `make serve` command, i.e.
#       scripts/tritonserver.sh --model-repository model_repository + the three ports,
#     with the options appended (e.g. --log-verbose=1), and the OpenAI API on OPENAI_PORT
#     (9000; 0 = off) next to it (scripts/with_openai_api.sh);
#   anything else: run that command instead (e.g. `bash`, `locust ...`, `python -m client ...`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -eq 0 || "$1" == -* ]]; then
    OPENAI_PORT="${OPENAI_PORT:-9000}" exec scripts/with_openai_api.sh \
        scripts/tritonserver.sh --model-repository model_repository \
        --http-port "${HTTP_PORT:-8000}" --grpc-port "${GRPC_PORT:-8001}" \
        --metrics-port "${METRICS_PORT:-8002}" "$@"
fi
exec "$@"
