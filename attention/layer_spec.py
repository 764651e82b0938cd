"""Layer specs ("paper default", "10-15", "3,5,7") as sorted AD indices; no model knowledge, so every
family module may use it (attention/layers.py applies it to a model's family)."""

from __future__ import annotations

import re

from .naming import shown_as_pack

PAPER_DEFAULT_LAYER_COUNT = 6
PAPER_DEFAULT_SPEC = "paper default"


@shown_as_pack
class LayerSpecError(ValueError):
    """A layer selection that does not fit the model."""


_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+)\s*)?$")


def is_paper_default(spec: str) -> bool:
    return (spec or "").strip().lower() in ("default", PAPER_DEFAULT_SPEC, "paper")


def parse_layer_spec(spec: str, layer_count: int) -> tuple[int, ...]:
    """Turn "paper default" (the last 6 layers), "10-15", "3,5,7" or "64..69" into sorted AD indices.

    Ranges are inclusive. Raises `LayerSpecError` naming the valid range of this model.
    """
    valid = f"this model has {layer_count} self-attention layers, valid indices 0-{layer_count - 1}"
    if layer_count <= 0:
        raise LayerSpecError("the model has no self-attention layers")
    text = (spec or "").strip().lower()
    if not text:
        raise LayerSpecError(f"the layer selection is empty; use '{PAPER_DEFAULT_SPEC}' or indices ({valid})")
    if is_paper_default(text):
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
