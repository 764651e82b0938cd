"""Run ComfyUI's own main.py (or the GPU check's model builder) in this process, after standing in for the
packages the check does not carry (docs/gpu-check.md):

- PyAV (`av`, a 37 MB wheel) when it is not installed: ComfyUI imports it at module level for its video
  types, and no SD or Flux path calls it;
- with --cpu, torchvision and torchaudio where they do not import (PyPI's builds are CUDA builds that break
  beside a CPU torch; tests/comfy_env.py). On a GPU machine the real ones load.

Stand-ins are importable, and raise ImportError when anything from them is called (tests/comfy_env.py).

    python scripts/gpucheck/launch.py server COMFYUI_DIR [--cpu] -- MAIN_PY_ARGUMENTS...
    python scripts/gpucheck/launch.py build COMFYUI_DIR --models-dir DIR --scale full|tiny --families sd15,... [--cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
REPO = SCRIPTS.parent
STAND_IN_WHEN_ABSENT = ("av",)


def stand_in(cpu: bool) -> list[str]:
    """Install the stand-ins; returns the packages stood in for. Imports torch only with `cpu`."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_env

    absent = [name for name in STAND_IN_WHEN_ABSENT if importlib.util.find_spec(name) is None]
    comfy_env.stand_in(absent)
    if cpu:
        comfy_env.stub_torchvision()
    finders = [f for f in sys.meta_path if isinstance(f, comfy_env._StandInFinder)]
    return sorted(finders[0].packages) if finders else []


def run_server(comfy_dir: Path, cpu: bool, main_args: list[str]) -> None:
    stood_in = stand_in(cpu)
    print(f"ad-gpu-check: standing in for {', '.join(stood_in) or 'nothing'}", flush=True)
    main_py = comfy_dir / "main.py"
    sys.argv = [str(main_py), *main_args]
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)
    runpy.run_path(str(main_py), run_name="__main__")


def run_build(comfy_dir: Path, cpu: bool, models_dir: Path, scale: str, families: list[str]) -> None:
    stand_in(cpu)
    sys.path.insert(0, str(comfy_dir))
    sys.path.insert(0, str(SCRIPTS))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (selects the device before any model class is built)
    import torch

    from gpucheck import models

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    print(f"ad-gpu-check: building {scale} models for {', '.join(families)} on {device}", flush=True)
    models.build_family_files(families, scale, models_dir, device, log=lambda text: print(text, flush=True))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("server", "build"))
    parser.add_argument("comfyui", type=Path, help="the ComfyUI tree (main.py, comfy/)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--families", default="sd15,sdxl,flux")
    own, rest = _split(argv)
    args = parser.parse_args(own)
    comfy_dir = args.comfyui.resolve()
    if args.what == "server":
        run_server(comfy_dir, args.cpu, rest)
    else:
        run_build(comfy_dir, args.cpu, args.models_dir.resolve(), args.scale, args.families.split(","))


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The launcher's own arguments, and main.py's after "--"."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


if __name__ == "__main__":
    main(sys.argv[1:])
