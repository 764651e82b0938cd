"""Shared node constants and model loading."""

from __future__ import annotations

from typing import Any

CATEGORY = "Attention Distillation"
AD_REFERENCE = "AD_REFERENCE"


def load_for_ad(patcher: Any, latent_shape: tuple[int, ...]) -> None:
    """Load the model (and its LoRA patches) the way samplers do, leaving room for backward."""
    import comfy.model_management

    base = patcher.model
    try:
        required = int(base.memory_required(list(latent_shape))) * 3
    except Exception:  # older hosts or odd models: let ComfyUI decide
        required = 0
    comfy.model_management.load_models_gpu([patcher], memory_required=required)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
