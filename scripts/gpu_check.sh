#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md) on a machine with an NVIDIA GPU and no network: unpack what
# scripts/gpu_pack.sh put in .gpu-carry/ (ComfyUI v0.33.0 and the packages the machine lacks), then run
# scripts/gpu_check.py: ComfyUI's main.py with its defaults, random-weight full-size SD1.5, SDXL and
# FLUX.1-dev (fp8), every AD mode through the HTTP API. Writes report.md, report.json and the logs to $OUT
# (else a temporary folder); exits 1 on any error.
#
# On the lent machine (the device tool's `run`, from the repository root, after `bash scripts/gpu_pack.sh`):
#   command:   bash scripts/gpu_check.sh
#   carry:     [".gpu-carry"]
#   timeout_s: 600   (the check budgets itself 480 s after unpacking: later prompts are skipped, the one
#                     running then gets 30 s more, so the report is written before the run is cut off)
#
#   bash scripts/gpu_check.sh [gpu_check.py arguments...]       e.g. --families flux --modes plain,guided
#
# Environment: PYTHON (default python3), AD_GPU_CARRY (default .gpu-carry), AD_GPU_WORK (default
# /tmp/ad-gpu-check), COMFYUI_PATH (a ComfyUI tree to use instead of the carried tarball).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="${AD_GPU_CARRY:-$root/.gpu-carry}"
work="${AD_GPU_WORK:-/tmp/ad-gpu-check}"
python="${PYTHON:-python3}"
tag="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
mkdir -p "$work"

unpack() {  # archive, destination: with Python's tarfile, which needs no xz program
    "$python" - "$1" "$2" <<'PY'
import sys
import tarfile

with tarfile.open(sys.argv[1]) as archive:
    archive.extractall(sys.argv[2], filter="data")
PY
}

start=$SECONDS
if [[ -z "${COMFYUI_PATH:-}" ]]; then
    [[ -f "$carry/comfyui-v0.33.0.tar.gz" ]] || { echo "gpu_check.sh: no $carry/comfyui-v0.33.0.tar.gz: run scripts/gpu_pack.sh first" >&2; exit 1; }
    rm -rf "$work/ComfyUI"
    unpack "$carry/comfyui-v0.33.0.tar.gz" "$work"
    export COMFYUI_PATH="$work/ComfyUI"
fi
if [[ -f "$carry/site-$tag.tar.xz" ]]; then
    rm -rf "$work/site"
    unpack "$carry/site-$tag.tar.xz" "$work/site"
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: no $carry/site-$tag.tar.xz (scripts/gpu_pack.sh --python-version for this Python); using what is installed" >&2
fi
echo "gpu_check.sh: unpacked in $((SECONDS - start)) s; $("$python" --version 2>&1); ComfyUI at $COMFYUI_PATH" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

exec "$python" "$root/scripts/gpu_check.py" --comfyui "$COMFYUI_PATH" --work "$work/run" "$@"
