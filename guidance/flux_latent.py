"""AdaIN on Flux's packed channels (plain torch).

Flux sees a (B, 16, H, W) latent as tokens of 2×2 patches with 64 channels (16 latent
channels × 4 patch positions). The reference code's AdaIN works on that packed latent: one
mean and unbiased std per sample and packed channel over the tokens, target statistics over
the reference batch and its tokens, eps 1e-6.
"""

from __future__ import annotations

import torch

from ..attention.flux_family import ADAIN_DIMS, packed_view


def packed_adain(latent: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Match each sample's per-packed-channel mean/std to the reference's (over its batch and
    tokens). `reference` may have another size than `latent`."""
    source = packed_view(latent)
    target = packed_view(reference.to(latent.dtype))
    mean = source.mean(dim=ADAIN_DIMS, keepdim=True)
    std = source.std(dim=ADAIN_DIMS, keepdim=True)
    target_mean = target.mean(dim=(0, *ADAIN_DIMS), keepdim=True)
    target_std = target.std(dim=(0, *ADAIN_DIMS), keepdim=True)
    return ((source - mean) / (std + eps) * target_std + target_mean).reshape(latent.shape)
