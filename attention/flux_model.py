"""Flux anatomy (FLUX.1-dev, FLUX.1-schnell and other `comfy.ldm.flux` models): the host and model
checks, its attention layers, the conditioning and parametrization of an AD pass (docs/DESIGN.md §2.7).
The family (attention/flux_family.py) answers the ModelFamily interface with these; the pass itself is
attention/flux_pass.py.

Layers are counted as the reference code counts its attention calls: the double blocks
first (0..D-1), then the single blocks (D..D+S-1). "paper default" is the last 7 layers:
the reference's `(50, 57)` on FLUX.1 (19 double, 38 single blocks), i.e. its last 7 single
blocks, and the last 7 single blocks of every Flux with at least 7 of them.

An AD pass feeds the latent itself (flow matching, ComfyUI's CONST parametrization: the
model input is x) at the network time of the AD noise level (`feature_time`; σ itself on
Flux), with the null text, the null pooled vector and guidance 1.0 whatever the null
conditioning carries (dev embeds guidance, schnell has no guidance input). The pass guards
the in-place residual adds of Flux blocks itself (attention/flux_blocks.py), so callers need
no global saved-tensor guard; block checkpointing pays off at Flux sizes, so "auto" means on.

Null text. The reference code encodes "" padded to 512 T5 tokens; ComfyUI's Flux tokenizer
pads to 256. ComfyUI's T5 attends over the pad tokens without a mask, so every output
depends on the padded length: a 256-token encoding cannot be extended to the reference's
afterwards. The pass therefore uses the null conditioning exactly as given (its text tokens
are in the features); to match the reference, encode "" with `null_text_tokenizer_options()`
(what ComfyUI's own T5TokenizerOptions node sets, min_length 512).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .family import UnsupportedModelError
from .flux_blocks import BlockKey

FLUX_PAPER_DEFAULT_COUNT = 7
REFERENCE_T5_TOKENS = 512
HOST_MESSAGE = (
    "Flux needs ComfyUI v0.3.64 or newer: this ComfyUI has no attention override in its Flux blocks, "
    "so Attention Distillation cannot read them; update ComfyUI"
)
DOUBLE_BLOCK = "double_block"
SINGLE_BLOCK = "single_block"


def host_supports_flux() -> bool:
    """True where ComfyUI's Flux attention passes `transformer_options` to an attention
    function that honours `optimized_attention_override` (v0.3.64)."""
    import comfy.ldm.modules.attention as attention

    try:
        import comfy.ldm.flux.math as flux_math
    except ImportError:
        return False
    takes_options = "transformer_options" in inspect.signature(flux_math.attention).parameters
    return takes_options and hasattr(attention, "wrap_attn")


def is_flux(diffusion_model: Any) -> bool:
    """A network of ComfyUI's `comfy.ldm.flux.model.Flux` class (FLUX.1, Flux.2, LongCat-Image, ...)."""
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return False
    return isinstance(diffusion_model, Flux)


def has_global_modulation(diffusion_model: Any) -> bool:
    """Flux.2's network: one modulation per forward for all blocks (`params.global_modulation`, set by
    ComfyUI's detection for Flux.2 only); FLUX.1's blocks modulate themselves."""
    return is_flux(diffusion_model) and bool(getattr(diffusion_model.params, "global_modulation", False))


LONGCAT_MESSAGE = (
    "LongCat-Image is not supported: it shares Flux's network but shifts its image positions by the text "
    "length and uses its own text encoder and null text, which Attention Distillation does not reproduce"
)


def refuse_longcat(base_model: Any) -> None:
    """LongCat-Image (`model_base.LongCatImage`, ComfyUI v0.33) is refused by name: an AD pass calling the
    network directly would read its image at the wrong RoPE positions (docs/DESIGN.md §2.10)."""
    import comfy.model_base

    longcat = getattr(comfy.model_base, "LongCatImage", None)
    if longcat is not None and isinstance(base_model, longcat):
        raise UnsupportedModelError(LONGCAT_MESSAGE)


def check_flux_model(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless AD can run on this Flux MODEL in this ComfyUI."""
    if not host_supports_flux():
        raise UnsupportedModelError(HOST_MESSAGE)
    refuse_longcat(base_model)
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if not is_flux(diffusion_model):
        raise UnsupportedModelError(f"the MODEL is {type(base_model).__name__}, not a Flux model")
    import comfy.model_sampling

    if not isinstance(base_model.model_sampling, comfy.model_sampling.CONST):
        raise UnsupportedModelError("this Flux MODEL is not a flow-matching (CONST) model; Flux AD needs one")
    patch = int(diffusion_model.patch_size)
    in_channels = int(diffusion_model.img_in.weight.shape[1]) // (patch * patch)
    out_channels = int(diffusion_model.params.out_channels)
    if in_channels != out_channels:
        raise UnsupportedModelError(
            f"this Flux model takes {in_channels} latent channels but makes {out_channels} (Fill, Canny or Depth "
            "model, or a control LoRA); AD needs a text-to-image Flux model"
        )


@dataclass(frozen=True)
class FluxAttentionLayer:
    """One Flux block's joint attention, in the order the reference code counts it."""

    ad_index: int
    kind: str
    number: int
    heads: int
    dim_head: int

    @property
    def patch_key(self) -> BlockKey:
        """The key ComfyUI looks up in `patches_replace["dit"]`."""
        return (self.kind, self.number)


def list_flux_attention_layers(diffusion_model: torch.nn.Module) -> list[FluxAttentionLayer]:
    """Every attention layer of a ComfyUI Flux model: double blocks, then single blocks."""
    layers: list[FluxAttentionLayer] = []
    for kind, blocks in ((DOUBLE_BLOCK, diffusion_model.double_blocks), (SINGLE_BLOCK, diffusion_model.single_blocks)):
        for number, block in enumerate(blocks):
            heads = int(block.num_heads)
            hidden = int(getattr(block, "hidden_size", diffusion_model.hidden_size))
            layers.append(FluxAttentionLayer(len(layers), kind, number, heads, hidden // heads))
    return layers


def describe_layers(layers: list[FluxAttentionLayer]) -> str:
    """E.g. "57 attention layers: double blocks 0-18, single blocks 19-56"."""
    parts = []
    for kind, name in ((DOUBLE_BLOCK, "double blocks"), (SINGLE_BLOCK, "single blocks")):
        indices = [layer.ad_index for layer in layers if layer.kind == kind]
        if indices:
            parts.append(f"{name} {indices[0]}-{indices[-1]}")
    return f"{len(layers)} attention layers: " + ", ".join(parts)


def null_text_tokenizer_options() -> dict[str, int]:
    """`clip.tokenize("", tokenizer_options=...)` options that pad T5 as the reference does."""
    return {"t5xxl_min_length": REFERENCE_T5_TOKENS}


def _null_parts(conditioning: list) -> tuple[torch.Tensor, torch.Tensor]:
    if not conditioning:
        raise ValueError("the null conditioning is empty; connect CLIPTextEncode with empty text and a Flux CLIP")
    context, options = conditioning[0][0], conditioning[0][1]
    pooled = options.get("pooled_output")
    if pooled is None:
        raise ValueError(
            "the null conditioning has no pooled output; encode the empty prompt with a Flux CLIP "
            "(DualCLIPLoader type flux: clip_l and t5xxl)"
        )
    return context, pooled


def flux_conditioning_mismatch(base_model: Any, conditioning: list) -> str | None:
    """Why `conditioning` cannot drive this model's AD passes (another model's text encoder), or None."""
    context, pooled = _null_parts(conditioning)
    params = base_model.diffusion_model.params
    if int(context.shape[-1]) != int(params.context_in_dim) or int(pooled.shape[-1]) != int(params.vec_in_dim):
        return (f"the empty-prompt conditioning has {context.shape[-1]}-wide text tokens and a {pooled.shape[-1]}-wide "
                f"pooled vector, but this Flux model takes {params.context_in_dim} and {params.vec_in_dim} "
                "(T5-XXL and CLIP-L); encode it with a Flux CLIP")
    return None


def flux_conditioning(base_model: Any, conditioning: list, latent: torch.Tensor,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Network inputs of an AD pass from the null CONDITIONING, batched to `latent`: T5 tokens
    `context` (B, T, C), pooled CLIP-L `y`, and `guidance` 1.0 where the model embeds guidance.
    The conditioning's own guidance is ignored; a Flux Kontext reference latent on it is not
    the AD reference and stays out of the AD passes."""
    mismatch = flux_conditioning_mismatch(base_model, conditioning)
    if mismatch is not None:
        raise ValueError(mismatch)
    context, pooled = _null_parts(conditioning)
    batch = latent.shape[0]
    cond = {
        "context": context[:1].detach().clone().to(device).expand(batch, -1, -1),
        "y": pooled[:1].detach().clone().to(device).expand(batch, -1),
    }
    if bool(base_model.diffusion_model.params.guidance_embed):
        cond["guidance"] = torch.ones(batch, device=device)
    return cond


def feature_time(model_sampling: Any, sigma: float) -> tuple[float, float]:
    """(network time, noise level) of features at σ: the model's own `timestep(σ)` (σ on Flux);
    σ = 0, the last step, is the clean latent at time 0."""
    time = model_sampling.timestep(torch.tensor([float(sigma)], dtype=torch.float32))
    return float(time.reshape(-1)[0]), float(sigma)


def flow_noised(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """A clean latent noised to σ as the model input: σ·ε + (1 − σ)·x0 (ComfyUI's CONST)."""
    return sigma * noise.to(clean) + (1.0 - sigma) * clean


PATCH = 2
ADAIN_DIMS = (2, 4)  # the token dims of `packed_view`: AdaIN statistics of one packed channel


def packed_view(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, H, W) as (B, 16, H/2, 2, W/2, 2): Flux's tokens are 2×2 patches, so a packed
    channel (latent channel, patch row, patch column) is dims 1, 3, 5 and its tokens dims 2, 4."""
    batch, channels, height, width = latent.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"a Flux latent needs even height and width, got {height}x{width}")
    return latent.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)


def image_token_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Image tokens per column and row: ComfyUI pads the latent to the patch size."""
    return ((height + patch_size // 2) // patch_size, (width + patch_size // 2) // patch_size)
