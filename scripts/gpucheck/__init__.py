"""The GPU check of docs/gpu-check.md: random-weight full-size models, ComfyUI's own server, every AD mode
through the HTTP API. Entry point: scripts/gpu_check.sh (scripts/gpu_check.py). Not part of the pack."""
