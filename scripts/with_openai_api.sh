#!/usr/bin/env bash
# scripts/with_openai_api.sh CMD ARGS...   (make serve, the container's entry point)
#
# Runs CMD ARGS (scripts/tritonserver.sh ...) and, next to it, the OpenAI-compatible API server
# (python -m client.openai_api, README "OpenAI API") on OPENAI_PORT (default 9000) as a gRPC
# client of tritonserver's --grpc-port (default 8001). OPENAI_PORT=0 runs CMD alone. They stop
# together: SIGINT/SIGTERM go to CMD, and when CMD exits the API server is stopped; the exit
# status is CMD's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPENAI_PORT="${OPENAI_PORT:-9000}"
if [[ "$OPENAI_PORT" == 0 ]]; then
    exec "$@"
fi

GRPC=8001
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
        --grpc-port=*) GRPC="${ARGS[i]#*=}" ;;
        --grpc-port) GRPC="${ARGS[i + 1]:-$GRPC}" ;;
    esac
done
PY="${VENV:-$ROOT/.venv}/bin/python"
[[ -x "$PY" ]] || PY=python3

"$@" &
SERVER_PID=$!
(cd "$ROOT" && exec "$PY" -m client.openai_api --port "$OPENAI_PORT" \
    --triton-url "localhost:$GRPC") &
API_PID=$!

# a trapped signal ends `wait` early: wait again for the server's own exit status
interrupted=0
trap 'interrupted=1; kill -TERM "$SERVER_PID" 2>/dev/null || true' INT TERM
rc=0
wait "$SERVER_PID" || rc=$?
while ((interrupted)); do
    interrupted=0
    rc=0
    wait "$SERVER_PID" || rc=$?
done
kill -TERM "$API_PID" 2>/dev/null || true
wait "$API_PID" 2>/dev/null || true
exit "$rc"
