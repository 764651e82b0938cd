"""Z-Image anatomy (Turbo and Base: ComfyUI's `comfy.ldm.lumina.model.NextDiT` under
`supported_models.ZImage`, docs/DESIGN.md §2.8): the host and model checks, the AD layers, the token
layout of the joint sequence and the null-caption conditioning of an AD pass.

AD layers are the N main `layers` (AD index i = `layers[i]` = ComfyUI's `block_index`); the two
context-refiner and two noise-refiner blocks are neither selectable nor counted. "paper default" is
the last ⌈7·N/57⌉ main layers, `flux_ad`'s share of FLUX.1 (7 of 57): 26-29 of Z-Image's 30.

The joint sequence of a main layer is [caption ; caption pads ; image ; image pads]: ComfyUI pads the
caption and the image tokens with learned pad tokens to a multiple of `pad_tokens_multiple` (32) and
masks nothing. Query rows of the loss are the real caption and image rows; the keys and values are all
tokens of the reference's own sequence, pads included (what the model attends to).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..family import UnsupportedModelError

PAPER_SHARE = (7, 57)  # flux_ad's default (50, 57): the last 7 of FLUX.1's 57 attention layers
MAIN_LAYERS = "layers"
HOST_MESSAGE = (
    "Z-Image needs ComfyUI v0.33.0 or newer: this ComfyUI has no Z-Image model (or its Lumina attention "
    "takes no attention override), so Attention Distillation cannot read it; update ComfyUI"
)
CLIP_ADVICE = "encode the empty prompt with Z-Image's text encoder (CLIPLoader: qwen_3_4b, type lumina2)"


def _lumina():
    try:
        import comfy.ldm.lumina.model as lumina
    except ImportError:
        return None
    return lumina


def host_supports_zimage() -> bool:
    """True where ComfyUI has Z-Image and its joint attention honours `optimized_attention_override`."""
    lumina = _lumina()
    if lumina is None:
        return False
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models as supported

    takes_options = "transformer_options" in inspect.signature(lumina.JointAttention.forward).parameters
    return hasattr(supported, "ZImage") and hasattr(attention, "wrap_attn") and takes_options


def is_nextdit(diffusion_model: Any) -> bool:
    """ComfyUI's Lumina 2 / Z-Image transformer (the family refuses what is not Z-Image in `check`)."""
    lumina = _lumina()
    return lumina is not None and isinstance(diffusion_model, lumina.NextDiT)


def _pixel_space(base_model: Any) -> bool:
    import comfy.supported_models as supported

    lumina = _lumina()
    pixel_model = getattr(lumina, "NextDiTPixelSpace", None)
    pixel_config = getattr(supported, "ZImagePixelSpace", None)
    return (pixel_model is not None and isinstance(base_model.diffusion_model, pixel_model)) or (
        pixel_config is not None and isinstance(getattr(base_model, "model_config", None), pixel_config))


def is_zimage(base_model: Any) -> bool:
    """Z-Image by its config class, or by its anatomy (time scale 1000, no pooled text input), never by
    its width: a narrower model of the same anatomy is still Z-Image."""
    import comfy.supported_models as supported

    config_class = getattr(supported, "ZImage", None)
    if config_class is not None and isinstance(getattr(base_model, "model_config", None), config_class):
        return True
    diffusion_model = base_model.diffusion_model
    return float(getattr(diffusion_model, "time_scale", 1.0)) == 1000.0 and getattr(
        diffusion_model, "clip_text_pooled_proj", None) is None


def check_zimage_model(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless AD can run on this MODEL as Z-Image in this ComfyUI."""
    if not host_supports_zimage():
        raise UnsupportedModelError(HOST_MESSAGE)
    if not is_nextdit(getattr(base_model, "diffusion_model", None)):
        raise UnsupportedModelError(f"the MODEL is {type(base_model).__name__}, not a Z-Image model")
    if _pixel_space(base_model):
        raise UnsupportedModelError(
            "this is Z-Image's pixel-space model (ZImagePixelSpace); Attention Distillation reads the latent "
            "Z-Image models (Turbo, Base)")
    if not is_zimage(base_model):
        raise UnsupportedModelError(
            "this Lumina 2 model is not Z-Image (Lumina-Image 2.0 or NewBie); Attention Distillation reads the "
            "Z-Image models (Turbo, Base) of this model class")
    import comfy.model_sampling

    if not isinstance(base_model.model_sampling, comfy.model_sampling.CONST):
        raise UnsupportedModelError("this Z-Image MODEL is not a flow-matching (CONST) model; Z-Image AD needs one")


@dataclass(frozen=True)
class ZImageAttentionLayer:
    """The joint attention of main layer `ad_index` (ComfyUI's `block_index`)."""

    ad_index: int
    heads: int
    dim_head: int

    @property
    def patch_key(self) -> tuple[str, int]:
        return (MAIN_LAYERS, self.ad_index)


def list_zimage_attention_layers(diffusion_model: torch.nn.Module) -> list[ZImageAttentionLayer]:
    """The main layers in forward order (refiners are not AD layers, docs/DESIGN.md §2.8)."""
    layers = []
    for index, block in enumerate(diffusion_model.layers):
        attention = block.attention
        layers.append(ZImageAttentionLayer(index, int(attention.n_local_heads), int(attention.head_dim)))
    return layers


def paper_default_count(layer_count: int) -> int:
    """⌈7·N/57⌉: the share of the layers `flux_ad`'s default takes of FLUX.1 (30 main layers: 4)."""
    share, of = PAPER_SHARE
    return min(layer_count, max(1, math.ceil(share * layer_count / of)))


def describe_layers(count: int) -> str:
    """Added to layer-selection errors: what the indices count."""
    return f"this Z-Image model has {count} main layers, 0-{count - 1}; its refiner layers are not AD layers"


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one main-layer sequence are: `text` caption tokens padded to `text_padded`,
    then the image's `grid` (rows × columns of 2×2 patches) padded to `image_padded` tokens."""

    text: int
    text_padded: int
    grid: tuple[int, int]
    image_padded: int

    @property
    def image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def sequence(self) -> int:
        return self.text_padded + self.image_padded

    @property
    def has_pads(self) -> bool:
        return self.text_padded != self.text or self.image_padded != self.image

    def query_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The real caption rows, then the real image rows, of a (B, heads, S, d) feature."""
        if not self.has_pads:
            return tensor
        start = self.text_padded
        return torch.cat([tensor[:, :, : self.text], tensor[:, :, start : start + self.image]], dim=2)

    @property
    def keys_around_grid(self) -> tuple[int, int]:
        """(tokens before, tokens after) the image grid among the keys: every pad is a key."""
        return (self.text_padded, self.image_padded - self.image)


def _padded(count: int, multiple: int | None) -> int:
    return count if not multiple else multiple * math.ceil(count / multiple)


def token_layout(diffusion_model: torch.nn.Module, text: int, height: int, width: int) -> TokenLayout:
    """The layout ComfyUI gives a `height`×`width` latent with a `text`-token caption (it pads the latent
    to whole patches and both token groups to `pad_tokens_multiple`)."""
    patch = int(diffusion_model.patch_size)
    grid = (-(-height // patch), -(-width // patch))
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None)
    return TokenLayout(text, _padded(text, multiple), grid, _padded(grid[0] * grid[1], multiple))


def caption_width(diffusion_model: torch.nn.Module) -> int:
    return int(diffusion_model.cap_embedder[-1].in_features)


def _caption(conditioning: list) -> torch.Tensor:
    if not conditioning:
        raise ValueError(f"the null conditioning is empty; {CLIP_ADVICE}")
    return conditioning[0][0]


def zimage_conditioning_mismatch(base_model: Any, conditioning: list) -> str | None:
    """Why `conditioning` cannot drive this model's AD passes (another model's text encoder), or None."""
    context = _caption(conditioning)
    width = caption_width(base_model.diffusion_model)
    if context.ndim != 3 or int(context.shape[-1]) != width:
        return (f"the empty-prompt conditioning has {tuple(context.shape)} caption features, but this Z-Image model "
                f"takes {width}-wide ones; {CLIP_ADVICE}")
    return None


def zimage_conditioning(base_model: Any, conditioning: list, latent: torch.Tensor,
                        device: torch.device) -> dict[str, Any]:
    """Network inputs of an AD pass from the null CONDITIONING, batched to `latent`: the caption features
    as encoded (`context`, (B, T, C); ComfyUI's Z-Image applies no caption mask) and `num_tokens` = T. A
    pooled vector, reference latents or SigLIP features on it stay out of AD passes."""
    mismatch = zimage_conditioning_mismatch(base_model, conditioning)
    if mismatch is not None:
        raise ValueError(mismatch)
    context = _caption(conditioning)[:1].detach().clone().to(device)
    return {"context": context.expand(latent.shape[0], -1, -1), "num_tokens": int(context.shape[1])}
