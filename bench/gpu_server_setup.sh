# Sourced by the GPU-host scripts that start the real tritonserver (docs/BENCHMARKS.md "GPU
# host: the command"):  source bench/gpu_server_setup.sh DEVICE_DIR LOG
# DEVICE_DIR holds what ../shared/device/pack-tritonserver.sh packed plus a copy of
# ../shared/device/gpu-setup.sh; its output goes to LOG. Returns non-zero when the setup fails.
_dev=${1:?DEVICE_DIR}
_log=${2:?LOG}
# shellcheck disable=SC1091
source "$_dev/gpu-setup.sh" "$_dev" >"$_log" 2>&1 || { cat "$_log"; return 1; }
# the image's scipy / scikit-learn are built for numpy 2; the stub's venv has numpy 1.26 and
# transformers imports scikit-learn when it is present: hide both from the venv's Python
_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import sys; sys.modules.update({m: None for m in ('sklearn', 'scipy')})" \
    >"$_site/zz_hide_numpy2_only.pth"
