"""ComfyUI's training switch, scoped to the pack's AD passes (docs/DESIGN.md §2.8).

ComfyUI v0.33 sends RoPE, fused RMSNorm+RoPE and INT8 activation folding to comfy-kitchen kernels that
have no autograd formula unless `comfy.model_management.in_training` is set; its own trainer
(`comfy_extras/nodes_train.py`) sets the flag around its backward and restores it. The differentiable
path computes the same numbers. The flag is process-wide, so it is set only while an AD pass runs and
restored to what it was whatever happens (Cancel, out of memory, errors): the sampler's own passes
keep the fast kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def training_kernels() -> Iterator[bool]:
    """Set ComfyUI's `in_training` for the block; yields whether this host has the switch at all."""
    try:
        import comfy.model_management as model_management
    except ImportError:  # plain-torch use of guidance/ without ComfyUI
        yield False
        return
    if not hasattr(model_management, "in_training"):  # hosts before the switch (v0.3.64, the 2024 core)
        yield False
        return
    before = model_management.in_training
    model_management.in_training = True
    try:
        yield True
    finally:
        model_management.in_training = before
