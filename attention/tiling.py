"""Seamless tiling: convolutions that pad around the edge, as clone-local ModelPatcher object patches.

Every zero-padded `Conv2d` of the UNet, and of the VAE's decoding side, gets an object patch whose
value is a *view* of the module: an instance of a cached subclass of the module's own class that
pads circularly (or with zeros, per axis) in `_conv_forward` and then convolves without padding.
The view shares the module's `__dict__`, so its parameters, buffers and ComfyUI's per-module state
(`weight_function`, `comfy_cast_weights`, `comfy_patched_weights`, ...) are the module's own, not a
copy. That is deliberate: a clone and its original share their weight backups and object-patch
backups, and ComfyUI may load the tiled clone without re-patching weights (same weights loaded by
the original) or unpatch LoRA weights through the tiled tree; with shared state every such write
lands exactly where it would land without tiling, whichever patcher loads or unloads next. A
snapshot of the module's parameters would instead go stale (a LoRA-merged or since-replaced weight)
and leave the original's weights or flags behind. The view is in the model only while the clone is
patched in; ComfyUI's classes and the shared model's modules are never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .naming import shown_as_pack

TILING_MODES: dict[str, tuple[bool, bool]] = {"both": (True, True), "x only": (True, False), "y only": (False, True)}
UNET_ROOT = "diffusion_model"


@shown_as_pack
class TilingError(ValueError):
    """The model or VAE has nothing this module can tile."""


class _CircularPadding:
    """Mixin of the view classes: the module's own padding, circular on the class's axes."""

    ad_wrap_x: bool = True
    ad_wrap_y: bool = True
    ad_base_class: type = torch.nn.Conv2d
    ad_cache_identity: str = "seamless-tiling"

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        padded = pad_axes(input, int(padding[1]), int(padding[0]), self.ad_wrap_x, self.ad_wrap_y)
        return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)


def pad_axes(x: torch.Tensor, pad_x: int, pad_y: int, wrap_x: bool, wrap_y: bool) -> torch.Tensor:
    """Pad the last two dims by (pad_y, pad_x): around the edge on wrapped axes, zeros elsewhere."""
    if wrap_x and wrap_y:
        return F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="circular")
    if pad_x:
        x = F.pad(x, (pad_x, pad_x, 0, 0), mode="circular" if wrap_x else "constant")
    if pad_y:
        x = F.pad(x, (0, 0, pad_y, pad_y), mode="circular" if wrap_y else "constant")
    return x


_VIEW_CLASSES: dict[tuple[type, bool, bool], type] = {}


def axes_label(wrap_x: bool, wrap_y: bool) -> str:
    return {(True, True): "xy", (True, False): "x", (False, True): "y"}.get((wrap_x, wrap_y), "none")


def view_class(base: type, wrap_x: bool, wrap_y: bool) -> type:
    """The (cached) subclass of `base` that pads circularly on the given axes."""
    if is_circular_view_class(base):
        base = base.ad_base_class
    key = (base, wrap_x, wrap_y)
    if key not in _VIEW_CLASSES:
        label = axes_label(wrap_x, wrap_y)
        namespace = {
            "ad_wrap_x": wrap_x,
            "ad_wrap_y": wrap_y,
            "ad_base_class": base,
            # Read by the feature cache key (attention/session.py): tiled and untiled models compute
            # other features from the same weights. The patch path completes it.
            "ad_cache_identity": f"seamless-tiling:{label}",
            "__module__": __name__,
        }
        _VIEW_CLASSES[key] = type(f"{base.__name__}Seamless_{label}", (_CircularPadding, base), namespace)
    return _VIEW_CLASSES[key]


def is_circular_view_class(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, _CircularPadding)


def is_circular_view(obj: Any) -> bool:
    return isinstance(obj, _CircularPadding)


def circular_view(module: torch.nn.Conv2d, wrap_x: bool, wrap_y: bool) -> torch.nn.Conv2d:
    """A view of `module` (same `__dict__`, so the same parameters and state) that pads circularly."""
    cls = view_class(type(module), wrap_x, wrap_y)
    view = cls.__new__(cls)
    object.__setattr__(view, "__dict__", module.__dict__)
    return view


def pads_with_zeros(module: torch.nn.Module) -> bool:
    """A 2-D convolution that zero-pads at least one axis: the ones that make a seam."""
    if not isinstance(module, torch.nn.Conv2d) or module.padding_mode != "zeros":
        return False
    padding = module.padding
    return not isinstance(padding, str) and any(int(p) > 0 for p in padding)


def circular_patches(
    root: torch.nn.Module, prefix: str, wrap_x: bool, wrap_y: bool, include: Callable[[str], bool] = lambda _: True
) -> dict[str, torch.nn.Module]:
    """Object patches (path → view) for every zero-padded Conv2d under `root`, paths from `prefix`,
    in the top-level children of `root` whose name `include` accepts."""
    patches: dict[str, torch.nn.Module] = {}
    for name, module in root.named_modules():
        if not name or not include(name.split(".")[0]):
            continue
        if pads_with_zeros(module):
            patches[f"{prefix}{name}"] = circular_view(module, wrap_x, wrap_y)
    return patches


def is_decoding_part(top_level_name: str) -> bool:
    """VAE parts that are tiled: not the encoder side, so that encoding a reference or content
    image (which does not tile) does not blend its opposite edges into the latent."""
    return "encoder" not in top_level_name and top_level_name != "quant_conv"


def _add_patches(patcher: Any, patches: dict[str, torch.nn.Module]) -> None:
    """Add the views, replacing earlier tiling views but never another node's object patch."""
    for path, view in patches.items():
        existing = (getattr(patcher, "object_patches", None) or {}).get(path)
        if existing is not None and not is_circular_view(existing):
            continue
        patcher.add_object_patch(path, view)


def tiled_model(patcher: Any, wrap_x: bool, wrap_y: bool) -> Any:
    """A clone of a MODEL's ModelPatcher whose UNet convolutions pad circularly on the given axes."""
    diffusion_model = getattr(patcher.model, UNET_ROOT)
    patches = circular_patches(diffusion_model, f"{UNET_ROOT}.", wrap_x, wrap_y)
    if not patches:
        raise TilingError("the model's UNet has no zero-padded 2-D convolutions to tile")
    clone = patcher.clone()
    _add_patches(clone, patches)
    return clone


def tiled_vae(vae: Any, wrap_x: bool, wrap_y: bool) -> Any:
    """A shallow copy of a VAE with its own patcher clone, whose decoder pads circularly.

    The copy shares the first-stage model (the weights); only its patcher carries the views, and
    `VAE.decode` loads that patcher, so the original VAE object and its patcher stay untouched.
    """
    patcher = vae.patcher
    patches = circular_patches(patcher.model, "", wrap_x, wrap_y, include=is_decoding_part)
    if not patches:
        raise TilingError("the VAE's decoder has no zero-padded 2-D convolutions to tile (not an image VAE?)")
    clone_patcher = patcher.clone()
    _add_patches(clone_patcher, patches)
    clone = copy.copy(vae)
    clone.patcher = clone_patcher
    return clone
