"""Self-attention layer addressing: walk an SD-family UNet, map AD indices to ComfyUI keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .naming import shown_as_pack

PAPER_DEFAULT_LAYER_COUNT = 6
PAPER_DEFAULT_SPEC = "paper default"


@shown_as_pack
class LayerSpecError(ValueError):
    """A layer selection that does not fit the model."""


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


def _is_spatial_transformer(module: torch.nn.Module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")


def list_self_attention_layers(diffusion_model: torch.nn.Module) -> list[SelfAttentionLayer]:
    """All attn1 layers of a ComfyUI `UNetModel` in execution order (input, middle, output).

    The order equals the reference code's run-time counter, so the position is the AD index.
    """
    groups: list[tuple[str, int, torch.nn.Module]] = [
        ("input", i, m) for i, m in enumerate(diffusion_model.input_blocks)
    ]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", 0, diffusion_model.middle_block))
    groups += [("output", i, m) for i, m in enumerate(diffusion_model.output_blocks)]

    layers: list[SelfAttentionLayer] = []
    transformer_index = 0
    for name, block_id, block in groups:
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


_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+)\s*)?$")


def parse_layer_spec(spec: str, layer_count: int) -> tuple[int, ...]:
    """Turn "paper default", "10-15", "3,5,7" or "64..69" into sorted AD indices.

    Ranges are inclusive. Raises `LayerSpecError` naming the valid range of this model.
    """
    valid = f"this model has {layer_count} self-attention layers, valid indices 0-{layer_count - 1}"
    if layer_count <= 0:
        raise LayerSpecError("the model has no self-attention layers")
    text = (spec or "").strip().lower()
    if not text:
        raise LayerSpecError(f"the layer selection is empty; use '{PAPER_DEFAULT_SPEC}' or indices ({valid})")
    if text in ("default", PAPER_DEFAULT_SPEC, "paper"):
        first = max(0, layer_count - PAPER_DEFAULT_LAYER_COUNT)
        return tuple(range(first, layer_count))
    chosen: set[int] = set()
    for part in text.split(","):
        if not part.strip():
            continue
        match = _RANGE.match(part)
        if match is None:
            raise LayerSpecError(f"cannot read '{part.strip()}' in layer selection '{spec}'; write e.g. '10-15' or '3,5,7' ({valid})")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo > hi:
            raise LayerSpecError(f"range '{part.strip()}' runs backwards ({valid})")
        if lo < 0 or hi >= layer_count:
            raise LayerSpecError(f"layer selection '{spec}' is out of range: {valid}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise LayerSpecError(f"the layer selection '{spec}' names no layer ({valid})")
    return tuple(sorted(chosen))


def select_layers(diffusion_model: torch.nn.Module, spec: str) -> list[SelfAttentionLayer]:
    """The layers a spec names on this model, in execution order."""
    layers = list_self_attention_layers(diffusion_model)
    indices = parse_layer_spec(spec, len(layers))
    return [layers[i] for i in indices]
