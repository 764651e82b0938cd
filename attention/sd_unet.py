"""Anatomy of ComfyUI's SD-family `UNetModel` (SD1.x, SD2.x, SDXL): its block walk, its self-attention
layers and their token grids, as attention/sd_family.py presents them to the rest of the pack."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .family import UnsupportedModelError


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One attn1 layer, in the execution order the AD reference code counts."""

    ad_index: int
    block: tuple[str, int]
    block_index: int
    transformer_index: int
    heads: int
    dim_head: int

    @property
    def patch_key(self) -> tuple[str, int, int]:
        """The key ComfyUI looks up in `patches_replace["attn1"]`."""
        return (self.block[0], self.block[1], self.block_index)


def is_unet(diffusion_model: torch.nn.Module) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return type(diffusion_model) is UNetModel


def unet_segments(diffusion_model: torch.nn.Module) -> list[tuple[str, int, torch.nn.Module]]:
    """(block name, block id, block) in ComfyUI's forward order: input blocks, middle, output blocks."""
    segments = [("input", i, m) for i, m in enumerate(diffusion_model.input_blocks)]
    if getattr(diffusion_model, "middle_block", None) is not None:
        segments.append(("middle", 0, diffusion_model.middle_block))
    return segments + [("output", i, m) for i, m in enumerate(diffusion_model.output_blocks)]


def _is_spatial_transformer(module: torch.nn.Module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")


def count_transformers(block: torch.nn.Module) -> int:
    """Transformers in one block: how far ComfyUI's forward advances `transformer_index` over it."""
    return sum(1 for m in block if hasattr(m, "transformer_blocks"))


def list_unet_layers(diffusion_model: torch.nn.Module) -> list[SelfAttentionLayer]:
    """All attn1 layers of a `UNetModel` in execution order (input, middle, output).

    The order equals the reference code's run-time counter, so the position is the AD index.
    """
    layers: list[SelfAttentionLayer] = []
    transformer_index = 0
    for name, block_id, block in unet_segments(diffusion_model):
        for module in block:
            if not _is_spatial_transformer(module):
                continue
            for block_index, tb in enumerate(module.transformer_blocks):
                layers.append(
                    SelfAttentionLayer(
                        ad_index=len(layers),
                        block=(name, block_id),
                        block_index=block_index,
                        transformer_index=transformer_index,
                        heads=int(tb.attn1.heads),
                        dim_head=int(tb.attn1.dim_head),
                    )
                )
            transformer_index += 1
    return layers


def token_grid(original_shape: list[int] | tuple[int, ...], tokens: int) -> tuple[int, int]:
    """(h, w) of a layer with `tokens` tokens: each downsample halves with ceil, so search k."""
    height, width = int(original_shape[-2]), int(original_shape[-1])
    for k in range(16):
        h, w = math.ceil(height / 2**k), math.ceil(width / 2**k)
        if h * w == tokens:
            return h, w
        if h * w < tokens:
            break
    raise ValueError(f"cannot place {tokens} tokens on a {height}x{width} latent")


def check_unet_variant(base_model: Any) -> None:
    """Raise `UnsupportedModelError` for UNets whose input is not the plain latent (inpainting, pix2pix)."""
    channels = int(getattr(base_model.latent_format, "latent_channels", 4))
    diffusion_model = base_model.diffusion_model
    if int(diffusion_model.in_channels) != channels:
        raise UnsupportedModelError(
            f"the UNet takes {diffusion_model.in_channels} input channels but its latents have {channels} "
            "(inpainting or instruct-pix2pix model); use the base checkpoint"
        )


def has_class_conditioning(diffusion_model: torch.nn.Module) -> bool:
    """SDXL-class UNets take a pooled/size vector `y` besides the text context."""
    return getattr(diffusion_model, "num_classes", None) is not None


def cross_attention_width(diffusion_model: torch.nn.Module) -> int | None:
    """Context width the UNet's cross-attention takes (768 SD1.5, 2048 SDXL), if it has any."""
    for module in diffusion_model.modules():
        to_k = getattr(getattr(module, "attn2", None), "to_k", None)
        if to_k is not None:
            return int(to_k.weight.shape[1])
    return None


def _probe_inplace_guard(block: torch.nn.Module, context_dim: int | None, dim: int) -> bool:
    """True when a backward through `block` breaks on an in-place residual add."""
    device = next(block.parameters()).device
    dtype = next(block.parameters()).dtype
    leaf = torch.randn(1, 2, dim, device=device, dtype=dtype, requires_grad=True)
    x = leaf * 1  # a non-leaf, like every activation inside the UNet
    context = torch.randn(1, 1, context_dim or dim, device=device, dtype=dtype)
    try:
        out = block(x, context=context, transformer_options={})
        out.float().sum().backward()
    except RuntimeError as error:
        if "inplace" in str(error):
            return True
        raise
    return False


_INPLACE_GUARD_NEEDED: dict[type, bool] = {}


def transformer_blocks_add_in_place(diffusion_model: torch.nn.Module) -> bool:
    """Probe one transformer block of this host once (per block class): older ComfyUI adds its
    residuals in place (`x += n`), which a backward cannot get through without a guard."""
    for module in diffusion_model.modules():
        blocks = getattr(module, "transformer_blocks", None)
        if not blocks:
            continue
        block = blocks[0]
        cls = type(block)
        if cls not in _INPLACE_GUARD_NEEDED:
            attn2 = getattr(block, "attn2", None)
            to_k = getattr(attn2, "to_k", None)
            context_dim = int(to_k.weight.shape[1]) if to_k is not None else None
            dim = int(block.attn1.to_q.weight.shape[1])
            _INPLACE_GUARD_NEEDED[cls] = _probe_inplace_guard(block, context_dim, dim)
        return _INPLACE_GUARD_NEEDED[cls]
    return False
