#!/usr/bin/env bash
# Create (or reuse) the development virtualenv: CPU torch, ComfyUI core from PyPI and the test tools.
#
#   bash scripts/setup_env.sh          # messages on stderr, the venv's path on stdout
#
# Environment:
#   AD_VENV   where the venv lives (default: .venv in the repository)
#   PYTHON    the interpreter that creates it (default: python3)
#
# A second run is quick: it only checks a stamp file that records what was installed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AD_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

# torch first and pinned: every later install is constrained to it, so nothing pulls another torch.
torch_spec="torch==2.13.0"
# The ComfyUI core published on PyPI (November 2024). Its metadata asks for torchvision, torchaudio,
# kornia, spandrel, aiohttp and soundfile, which the core modules we use never import, and PyPI's
# torchvision breaks beside this torch: install it without dependencies and add what it imports.
comfy_spec="notcomfy==0.1.0"
# transformers 5 reads ComfyUI's bundled CLIP tokenizer wrongly (every id comes out 0 or 2), so < 5.
comfy_needs=(torchsde einops "transformers>=4.28.1,<5" "tokenizers>=0.13.3" sentencepiece
             "safetensors>=0.4.2" pyyaml Pillow scipy tqdm psutil numpy)
test_tools=(pytest hypothesis ruff)

stamp_text="$torch_spec $comfy_spec ${comfy_needs[*]} ${test_tools[*]}"
stamp_file="$venv/.ad-env-stamp"

say() { echo "setup_env: $*" >&2; }

if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_text" ]] \
    && "$venv/bin/python" -c "" 2>/dev/null; then
    say "using $venv (up to date)"
    echo "$venv"
    exit 0
fi

start=$SECONDS
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv with $("$python" --version 2>&1)"
    if ! "$python" -m venv "$venv" >&2; then
        # Some distributions ship python3 without the venv module: fall back to virtualenv from PyPI.
        say "python -m venv failed; trying virtualenv"
        rm -rf "$venv"
        tools="$(mktemp -d)"
        trap 'rm -rf "$tools"' EXIT
        "$python" -m pip install --quiet --target "$tools" virtualenv >&2
        PYTHONPATH="$tools" "$python" -m virtualenv --quiet "$venv" >&2
    fi
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
constraints="$venv/ad-constraints.txt"
echo "$torch_spec" > "$constraints"

# pip's output goes to stderr (stdout carries only the venv's path), without the warnings some pip
# configurations print for every package an extra index does not have.
run_pip() {
    "${pip[@]}" install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}

say "installing $torch_spec"
run_pip "$torch_spec"
say "installing what ComfyUI's core imports, and ${test_tools[*]}"
run_pip -c "$constraints" "${comfy_needs[@]}" "${test_tools[@]}"
# Last and without dependencies, so pip neither pulls nor complains about the packages left out above.
say "installing $comfy_spec (no dependencies)"
run_pip --no-deps "$comfy_spec"

# Check the result rather than trust it: exact torch, no torchvision, ComfyUI core importable.
"$venv/bin/python" - >&2 <<'PY'
import importlib.util
import sys

import torch

if torch.__version__.split("+")[0] != "2.13.0":
    sys.exit(f"setup_env: expected torch 2.13.0, found {torch.__version__}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup_env: torchvision is installed in the venv; it breaks beside this torch, remove it")
for name in ("comfy", "comfy_extras", "pytest", "hypothesis"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"setup_env: {name} is missing after the install")
PY

echo "$stamp_text" > "$stamp_file"
say "ready: $venv ($((SECONDS - start)) s)"
echo "$venv"
