"""One entry point for "an AD pass on this MODEL" (docs/DESIGN.md §3), used by Latent AD Optimize and by
AD Loss Guidance's sampler hook alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..attention.reference import ADReference
from ..attention.session import ADModelSession
from .autograd import autograd_through


@contextlib.contextmanager
def ad_pass(
    patcher: Any, reference: ADReference, *, device: torch.device | None = None, gradient_checkpointing: bool = False
) -> Iterator[ADModelSession]:
    """The model's family session for `reference` (layers, null conditioning, feature cache), inside
    autograd through the model's inference-mode weights; everything is restored on exit."""
    session = ADModelSession(patcher, reference, device=device, gradient_checkpointing=gradient_checkpointing)
    with autograd_through(session.base_model.diffusion_model):
        yield session
