"""The Flux.2 family (FLUX.2-dev, FLUX.2 [klein]: ComfyUI v0.33's `model_base.Flux2`), docs/DESIGN.md §2.10.

Flux.2 runs FLUX.1's network class (`comfy.ldm.flux.model.Flux`) with global modulation, patch size 1
and 128 latent channels, so the FLUX.1 family's layer walk, block wrappers and AD pass serve it
unchanged (attention/flux_model.py, flux_blocks.py, flux_pass.py). What differs is answered here:

- recognised by `params.global_modulation` (the network class alone is FLUX.1's), checked to be a
  `model_base.Flux2` (LongCat-Image shares the class and is refused by name, flux_model.py);
- "paper default" is the last ⌈7·N/57⌉ of the N = double + single blocks: `flux_ad`'s share of FLUX.1;
- null text: the CONDITIONING's text features left-padded with zeros to 512 tokens, exactly what
  `model_base.Flux2.extra_conds` feeds the sampler's pass; no pooled vector, no mask, no reference
  latents; guidance 1.0 where the model embeds it (dev), none otherwise (Klein);
- AdaIN: one statistic per latent channel (each latent pixel is one token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .family import UnsupportedModelError
from .flux_family import TILING_MESSAGE, FluxFamily
from .flux_model import (
    FluxAttentionLayer,
    check_flux_model,
    describe_layers,
    has_global_modulation,
    host_supports_flux,
)

TEXT_TOKENS = 512  # model_base.Flux2.extra_conds pads the text to this many tokens
REFERENCE_SHARE = (7, 57)  # flux_ad's default on FLUX.1: the last 7 of 57 attention calls
HOST_MESSAGE = "Flux.2 needs ComfyUI v0.33 or newer: this ComfyUI cannot load Flux.2 models; update ComfyUI"


def host_supports_flux2() -> bool:
    """True where ComfyUI has Flux.2 models (`model_base.Flux2`, v0.33) and Flux's attention override."""
    import comfy.model_base

    return hasattr(comfy.model_base, "Flux2") and host_supports_flux()


def check_flux2_model(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless AD can run on this Flux.2 MODEL in this ComfyUI."""
    if not host_supports_flux2():
        raise UnsupportedModelError(HOST_MESSAGE)
    check_flux_model(base_model)  # LongCat-Image refused by name, CONST sampling, no extra input channels
    import comfy.model_base

    if not isinstance(base_model, comfy.model_base.Flux2):
        raise UnsupportedModelError(
            f"the MODEL is {type(base_model).__name__} with Flux.2's network; Attention Distillation reads "
            "Flux.2 (dev or Klein) models only"
        )


def paper_default_count(layer_count: int) -> int:
    """⌈7·N/57⌉: FLUX.1's 7 of 57, FLUX.2-dev's 7 of 56, Klein 4B's 4 of 25, Klein 9B's 4 of 32."""
    share, of = REFERENCE_SHARE
    return math.ceil(share * layer_count / of)


def padded_text(context: torch.Tensor) -> torch.Tensor:
    """Text features as the sampler's pass feeds them: left-padded with zeros to 512 tokens
    (`model_base.Flux2.extra_conds`), so the null text sits at the same RoPE positions."""
    missing = TEXT_TOKENS - int(context.shape[1])
    return torch.nn.functional.pad(context, (0, 0, missing, 0)) if missing > 0 else context


def flux2_conditioning_mismatch(base_model: Any, conditioning: list) -> str | None:
    """Why `conditioning` cannot drive this model's AD passes (another model's text encoder), or None."""
    if not conditioning:
        return "the null conditioning is empty; connect CLIPTextEncode with empty text and this Flux.2 model's CLIP"
    width = int(conditioning[0][0].shape[-1])
    expected = int(base_model.diffusion_model.params.context_in_dim)
    if width != expected:
        return (f"the empty-prompt conditioning has {width}-wide text features, but this Flux.2 model takes "
                f"{expected}; encode it with the text encoder made for this model (CLIPLoader type flux2)")
    return None


def flux2_conditioning(base_model: Any, conditioning: list, latent: torch.Tensor,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Network inputs of an AD pass from the null CONDITIONING, batched to `latent`: the text padded
    as the sampler pads it, guidance 1.0 where embedded. The conditioning's guidance, attention mask
    and reference latents are not the AD passes' and stay out."""
    mismatch = flux2_conditioning_mismatch(base_model, conditioning)
    if mismatch is not None:
        raise ValueError(mismatch)
    context = padded_text(conditioning[0][0][:1].detach().clone().to(device))
    batch = latent.shape[0]
    cond = {"context": context.expand(batch, -1, -1)}
    if bool(base_model.diffusion_model.params.guidance_embed):
        cond["guidance"] = torch.ones(batch, device=device)
    return cond


class Flux2Family(FluxFamily):
    name = "Flux.2"
    supported = "a Flux.2 (dev or Klein, ComfyUI v0.33 or newer) model"
    seamless_tiling_error = TILING_MESSAGE
    adain_dims = (2, 3)  # patch size 1: one statistic per latent channel over its pixels
    latent_multiple = 1

    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        return has_global_modulation(diffusion_model)

    def check(self, base_model: Any) -> None:
        check_flux2_model(base_model)

    def default_layers(self, layers: Sequence[FluxAttentionLayer]) -> tuple[int, ...]:
        return tuple(layer.ad_index for layer in layers[-paper_default_count(len(layers)):])

    def describe_layers(self, layers: Sequence[FluxAttentionLayer]) -> str:
        return f"this Flux.2 model has {describe_layers(list(layers))}"

    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return flux2_conditioning(base_model, conditioning, latent, device)

    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        return flux2_conditioning_mismatch(base_model, conditioning)

    def conditioning_note(self, conditioning: list) -> str | None:
        return None  # the text is padded as the sampler pads it; no T5 length to match

    def adain_view(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


FLUX2 = Flux2Family()
