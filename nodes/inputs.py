"""Validation of LATENT, MASK and number inputs shared by the nodes."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..attention.naming import counted, one_or
from .errors import ADNodeError, require


def latent_samples(node: str, latent: dict, name: str, channels: int, ndim: int = 4) -> torch.Tensor:
    """The samples of a LATENT, checked against the model's latent channels. `ndim` 5: a model whose
    image latents carry a frame axis, (B, C, 1, H, W) (Qwen-Image); a 4-D one gets it, as ComfyUI's
    sampler gives it to an empty latent."""
    require(isinstance(latent, dict) and "samples" in latent, node, f"'{name}' is not a LATENT")
    samples = latent["samples"]
    if ndim == 5:
        samples = samples.unsqueeze(2) if samples.ndim == 4 else samples
        require(samples.ndim == 5 and samples.shape[2] == 1, node,
                f"'{name}' must be an image latent (B, C, 1, H, W), got shape {tuple(samples.shape)}")
    else:
        require(samples.ndim == 4, node, f"'{name}' must be an image latent (B, C, H, W), got shape {tuple(samples.shape)}")
    require(samples.shape[0] > 0, node, f"'{name}' holds no latent (batch of zero)")
    require(
        samples.shape[1] == channels,
        node,
        f"'{name}' has {counted(samples.shape[1], 'channel')} but the model's latents have {channels}; "
        "encode it with this model's VAE",
    )
    require(bool(torch.isfinite(samples).all()), node, f"'{name}' contains NaN or infinite values")
    return samples


def mask_batch(node: str, mask: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """A MASK as (batch or 1, H, W); other batch sizes cannot be matched."""
    if mask.ndim == 2:
        mask = mask[None]
    require(mask.ndim == 3, node, f"'{name}' must be a MASK (B, H, W), got shape {tuple(mask.shape)}")
    require(mask.shape[-1] > 0 and mask.shape[-2] > 0, node, f"'{name}' is empty")
    if mask.shape[0] not in (1, batch):
        raise ADNodeError(node, f"'{name}' has {counted(mask.shape[0], 'mask')} for {counted(batch, 'latent')}; "
                                f"give {one_or(batch, 'mask')}")
    return mask


def finite_number(node: str, value: float, name: str, minimum: float | None = None) -> float:
    require(isinstance(value, (int, float)) and math.isfinite(value), node, f"'{name}' must be a finite number, got {value}")
    if minimum is not None:
        require(value >= minimum, node, f"'{name}' must be at least {minimum}, got {value}")
    return float(value)


def whole_number(node: str, value: int, name: str, minimum: int, maximum: int) -> int:
    require(isinstance(value, int) and not isinstance(value, bool), node, f"'{name}' must be a whole number, got {value!r}")
    require(minimum <= value <= maximum, node, f"'{name}' must be between {minimum} and {maximum}, got {value}")
    return int(value)


def check_reference_fits(node: str, reference: Any, base_model: Any, family: Any) -> None:
    """An AD_REFERENCE captured for another kind of model (a Flux reference on an SD model, or the
    reverse) or with another text encoder or VAE gets an error naming `node`."""
    captured = getattr(reference, "family", "")
    require(
        not captured or captured == family.name,
        node,
        f"the reference was captured with another kind of model ({captured}) but this MODEL is {family.supported}; "
        "capture it again with this model (Capture Reference Attention takes the same MODEL, its CLIP and its VAE)",
    )
    mismatch = family.conditioning_mismatch(base_model, reference.conditioning)
    require(mismatch is None, node, mismatch or "")
    channels = family.latent_channels(base_model)
    require(
        int(reference.latents.shape[1]) == channels,
        node,
        f"the reference latent has {reference.latents.shape[1]} channels but this model's latents have "
        f"{channels}; capture the reference with this model's VAE",
    )
