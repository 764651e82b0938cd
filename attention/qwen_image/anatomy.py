"""Qwen-Image anatomy (T2I, Edit, Edit-2509, Edit-2511: `comfy.ldm.qwen_image`, ComfyUI v0.33.0): host and
model checks, its AD layers, the null conditioning and the packed latent view (docs/DESIGN.md §2.8,
docs/families/qwen-image.md of the design notes).

One joint attention per transformer block: AD index i is block i, named
`patches_replace["dit"][("double_block", i)]`. "paper default" is the last ⌈7·N/57⌉ blocks (52-59 of 60):
the depth share of flux_ad's 7 of FLUX.1's 57 attention calls, rounded up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..family import UnsupportedModelError

BLOCK = "double_block"  # ComfyUI's dit replace key of a Qwen-Image block
PATCH = 2
PACKED_CHANNELS = 16 * PATCH * PATCH  # `img_in` width: 16 latent channels in 2×2 patches
HOST_MESSAGE = (
    "Qwen-Image needs ComfyUI v0.33.0 or newer: this ComfyUI's Qwen-Image attention does not pass q and k "
    "(after their norms and RoPE) to the attention override, so Attention Distillation cannot read them; "
    "update ComfyUI"
)
TEXT_ENCODER_HINT = "encode it with Qwen-Image's text encoder (CLIPLoader type qwen_image)"


class LatentSizeError(UnsupportedModelError):
    """A latent this model cannot read whole (odd height or width: a token is a 2×2 patch); the nodes
    report it, naming themselves, as they report a model AD cannot run on."""


def check_latent_size(height: int, width: int) -> None:
    if height % PATCH or width % PATCH:
        raise LatentSizeError(f"a Qwen-Image latent needs even height and width (2x2 patches), got {height}x{width} "
                              "latent pixels; use an image size that is a multiple of 16 pixels")


def _qwen_module() -> Any | None:
    try:
        import comfy.ldm.qwen_image.model as qwen_model
    except ImportError:
        return None
    return qwen_model


def host_supports_qwen_image() -> bool:
    """True where Qwen-Image's attention applies RoPE to split heads and calls the wrapped attention with
    them (`apply_rope1` ... `skip_reshape=True`, ComfyUI v0.33); v0.3.64 flattens the heads first."""
    import comfy.ldm.modules.attention as attention

    qwen_model = _qwen_module()
    return qwen_model is not None and hasattr(qwen_model, "apply_rope1") and hasattr(attention, "wrap_attn")


def is_qwen_image(diffusion_model: Any) -> bool:
    qwen_model = _qwen_module()
    return qwen_model is not None and isinstance(diffusion_model, qwen_model.QwenImageTransformer2DModel)


def check_qwen_image_model(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless AD can run on this Qwen-Image MODEL in this ComfyUI."""
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if not is_qwen_image(diffusion_model):
        raise UnsupportedModelError(f"the MODEL is {type(base_model).__name__}, not a Qwen-Image model")
    if not host_supports_qwen_image():
        raise UnsupportedModelError(HOST_MESSAGE)
    import comfy.model_sampling

    if not isinstance(base_model.model_sampling, comfy.model_sampling.CONST):
        raise UnsupportedModelError("this Qwen-Image MODEL is not a flow-matching (CONST) model; AD needs one")
    width = int(diffusion_model.img_in.weight.shape[1])
    if width != PACKED_CHANNELS or int(diffusion_model.patch_size) != PATCH:
        raise UnsupportedModelError(
            f"this Qwen-Image model takes {width} packed input channels; AD needs the {PACKED_CHANNELS} of 16 latent "
            "channels in 2x2 patches (Qwen-Image, Edit, Edit-2509, Edit-2511)"
        )


@dataclass(frozen=True)
class QwenImageAttentionLayer:
    """The joint attention of one transformer block; its AD index is the block's."""

    ad_index: int
    heads: int
    dim_head: int

    @property
    def patch_key(self) -> tuple[str, int]:
        """The key ComfyUI looks up in `patches_replace["dit"]`."""
        return (BLOCK, self.ad_index)


def list_qwen_image_layers(diffusion_model: torch.nn.Module) -> list[QwenImageAttentionLayer]:
    """One layer per block of `transformer_blocks`, in forward order."""
    return [
        QwenImageAttentionLayer(i, int(block.attn.heads), int(block.attn.inner_dim) // int(block.attn.heads))
        for i, block in enumerate(diffusion_model.transformer_blocks)
    ]


def paper_default_count(block_count: int) -> int:
    """⌈7·N/57⌉: flux_ad's share of FLUX.1's attention depth, rounded up (60 blocks: 8)."""
    return math.ceil(7 * block_count / 57)


def null_text_width(diffusion_model: torch.nn.Module) -> int:
    return int(diffusion_model.txt_in.weight.shape[1])


def qwen_conditioning_mismatch(base_model: Any, conditioning: list) -> str | None:
    """Why `conditioning` cannot be the null text of this model's AD passes, or None."""
    if not conditioning:
        return f"the null conditioning is empty; connect CLIPTextEncode with empty text ({TEXT_ENCODER_HINT})"
    context = conditioning[0][0]
    width = null_text_width(base_model.diffusion_model)
    if context.ndim != 3 or int(context.shape[-1]) != width:
        return (f"the empty-prompt conditioning has {tuple(context.shape)} text tokens, but this Qwen-Image model "
                f"takes {width}-wide ones; {TEXT_ENCODER_HINT}")
    return None


def qwen_conditioning(base_model: Any, conditioning: list, latent: torch.Tensor,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Network inputs of an AD pass from the null CONDITIONING, batched to `latent`: the text tokens and,
    where the conditioning has one, its attention mask as the additive float mask the network makes of it.
    Nothing else: Edit reference latents on it are not the AD reference and stay out of the AD passes."""
    mismatch = qwen_conditioning_mismatch(base_model, conditioning)
    if mismatch is not None:
        raise ValueError(mismatch)
    context, options = conditioning[0][0], conditioning[0][1]
    batch = latent.shape[0]
    cond = {"context": context[:1].detach().clone().to(device).expand(batch, -1, -1)}
    mask = options.get("attention_mask")
    if mask is not None:
        mask = mask[:1].detach().clone().to(device)
        if not torch.is_floating_point(mask):  # as the network converts it (comfy/ldm/qwen_image/model.py)
            mask = (mask - 1).to(torch.float32) * torch.finfo(torch.float32).max
        cond["attention_mask"] = mask.expand(batch, -1)
    return cond


def as_model_latent(latent: torch.Tensor) -> torch.Tensor:
    """A latent in the network's (B, 16, 1, H, W) form; a 4-D (B, 16, H, W) one gets its frame axis."""
    if latent.ndim == 4:
        return latent.unsqueeze(2)
    if latent.ndim != 5 or latent.shape[2] != 1:
        raise ValueError(f"a Qwen-Image latent is (B, 16, 1, H, W), got shape {tuple(latent.shape)}")
    return latent


ADAIN_DIMS = (2, 3, 5)  # the token dims of `packed_view`


def packed_view(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, 1, H, W) as (B, 16, 1, H/2, 2, W/2, 2): a token is a 2×2 patch, so a packed channel (latent
    channel, patch row, patch column) is dims 1, 4, 6 and its tokens dims 2, 3, 5 (64 statistics)."""
    latent = as_model_latent(latent)
    batch, channels, frames, height, width = latent.shape
    check_latent_size(height, width)
    return latent.reshape(batch, channels, frames, height // PATCH, PATCH, width // PATCH, PATCH)
