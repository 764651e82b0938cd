#!/usr/bin/env bash
# Create (or reuse) a full ComfyUI host for CI: ComfyUI's source unpacked from a tarball and a venv with
# its requirements, both in a cache folder (one per ComfyUI version) outside the repository.
#
#   bash .ci/host_env.sh CACHE TARBALL     # messages on stderr; stdout: COMFYUI_PATH, then the host's Python
#
# The requirements are ComfyUI's own requirements.txt (for v0.33.0: comfy-kitchen and comfy-aimdo, which
# install and import on CPU) except torch, torchvision and torchaudio: torch is pinned to the CPU build the
# pack's venv uses (scripts/setup_env.sh). PyPI's torchvision/torchaudio are CUDA builds that do not import
# beside it; ComfyUI imports them at module level only in model files the SD and DiT paths never call, so
# tests/comfy_env.py stands in for them. (Installing v0.33.0's requirements unpinned instead pulls torch
# 2.14.1 with CUDA libraries, about 7 GB, for no test it would add.) spandrel, which asks for torchvision, is
# installed without dependencies. transformers < 5, as in scripts/setup_env.sh. A second run only compares
# stamp files that record the tarball's checksum and what was installed.
set -euo pipefail

cache="$1"
tarball="$2"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "host_env: $*" >&2; }

if [[ ! -f "$tarball" ]]; then
    say "no ComfyUI source tarball at $tarball (set AD_COMFYUI_TARBALL)"
    exit 1
fi
mkdir -p "$cache"
host="$cache/host"
venv="$cache/venv"
python="${PYTHON:-python3}"

# -- the source tree -------------------------------------------------------------------------------------
checksum="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [[ -f "$host/.ad-stamp" && "$(cat "$host/.ad-stamp")" == "$checksum" && -f "$host/ComfyUI/nodes.py" ]]; then
    say "using $host/ComfyUI (up to date)"
else
    say "unpacking $(basename "$tarball") into $host"
    rm -rf "$host" "$host.partial"
    mkdir -p "$host.partial"
    tar xzf "$tarball" -C "$host.partial"
    if [[ ! -f "$host.partial/ComfyUI/nodes.py" ]]; then
        say "$tarball does not unpack to ComfyUI/nodes.py"
        exit 1
    fi
    echo "$checksum" > "$host.partial/.ad-stamp"
    mv "$host.partial" "$host"
fi
comfy="$host/ComfyUI"

# -- the venv --------------------------------------------------------------------------------------------
torch_spec="torch==2.13.0"
pins=("$torch_spec" "transformers<5")
left_out='^(torch|torchvision|torchaudio|spandrel)([^A-Za-z0-9_.-]|$)'
mapfile -t requirements < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$comfy/requirements.txt" | grep -v '^$' \
                              | grep -Ev "$left_out")
test_tools=(pytest hypothesis)
stamp_text="$checksum ${pins[*]} ${requirements[*]} spandrel(no-deps) ${test_tools[*]}"

if [[ -x "$venv/bin/python" && -f "$venv/.ad-stamp" && "$(cat "$venv/.ad-stamp")" == "$stamp_text" ]] \
    && "$venv/bin/python" -c "" 2>/dev/null; then
    say "using $venv (up to date)"
else
    start=$SECONDS
    rm -rf "$venv"
    say "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv" >&2
    pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input install --quiet)
    # pip's output on stderr, without the warnings some pip configurations print for every package an
    # extra index does not have (as in scripts/setup_env.sh).
    run_pip() { "${pip[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }
    printf '%s\n' "${pins[@]}" > "$venv/ad-constraints.txt"
    say "installing $torch_spec"
    run_pip "$torch_spec"
    say "installing ComfyUI's requirements (${#requirements[@]} packages, not torch/torchvision/torchaudio) and ${test_tools[*]}"
    run_pip -c "$venv/ad-constraints.txt" "${requirements[@]}" "${test_tools[@]}"
    run_pip --no-deps spandrel
    "$venv/bin/python" - >&2 <<'PY'
import importlib.util
import sys

import torch

if torch.__version__.split("+")[0] != "2.13.0":
    sys.exit(f"host_env: expected torch 2.13.0, found {torch.__version__}")
for name in ("torchvision", "torchaudio"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"host_env: {name} was installed; it does not import beside this torch")
PY
    echo "$stamp_text" > "$venv/.ad-stamp"
    say "ready: $venv ($((SECONDS - start)) s)"
fi

# ComfyUI's server and executor import with it (torchvision/torchaudio stood in for and the CPU chosen, as the tests boot
# ComfyUI in tests/comfy_env.py): check that before any test relies on it. utils.extra_config first, as
# main.py imports it: nodes.py puts comfy/ first on sys.path, where comfy/utils.py would shadow it.
check="import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import comfy_env; comfy_env.boot();
import utils.extra_config, execution, folder_paths, nodes, server"
(cd "$comfy" && "$venv/bin/python" -c "$check" "$comfy" "$repo/tests" >&2) || {
    say "ComfyUI's modules do not import with $venv/bin/python"
    exit 1
}
echo "$comfy"
echo "$venv/bin/python"
