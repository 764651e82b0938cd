"""Which family a model belongs to: the registry of attention/family.py's implementations."""

from __future__ import annotations

from typing import Any

import torch

from .family import ModelFamily, UnsupportedModelError
from .flux2_family import FLUX2
from .flux_family import FLUX
from .qwen_image import QWEN_IMAGE
from .sd_family import SD_UNET
from .zimage import ZIMAGE

FAMILIES: tuple[ModelFamily, ...] = (SD_UNET, FLUX, FLUX2, ZIMAGE, QWEN_IMAGE)


def family_for(diffusion_model: torch.nn.Module | None) -> ModelFamily | None:
    """The family of a BaseModel's `diffusion_model`, or None when no family reads it."""
    if diffusion_model is None:
        return None
    return next((family for family in FAMILIES if family.accepts(diffusion_model)), None)


def family_of(base_model: Any) -> ModelFamily:
    """The family of a MODEL's BaseModel, checked; `UnsupportedModelError` says what AD needs."""
    diffusion_model = getattr(base_model, "diffusion_model", None)
    family = family_for(diffusion_model)
    if family is None:
        kind = type(diffusion_model).__name__ if diffusion_model is not None else "no diffusion model"
        wanted = " or ".join(f.supported for f in FAMILIES)
        raise UnsupportedModelError(
            f"the MODEL is {type(base_model).__name__} ({kind}); Attention Distillation needs {wanted} checkpoint"
        )
    family.check(base_model)
    return family
