#!/usr/bin/env bash
# The main job, headless: style transfer (content-deer.jpg in the style of style-1.jpg) and texture
# synthesis from an empty latent (texture-17.jpg), written as PNGs to output/.
#
#   bash scripts/quickstart.sh                          # random weights: checks the pipeline in minutes
#   bash scripts/quickstart.sh --checkpoint MODEL.safetensors   # a real SD1.5 or SDXL checkpoint
#
# Other options: python scripts/run_ad.py --help. Sets up the venv (scripts/setup_env.sh) first,
# unless AD_PYTHON names an interpreter to use instead (for example your ComfyUI's own Python).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${AD_PYTHON:-}" ]]; then
    python="$AD_PYTHON"
else
    python="$(bash "$root/scripts/setup_env.sh")/bin/python"
fi
exec "$python" "$root/scripts/run_ad.py" "$@"
