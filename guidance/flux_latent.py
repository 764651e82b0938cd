"""Flux latent math for AD (plain torch): flow-matching noising and AdaIN on packed channels.

Flux sees a (B, 16, H, W) latent as tokens of 2×2 patches with 64 channels (16 latent
channels × 4 patch positions). The reference code's AdaIN works on that packed latent: one
mean and unbiased std per sample and packed channel over the tokens, target statistics over
the reference batch and its tokens, eps 1e-6.
"""

from __future__ import annotations

import torch

PATCH = 2


def flow_noised(latent: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow matching's x_σ = σ·ε + (1 − σ)·x0 (ComfyUI's CONST noise scaling)."""
    return sigma * noise + (1.0 - sigma) * latent


def _packed_view(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H/2, 2, W/2, 2): dims 1, 3, 5 index the packed channel."""
    batch, channels, height, width = latent.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"a Flux latent needs even height and width, got {height}x{width}")
    return latent.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)


def packed_adain(latent: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Match each sample's per-packed-channel mean/std to the reference's (over its batch and
    tokens). `reference` may have another size than `latent`."""
    source = _packed_view(latent)
    target = _packed_view(reference.to(latent.dtype))
    mean = source.mean(dim=(2, 4), keepdim=True)
    std = source.std(dim=(2, 4), keepdim=True)
    target_mean = target.mean(dim=(0, 2, 4), keepdim=True)
    target_std = target.std(dim=(0, 2, 4), keepdim=True)
    return ((source - mean) / (std + eps) * target_std + target_mean).reshape(latent.shape)
