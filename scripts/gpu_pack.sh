#!/usr/bin/env bash
# Prepare .gpu-carry/, what the GPU check (scripts/gpu_check.sh, docs/gpu-check.md) carries to a machine that
# cannot download anything: ComfyUI v0.33.0's source tarball as shipped in shared/hosts, and the packages
# ComfyUI's requirements.txt asks for that the lent machine lacks, installed for its Python into one
# xz-compressed folder (site-cpXY.tar.xz). The machine has Python 3.12 with torch, torchvision, torchaudio,
# numpy, Pillow, aiohttp, yarl, transformers, tokenizers, sentencepiece, safetensors, scipy, einops, PyYAML,
# psutil, requests, tqdm and filelock (the device notes' package list).
#
#   bash scripts/gpu_pack.sh [--python-version 3.12] [--tarball PATH/comfyui-v0.33.0.tar.gz]
#
# Left out on purpose (main.py starts without them; see docs/gpu-check.md): PyAV (37 MB; stood in for, only
# video nodes use it), comfyui-frontend-package (the check passes --front-end-root), the workflow templates and
# embedded docs (only logged as missing). comfy-kitchen's ROCm binary is dropped (NVIDIA machine); its CUDA
# binary (177 MB) is what makes xz worth it: 21 MB instead of 44 MB zipped.
# Needs network access to PyPI (pip download), tar and xz. Takes a few minutes (xz -9).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_version="3.12"
tarball="$root/../shared/hosts/comfyui-v0.33.0.tar.gz"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) python_version="$2"; shift 2 ;;
        --tarball) tarball="$2"; shift 2 ;;
        *) echo "gpu_pack.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
tag="cp${python_version/./}"
carry="$root/.gpu-carry"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ad-gpu-pack/$tag"

# ComfyUI v0.33.0's requirements.txt, at the versions its resolution gave on 2026-12 (the CI venv's), less
# what the machine has and what is left out above; then what those need in turn (pip's --no-deps below).
wheels=(
    comfy-kitchen==0.2.31 comfy-aimdo==0.4.13 torchsde==0.2.6 trampoline==0.1.2
    sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 blake3==1.0.11 simpleeval==1.0.8
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
    typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0
    kornia==0.9.2 kornia-rs==0.2.0 spandrel==0.4.2
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
target=(--only-binary=:all: --python-version "$python_version" --implementation cp "${platforms[@]}")

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$cache" "$carry"
echo "gpu_pack: downloading ${#wheels[@]} wheels for $tag into $cache" >&2
python3 -m pip download --quiet --no-deps "${target[@]}" -d "$cache" "${wheels[@]}" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2

staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
python3 -m pip install --quiet --no-index --find-links "$cache" --no-deps --no-compile --target "$staging/site" \
    "${target[@]}" "${wheels[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
rm -f "$staging"/site/comfy_kitchen/backends/hip/_C*.so "$staging"/site/comfy_aimdo/aimdo_rocm.so
rm -rf "$staging/site/bin"
echo "gpu_pack: compressing $(du -sh "$staging/site" | cut -f1) of packages (xz -9)" >&2
tar -C "$staging/site" -cf - . | xz -9 -T0 > "$carry/site-$tag.tar.xz.partial"
# One Python's packages only: another's would travel too and count against the 64 MiB.
find "$carry" -maxdepth 1 \( -name 'site-cp*.tar.xz' -o -name 'wheels-cp*.txt' \) \
    ! -name "site-$tag.tar.xz.partial" -print -delete | sed 's/^/gpu_pack: removed /' >&2
mv "$carry/site-$tag.tar.xz.partial" "$carry/site-$tag.tar.xz"
install -m 0644 "$tarball" "$carry/comfyui-v0.33.0.tar.gz"
printf '%s\n' "${wheels[@]}" > "$carry/wheels-$tag.txt"

tree_bytes=$(cd "$root" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry_bytes=$(du -sb "$carry" | cut -f1)
echo "gpu_pack: .gpu-carry is $((carry_bytes / 1048576)) MiB; with the working tree $(((tree_bytes + carry_bytes) / 1048576)) MiB of the 64 MiB a run may carry" >&2
ls -la "$carry" >&2
