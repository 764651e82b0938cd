"""Shared node constants and model loading."""

from __future__ import annotations

from typing import Any

from ..attention.families import family_of

CATEGORY = "Attention Distillation"
AD_REFERENCE = "AD_REFERENCE"
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # the largest seed ComfyUI's own seed inputs take


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


CHECKPOINTING_CHOICES = ["auto", "on", "off"]
CHECKPOINTING_INPUT = (
    CHECKPOINTING_CHOICES,
    {
        "default": "auto",
        "tooltip": "Gradient checkpointing of the differentiated UNet pass: less memory, about one more forward "
        "per iteration. auto = on for SDXL-class models at 1024x1024 and above and always on Flux.",
    },
)


def use_checkpointing(choice: str, patcher: Any, latent_shape: tuple[int, ...]) -> bool:
    """Resolve the gradient checkpointing choice for this model and latent size ('auto': the family's)."""
    if choice == "on":
        return True
    if choice == "off":
        return False
    return family_of(patcher.model).auto_checkpointing(patcher.model, latent_shape)
