#!/usr/bin/env bash
# The one way to start tritonserver for this repo:  scripts/tritonserver.sh ARGS...
#
# Finds tritonserver (on PATH, e.g. in the NGC container, or the build inside the
# nvidia-pytriton wheel, prepared in .cache/tritonserver by scripts/get_tritonserver.sh),
# puts the venv's bin first on PATH (the Python backend stub runs the `python3` it finds
# there), makes the repo importable (slora_backend, slora_kernels, ...) for the stub, sets
# LD_LIBRARY_PATH / --backend-directory as needed, and runs tritonserver with ARGS (passing
# SIGTERM / SIGINT on to it and to its Python backend stubs).
#
# Env: VENV (default <repo>/.venv), TRITON_HOME (default <repo>/.cache/tritonserver),
#      TRITONSERVER (explicit path to a tritonserver binary, skips the search).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TRITON_HOME="${TRITON_HOME:-$ROOT/.cache/tritonserver}"

# Look for a system tritonserver before the venv's bin goes on PATH.
SYSTEM_TRITON="${TRITONSERVER:-$(command -v tritonserver || true)}"

if [[ -d "$VENV/bin" ]]; then
    export PATH="$VENV/bin:$PATH"
    export VIRTUAL_ENV="$VENV"
fi
# The repo is installed editable into the venv; PYTHONPATH also covers a python3 without it
# (e.g. the container's system interpreter).
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"

ARGS=("$@")
has_opt() {
    local opt="$1" a
    for a in "${ARGS[@]}"; do
        [[ "$a" == "$opt" || "$a" == "$opt="* ]] && return 0
    done
    return 1
}
opt_value() {  # the value of --opt X / --opt=X in ARGS
    local opt="$1" i
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        [[ "${ARGS[i]}" == "$opt="* ]] && { echo "${ARGS[i]#*=}"; return; }
        [[ "${ARGS[i]}" == "$opt" ]] && { echo "${ARGS[i + 1]:-}"; return; }
    done
}
visible_gpus() {  # GPUs this server will see (SLORA_LAUNCH_GPUS overrides, for tests)
    if [[ -n "${SLORA_LAUNCH_GPUS:-}" ]]; then
        echo "$SLORA_LAUNCH_GPUS"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1* ]]; then echo 0
        else awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"; fi
    else
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true
    fi
}
# 2+ GPUs: one instance group per GPU (scripts/gpu_instance_groups.py says why), unless the
# caller picks a config itself
REPO_ARG=$(opt_value --model-repository)
NUM_GPUS=$(visible_gpus)
if [[ "$NUM_GPUS" -ge 2 && -n "$REPO_ARG" && -f "$REPO_ARG/slora/config.pbtxt" ]] \
        && ! has_opt --model-config-name; then
    PY="$VENV/bin/python"
    [[ -x "$PY" ]] || PY=python3
    CONFIG_NAME=$("$PY" "$ROOT/scripts/gpu_instance_groups.py" "$REPO_ARG" "$NUM_GPUS")
    ARGS+=(--model-config-name "$CONFIG_NAME")
fi

# Backstop for a stop (docs/DESIGN.md "Shutdown"): on SIGTERM the model ends every request at
# once and a stop takes ~2.5 s, but Triton's gRPC frontend (2.51 and later) leaks the state of a
# stream that a client cancels right after its final response, and that state keeps the model
# loaded until --exit-timeout-secs (30 s by default) runs out. 5 s bounds such a stop well
# inside `docker stop`'s 10-s grace period; an explicit --exit-timeout-secs wins.
DEFAULT_EXIT_TIMEOUT_S=5
has_opt --exit-timeout-secs || ARGS=(--exit-timeout-secs "$DEFAULT_EXIT_TIMEOUT_S" "${ARGS[@]}")

# tritonserver does not pass SIGTERM / SIGINT on to its Python backend stubs, so the model
# would not know that the server is stopping and its running generations would hold the stop
# up to --exit-timeout-secs (slora_backend/shutdown_signal.py): run it as a child and pass
# those signals on to it and to its children (the stubs).
run_server() {
    "$@" &
    SERVER_PID=$!
    trap 'forward TERM' TERM
    trap 'forward INT' INT
    local rc
    while true; do
        rc=0
        wait "$SERVER_PID" || rc=$?
        kill -0 "$SERVER_PID" 2>/dev/null || exit "$rc"  # still running: a trapped signal
    done
}
forward() {
    local children
    children=$(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null || true)
    # shellcheck disable=SC2086  # one pid per word
    kill -s "$1" $children 2>/dev/null || true
    kill -s "$1" "$SERVER_PID" 2>/dev/null || true
}

if [[ -n "$SYSTEM_TRITON" ]]; then
    run_server "$SYSTEM_TRITON" "${ARGS[@]}"
fi

"$ROOT/scripts/get_tritonserver.sh" >/dev/null

# Shared libraries of the wheel's build (RPATH no longer points at them after the copy) and
# the libpython of the venv's interpreter (the stub embeds Python: use the same build as
# the venv, not whichever libpython3.x the system happens to have).
LIBS="$("$VENV/bin/python" - <<'PYEOF'
import importlib.util
import pathlib
import sysconfig

paths = []
spec = importlib.util.find_spec("pytriton")
root = pathlib.Path(list(spec.submodule_search_locations)[0])
for cand in (root.parent / "nvidia_pytriton.libs", root / "tritonserver" / "external_libs"):
    if cand.is_dir():
        paths.append(str(cand))
libdir = sysconfig.get_config_var("LIBDIR")
soname = sysconfig.get_config_var("INSTSONAME")
if libdir and soname and (pathlib.Path(libdir) / soname).exists():
    paths.append(libdir)
print(":".join(paths))
PYEOF
)"
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

EXTRA=()
has_opt --backend-directory || EXTRA+=(--backend-directory "$TRITON_HOME/backends")
if [[ -d "$TRITON_HOME/caches" ]]; then
    has_opt --cache-directory || EXTRA+=(--cache-directory "$TRITON_HOME/caches")
fi

run_server "$TRITON_HOME/bin/tritonserver" "${EXTRA[@]}" "${ARGS[@]}"
