"""The Z-Image family (Turbo and Base on ComfyUI v0.33.0: `comfy.ldm.lumina.model.NextDiT` under
`supported_models.ZImage`): its main layers, flow matching / CONST, AdaIN on 2×2 patches
(docs/DESIGN.md §2.8 and §3).

Anatomy and conditioning are attention/zimage/anatomy.py, the AD forward attention/zimage/feature_pass.py;
the flow-matching time, noising and packed AdaIN view are Flux's (attention/flux_model.py): Z-Image packs a
token as (patch row, patch column, channel), Flux as (channel, patch row, patch column), the same 64 groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..family import ModelFamily
from ..flux_family import FLUX
from ..flux_model import ADAIN_DIMS, PATCH, feature_time, flow_noised, packed_view
from .anatomy import (
    check_zimage_model,
    describe_layers,
    is_nextdit,
    list_zimage_attention_layers,
    paper_default_count,
    zimage_conditioning,
    zimage_conditioning_mismatch,
)
from .feature_pass import ZImageFeaturePass

TILING_MESSAGE = (
    "Z-Image cannot be made to tile seamlessly: its transformer places every image token by RoPE positions "
    "that run from one edge to the other and do not wrap around, so wrapping the VAE alone would leave a "
    "seam. Use AD Texture Windows for large Z-Image textures, or an SD1.x/SDXL model for seamless ones"
)


class ZImageFamily(ModelFamily):
    name = "Z-Image"
    supported = "a Z-Image (Turbo or Base, ComfyUI v0.33.0 or newer) model"
    seamless_tiling_error = TILING_MESSAGE
    adain_dims = ADAIN_DIMS
    latent_multiple = PATCH
    # §2.8 (as §2.7 step 4): AdaIN matches x' to the same noised reference whose features are the target.
    adain_shares_reference_noise = True

    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        return is_nextdit(diffusion_model)

    def check(self, base_model: Any) -> None:
        check_zimage_model(base_model)

    def attention_layers(self, diffusion_model: torch.nn.Module) -> list:
        return list_zimage_attention_layers(diffusion_model)

    def default_layers(self, layers: Sequence) -> tuple[int, ...]:
        """The last ⌈7·N/57⌉ main layers (26-29 of 30)."""
        return tuple(layer.ad_index for layer in layers[-paper_default_count(len(layers)):])

    def describe_layers(self, layers: Sequence) -> str:
        return describe_layers(len(layers))

    def feature_pass(self, patcher: Any, layers: Sequence, stop_early: bool = True,
                     checkpoint: bool = False) -> ZImageFeaturePass:
        options = (getattr(patcher, "model_options", None) or {}).get("transformer_options")
        return ZImageFeaturePass(patcher.model, list(layers), stop_early=stop_early, checkpoint=checkpoint,
                                 transformer_options=options)

    def needs_inplace_guard(self, diffusion_model: torch.nn.Module) -> bool:
        return False  # main layers add residuals out of place; autograd's version check guards the rest

    def auto_checkpointing(self, base_model: Any, latent_shape: Sequence[int]) -> bool:
        return True  # a main layer's activations dwarf its recomputation cost at every useful size

    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        return zimage_conditioning(base_model, conditioning, latent, device)

    def conditioning_identity(self, cond: dict[str, Any]) -> tuple:
        return ()  # the null caption is the reference's own; no size conditioning, no guidance input

    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        try:
            return zimage_conditioning_mismatch(base_model, conditioning)
        except ValueError as error:
            return str(error)

    def optimize_times(self, base_model: Any, steps: int) -> list[float]:
        """The MODEL's own `simple` sigmas for `steps` without the final 0, as network times: the
        flow-matching schedule Flux's optimization uses too (docs/DESIGN.md §2.8)."""
        return FLUX.optimize_times(base_model, steps)

    def feature_time(self, model_sampling: Any, sigma: float) -> tuple[float, float]:
        return feature_time(model_sampling, sigma)  # timestep(σ) = σ; NextDiT embeds 1 − σ itself

    def to_model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x  # CONST: the network takes the latent itself

    def from_model_input(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        return z

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return flow_noised(clean, noise, sigma)

    def adain_view(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.shape[-2] % PATCH or latent.shape[-1] % PATCH:
            raise ValueError(f"AdaIN on Z-Image needs a latent of even height and width (whole 2x2 patches), got "
                             f"{latent.shape[-2]}x{latent.shape[-1]}; make the image a multiple of 16 pixels")
        return packed_view(latent)


ZIMAGE = ZImageFamily()
