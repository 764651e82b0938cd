"""Layer selection: AD indices from a layer spec (attention/layer_spec.py), on the attention layers the
model's family lists (attention/family.py; for SD the attn1 layers, attention/sd_unet.py)."""

from __future__ import annotations

import torch

from .families import family_for
from .family import AttentionLayer, ModelFamily, UnsupportedModelError
from .layer_spec import PAPER_DEFAULT_SPEC, LayerSpecError, is_paper_default, parse_layer_spec

__all__ = ["PAPER_DEFAULT_SPEC", "LayerSpecError", "is_paper_default", "parse_layer_spec", "list_self_attention_layers",
           "select_layers"]


def _family(diffusion_model: torch.nn.Module) -> ModelFamily:
    family = family_for(diffusion_model)
    if family is None:
        raise UnsupportedModelError(f"Attention Distillation cannot read the layers of {type(diffusion_model).__name__}")
    return family


def list_self_attention_layers(diffusion_model: torch.nn.Module) -> list[AttentionLayer]:
    """Every layer AD may distill on this model, in its family's counting order (the AD index)."""
    return _family(diffusion_model).attention_layers(diffusion_model)


def select_layers(diffusion_model: torch.nn.Module, spec: str) -> list[AttentionLayer]:
    """The layers a spec names on this model, in execution order."""
    family = _family(diffusion_model)
    layers = family.attention_layers(diffusion_model)
    try:
        indices = family.default_layers(layers) if layers and is_paper_default(spec) else parse_layer_spec(spec, len(layers))
    except LayerSpecError as error:
        detail = family.describe_layers(layers)
        if not detail:
            raise
        raise LayerSpecError(f"{error} ({detail})") from None
    return [layers[i] for i in indices]
