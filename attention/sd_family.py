"""The SD UNet family (SD1.x, SD2.x, SDXL): ComfyUI's `UNetModel`, attn1 layers, VP/EPS parametrization
(docs/DESIGN.md §2 and §3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .cache import tensor_digest
from .family import PIXELS_PER_LATENT, ModelFamily
from .sd_unet import (
    SelfAttentionLayer,
    check_unet_variant,
    cross_attention_width,
    has_class_conditioning,
    is_unet,
    list_unet_layers,
    transformer_blocks_add_in_place,
)
from .unet_pass import UNetFeaturePass, conditioning_kwargs

NUM_TRAIN_TIMESTEPS = 1000
AUTO_CHECKPOINT_PIXELS = 1024 * 1024  # 'auto' checkpointing: SDXL-class models from 1024x1024 up


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DDIM "leading" spacing with offset 1: t_i = 1 + (T // steps)·(steps − 1 − i).

    200 steps give 996, 991, …, 1 (docs/DESIGN.md §2.4).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps must be at most {num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [1 + stride * (steps - 1 - i) for i in range(steps)]


def vp_scale(sigma: float) -> float:
    """c = √(σ²+1): the k-diffusion latent divided by c is the reference code's (VP) latent."""
    return math.sqrt(sigma * sigma + 1.0)


def vp_noised(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """A clean latent noised to σ in VP form, (x0 + σ·ε)/√(σ²+1): what the reference code's
    scheduler.add_noise gives at the timestep of σ."""
    return (clean + sigma * noise.to(clean)) / vp_scale(sigma)


def feature_timestep(model_sampling: Any, sigma: float) -> tuple[float, float]:
    """(UNet timestep, noise level of that timestep) for features at σ.

    σ = 0 (the last step of most schedules) maps to the model's smallest sigma, i.e.
    timestep 0 for SD models: the reference code clamps t' < 0 to 0 and noises the
    reference to timestep 0. Elsewhere the reference is noised to the timestep the UNet is
    told, which is σ itself on the DDIM grid.
    """
    target = float(sigma) if sigma > 0 else float(model_sampling.sigma_min)
    timestep = model_sampling.timestep(torch.tensor([target], dtype=torch.float32))
    sigma_ref = float(model_sampling.sigma(timestep.float()).reshape(-1)[0])
    return float(timestep.reshape(-1)[0]), sigma_ref


class SDUNetFamily(ModelFamily):
    name = "SD UNet"
    supported = "an SD1.x, SD2.x or SDXL UNet"
    default_layer_count = 6

    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        return is_unet(diffusion_model)

    def check(self, base_model: Any) -> None:
        check_unet_variant(base_model)

    def attention_layers(self, diffusion_model: torch.nn.Module) -> list[SelfAttentionLayer]:
        return list_unet_layers(diffusion_model)

    def feature_pass(self, patcher: Any, layers: Sequence[SelfAttentionLayer], stop_early: bool = True,
                     checkpoint: bool = False) -> UNetFeaturePass:
        # A fresh options dict per pass: other packs' attn1 patches stay out of the AD features.
        return UNetFeaturePass(patcher.model, list(layers), stop_early=stop_early, checkpoint=checkpoint)

    def needs_inplace_guard(self, diffusion_model: torch.nn.Module) -> bool:
        return transformer_blocks_add_in_place(diffusion_model)

    def auto_checkpointing(self, base_model: Any, latent_shape: Sequence[int]) -> bool:
        pixels = int(latent_shape[-1]) * int(latent_shape[-2]) * PIXELS_PER_LATENT**2
        return has_class_conditioning(base_model.diffusion_model) and pixels >= AUTO_CHECKPOINT_PIXELS

    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return conditioning_kwargs(base_model, conditioning, latent, device, image_hw=image_hw)

    def conditioning_identity(self, cond: dict[str, torch.Tensor]) -> tuple:
        # SD1.x/2.x have nothing but the context, so their features are shared across output sizes.
        return tuple((name, tensor_digest(value)) for name, value in sorted(cond.items()) if name != "context")

    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        width = cross_attention_width(base_model.diffusion_model)
        null_width = int(conditioning[0][0].shape[-1])
        if width is None or width == null_width:
            return None
        return (f"the reference's empty-prompt conditioning is {null_width} wide but this model's cross-attention "
                f"takes {width}; capture the reference with this checkpoint's CLIP")

    def optimize_times(self, base_model: Any, steps: int) -> list[int]:
        return ddim_timesteps(steps)

    def feature_time(self, model_sampling: Any, sigma: float) -> tuple[float, float]:
        return feature_timestep(model_sampling, sigma)

    def to_model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x / vp_scale(sigma)

    def from_model_input(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        return z * vp_scale(sigma)

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return vp_noised(clean, noise, sigma)


SD_UNET = SDUNetFamily()
