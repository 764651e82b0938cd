"""The Qwen-Image family (Qwen-Image T2I, Edit, Edit-2509, Edit-2511; ComfyUI v0.33.0 or newer): one joint
attention per block, text tokens first, flow matching (docs/DESIGN.md §2.8). Anatomy is
attention/qwen_image/anatomy.py, the AD forward attention/qwen_image/feature_pass.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..flow_matching import FlowMatchingFamily
from .anatomy import (
    ADAIN_DIMS,
    PATCH,
    QwenImageAttentionLayer,
    check_qwen_image_model,
    is_qwen_image,
    list_qwen_image_layers,
    packed_view,
    paper_default_count,
    qwen_conditioning,
    qwen_conditioning_mismatch,
)
from .feature_pass import QwenImageFeaturePass

TILING_MESSAGE = (
    "Qwen-Image cannot be made to tile seamlessly: its transformer places every image token by RoPE positions "
    "that run from one edge to the other and do not wrap around, so wrapping the VAE alone would leave a seam. "
    "Use AD Texture Windows for large textures, or an SD1.x/SDXL model for seamless ones"
)


class QwenImageFamily(FlowMatchingFamily):
    name = "Qwen-Image"
    supported = "a Qwen-Image or Qwen-Image-Edit model (ComfyUI v0.33.0 or newer)"
    seamless_tiling_error = TILING_MESSAGE
    adain_dims = ADAIN_DIMS
    latent_multiple = PATCH
    latent_ndim = 5  # (B, 16, 1, H, W): Wan21 latents
    adain_shares_reference_noise = True  # §2.7 step 4, as on Flux

    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        return is_qwen_image(diffusion_model)

    def check(self, base_model: Any) -> None:
        check_qwen_image_model(base_model)

    def attention_layers(self, diffusion_model: torch.nn.Module) -> list[QwenImageAttentionLayer]:
        return list_qwen_image_layers(diffusion_model)

    def default_layers(self, layers: Sequence[QwenImageAttentionLayer]) -> tuple[int, ...]:
        return tuple(layer.ad_index for layer in layers[-paper_default_count(len(layers)):])

    def describe_layers(self, layers: Sequence[QwenImageAttentionLayer]) -> str:
        return f"this Qwen-Image model has {len(layers)} blocks, 0-{len(layers) - 1}, one joint attention each"

    def feature_pass(self, patcher: Any, layers: Sequence[QwenImageAttentionLayer], stop_early: bool = True,
                     checkpoint: bool = False) -> QwenImageFeaturePass:
        options = (getattr(patcher, "model_options", None) or {}).get("transformer_options")
        return QwenImageFeaturePass(patcher.model, list(layers), stop_early=stop_early, checkpoint=checkpoint,
                                    transformer_options=options)

    def needs_inplace_guard(self, diffusion_model: torch.nn.Module) -> bool:
        return False  # residuals are added out of place (docs/DESIGN.md §2.8)

    def auto_checkpointing(self, base_model: Any, latent_shape: Sequence[int]) -> bool:
        return True  # a 3072-wide block's activations dwarf its recomputation cost at every useful size

    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return qwen_conditioning(base_model, conditioning, latent, device)

    def conditioning_identity(self, cond: dict[str, torch.Tensor]) -> tuple:
        return ()  # the null text (and its mask) is the reference's own; no size conditioning

    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        return qwen_conditioning_mismatch(base_model, conditioning)

    def adain_view(self, latent: torch.Tensor) -> torch.Tensor:
        return packed_view(latent)


QWEN_IMAGE = QwenImageFamily()
