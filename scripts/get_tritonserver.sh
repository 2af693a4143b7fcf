#!/usr/bin/env bash
# Obtain a tritonserver for this repo (idempotent).
#
# - If `tritonserver` is already on PATH (e.g. the NGC tritonserver container), nothing to do.
# - Otherwise use the build shipped inside the `nvidia-pytriton` wheel installed in the venv:
#   copy its tritonserver tree into .cache/tritonserver/ (site-packages is left untouched) and
#   put the Python backend stub matching the venv's interpreter into backends/python/.
#   scripts/tritonserver.sh then sets LD_LIBRARY_PATH / --backend-directory and execs it.
#
# Env: VENV (default: <repo>/.venv), TRITON_HOME (default: <repo>/.cache/tritonserver).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TRITON_HOME="${TRITON_HOME:-$ROOT/.cache/tritonserver}"

if command -v tritonserver >/dev/null 2>&1; then
    echo "get_tritonserver: using tritonserver on PATH: $(command -v tritonserver)"
    exit 0
fi

PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "get_tritonserver: no venv at $VENV (run 'make setup' first)" >&2
    exit 1
fi

# Where the wheel keeps the server, the stub for this interpreter, and the wheel's version.
read -r SRC PYVER PYTRITON_VERSION < <("$PY" - <<'PYEOF'
import importlib.metadata
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("pytriton")
if spec is None or not spec.submodule_search_locations:
    sys.exit("get_tritonserver: nvidia-pytriton is not installed in the venv")
src = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
print(src, f"{sys.version_info[0]}.{sys.version_info[1]}",
      importlib.metadata.version("nvidia-pytriton"))
PYEOF
)

STUB="$SRC/python_backend_stubs/$PYVER/triton_python_backend_stub"
if [[ ! -x "$SRC/bin/tritonserver" || ! -f "$STUB" ]]; then
    echo "get_tritonserver: $SRC lacks bin/tritonserver or a stub for Python $PYVER" >&2
    exit 1
fi

STAMP="$TRITON_HOME/.source"
WANT="nvidia-pytriton==$PYTRITON_VERSION python$PYVER $SRC"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$TRITON_HOME/bin/tritonserver" ]]; then
    echo "get_tritonserver: up to date ($TRITON_HOME, $WANT)"
    exit 0
fi

echo "get_tritonserver: installing tritonserver from $WANT into $TRITON_HOME"
mkdir -p "$(dirname "$TRITON_HOME")"
TMP="$(mktemp -d "$(dirname "$TRITON_HOME")/.tritonserver.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/backends/python"
cp -a "$SRC/bin" "$TMP/bin"
cp -a "$SRC/backends/python/libtriton_python.so" \
      "$SRC/backends/python/triton_python_backend_utils.py" "$TMP/backends/python/"
[[ -d "$SRC/caches" ]] && cp -a "$SRC/caches" "$TMP/caches"
cp -a "$STUB" "$TMP/backends/python/triton_python_backend_stub"
echo "$WANT" > "$TMP/.source"
rm -rf "$TRITON_HOME"
mv "$TMP" "$TRITON_HOME"
trap - EXIT
echo "get_tritonserver: done"
