"""Boot ComfyUI's core for CPU tests: stand in for torchvision/torchaudio (only unrelated model files import them)
and force the CPU before `comfy.model_management` is imported."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator


STOOD_IN = ("torchvision", "torchaudio")


class _MissingMeta(type):
    """A name from a stood-in package: importable, usable as a base class or default argument, and an
    ImportError the moment anything calls it."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__qualname__} is from a package these tests stand in for (tests/comfy_env.py)")


def _missing(qualname: str) -> type:
    return _MissingMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision.*` / `torchaudio.*` as stand-ins where the real ones do not import."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = set(packages)

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def stub_torchvision() -> None:
    """Stand in for torchvision and torchaudio where they do not import: PyPI's builds are CUDA builds that
    break beside the CPU torch wheel, and ComfyUI imports them at module level only in model files (SAM3,
    audio VAEs, video nodes) that the SD and DiT paths never call."""
    missing = []
    for package in STOOD_IN:
        try:
            importlib.import_module(package)
        except Exception:
            for name in [n for n in sys.modules if n.split(".")[0] == package]:
                sys.modules.pop(name)
            missing.append(package)
    stand_in(missing)


def stand_in(packages: list[str]) -> None:
    """Serve `packages` (and their submodules) as stand-ins from now on, ahead of anything installed."""
    finders = [f for f in sys.meta_path if isinstance(f, _StandInFinder)]
    if finders:
        finders[0].packages.update(packages)
    elif packages:
        sys.meta_path.insert(0, _StandInFinder(list(packages)))


def boot() -> None:
    """Make `import comfy...` work on a CPU-only machine; honour COMFYUI_PATH if set."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if comfy_path and comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    stub_torchvision()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """ComfyUI's training switch for a test's own literal model calls, as ComfyUI's trainer sets it: on v0.33
    comfy-kitchen's RoPE/RMSNorm kernels have no backward and no float64. The pack sets it itself
    (attention/host_training.py); tests do not borrow that, so a literal stays independent of the pack."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before
