"""Boot ComfyUI's core for CPU tests: stub torchvision (only unrelated model files import it)
and force the CPU before `comfy.model_management` is imported."""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            sys.modules.pop(name)
    root = _stub_module("torchvision")
    for sub in ("transforms", "models", "ops", "utils", "io"):
        module = _stub_module(f"torchvision.{sub}")
        setattr(root, sub, module)
        sys.modules[f"torchvision.{sub}"] = module
    sys.modules["torchvision"] = root


def boot() -> None:
    """Make `import comfy...` work on a CPU-only machine; honour COMFYUI_PATH if set."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if comfy_path and comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    stub_torchvision()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
