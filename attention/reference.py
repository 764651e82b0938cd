"""AD_REFERENCE: what Capture Reference Attention binds, plus its feature cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import FeatureCache


@dataclass
class ADReference:
    """Reference latent(s) (raw VAE space), layer selection, empty-prompt conditioning,
    optional region labels (R, H, W), the name of the model family it was captured on ("" when
    unknown) and the cache of their keys/values per noise level."""

    latents: torch.Tensor
    layer_spec: str
    conditioning: list
    labels: torch.Tensor | None = None
    attn_scale: float = 1.0
    family: str = ""
    cache: FeatureCache = field(default_factory=FeatureCache)
