"""The Flux family (FLUX.1-dev, FLUX.1-schnell and other `comfy.ldm.flux.model.Flux` models): ComfyUI's
Flux transformer, its double then single blocks, flow matching / CONST (docs/DESIGN.md §2.7 and §3).

Anatomy and conditioning are attention/flux_model.py, the AD forward attention/flux_pass.py; this module
answers the `ModelFamily` interface with them. Chroma (`comfy.ldm.chroma`) is another class without the
pooled CLIP-L input and is not accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .backends import options_identity
from .family import ModelFamily
from .flux_model import (
    ADAIN_DIMS,
    FLUX_PAPER_DEFAULT_COUNT,
    PATCH,
    REFERENCE_T5_TOKENS,
    FluxAttentionLayer,
    check_flux_model,
    describe_layers,
    feature_time,
    flow_noised,
    flux_conditioning,
    flux_conditioning_mismatch,
    has_global_modulation,
    host_supports_flux,
    is_flux,
    list_flux_attention_layers,
    null_text_tokenizer_options,
    packed_view,
)
from .flux_pass import FluxFeaturePass

__all__ = ["FLUX", "FluxAttentionLayer", "FluxFamily", "FluxFeaturePass", "REFERENCE_T5_TOKENS", "check_flux_model",
           "describe_layers", "feature_time", "flow_noised", "flux_conditioning", "flux_conditioning_mismatch",
           "host_supports_flux", "list_flux_attention_layers", "null_text_tokenizer_options", "packed_view"]

TILING_MESSAGE = (
    "Flux cannot be made to tile seamlessly: its transformer places every image token by RoPE positions "
    "that run from one edge to the other and do not wrap around, so wrapping the VAE alone would leave a "
    "seam. Use AD Texture Windows for large Flux textures, or an SD1.x/SDXL model for seamless ones"
)


class FluxFamily(ModelFamily):
    name = "Flux"
    supported = "a Flux (FLUX.1-dev or -schnell) model"
    default_layer_count = FLUX_PAPER_DEFAULT_COUNT
    seamless_tiling_error = TILING_MESSAGE
    adain_dims = ADAIN_DIMS
    latent_multiple = PATCH
    # §2.7 step 4: AdaIN matches x' to the same noised reference r whose features are the target.
    adain_shares_reference_noise = True

    def accepts(self, diffusion_model: torch.nn.Module) -> bool:
        return is_flux(diffusion_model) and not has_global_modulation(diffusion_model)  # Flux.2: flux2_family.py

    def check(self, base_model: Any) -> None:
        check_flux_model(base_model)

    def attention_layers(self, diffusion_model: torch.nn.Module) -> list[FluxAttentionLayer]:
        return list_flux_attention_layers(diffusion_model)

    def describe_layers(self, layers: Sequence[FluxAttentionLayer]) -> str:
        return f"this Flux model has {describe_layers(list(layers))}"

    def feature_pass(self, patcher: Any, layers: Sequence[FluxAttentionLayer], stop_early: bool = True,
                     checkpoint: bool = False) -> FluxFeaturePass:
        # The MODEL's own options run inside the pass (flux_blocks.py chains them; docs/DESIGN.md §3).
        options = (getattr(patcher, "model_options", None) or {}).get("transformer_options")
        return FluxFeaturePass(patcher.model, list(layers), stop_early=stop_early, checkpoint=checkpoint,
                               transformer_options=options)

    def pass_options_identity(self, patcher: Any) -> tuple:
        # rope_options, attn1 patches, dit replaces and overrides all shape the features (docs/DESIGN.md §3)
        options = (getattr(patcher, "model_options", None) or {}).get("transformer_options") or {}
        return ("transformer_options", options_identity(options))

    def needs_inplace_guard(self, diffusion_model: torch.nn.Module) -> bool:
        return False  # the pass guards the residual stream of each block itself (flux_blocks.residual_guard)

    def auto_checkpointing(self, base_model: Any, latent_shape: Sequence[int]) -> bool:
        return True  # a Flux block's activations dwarf its recomputation cost at every useful size

    def conditioning(self, base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device,
                     image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return flux_conditioning(base_model, conditioning, latent, device)

    def conditioning_identity(self, cond: dict[str, torch.Tensor]) -> tuple:
        return ()  # the null text is the reference's own; guidance is always 1.0; no size conditioning

    def conditioning_mismatch(self, base_model: Any, conditioning: list) -> str | None:
        try:
            return flux_conditioning_mismatch(base_model, conditioning)
        except ValueError as error:
            return str(error)

    def conditioning_note(self, conditioning: list) -> str | None:
        tokens = int(conditioning[0][0].shape[1])
        if tokens == REFERENCE_T5_TOKENS:
            return None
        return (f"the empty prompt has {tokens} T5 tokens; the reference code pads it to {REFERENCE_T5_TOKENS}, and "
                "Flux's features depend on the padded length (the text tokens are in the AD loss). To match it, "
                f"put T5TokenizerOptions (min_length {REFERENCE_T5_TOKENS}) between the CLIP and CLIPTextEncode")

    def optimize_times(self, base_model: Any, steps: int) -> list[float]:
        """The model's own `simple` sigmas for `steps` (ModelSamplingFlux's shift included), without the final 0."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        import comfy.samplers

        sampling = base_model.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)[:-1]
        return [float(t) for t in sampling.timestep(sigmas.float()).reshape(-1)]

    def feature_time(self, model_sampling: Any, sigma: float) -> tuple[float, float]:
        return feature_time(model_sampling, sigma)

    def to_model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x  # CONST: the network takes the latent itself

    def from_model_input(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        return z

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return flow_noised(clean, noise, sigma)

    def adain_view(self, latent: torch.Tensor) -> torch.Tensor:
        return packed_view(latent)


FLUX = FluxFamily()
