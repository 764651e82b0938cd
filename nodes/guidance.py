"""AD Loss Guidance: AD-guided sampling in any ComfyUI sampler, as a MODEL patch."""

from __future__ import annotations

import functools
import logging

import torch

from ..attention.layers import select_layers
from ..attention.reference import ADReference
from ..attention.families import family_of
from ..guidance.guided import ADGuidanceHook, GuidanceIteration, GuidanceSettings
from ..guidance.losses import labels_from_mask
from .common import (
    AD_REFERENCE,
    CATEGORY,
    CHECKPOINTING_CHOICES,
    CHECKPOINTING_INPUT,
    MAX_SEED,
    check_interrupt,
    use_checkpointing,
)
from .errors import reported_as, require
from .windows import AD_WINDOWS, window_settings
from .inputs import check_reference_fits, finite_number, latent_samples, mask_batch, whole_number
from .progress import executing_node_id, send_progress_text

NODE = "AD Loss Guidance"
MAX_ITERATIONS = 50
log = logging.getLogger(__name__)


class GuidanceProgress:
    """Cancel between iterations, and each guided step's AD loss (its last iteration's) as text on the
    running node, the sampler; the sampler's own bar and preview show the rest."""

    def __init__(self, iterations: int, content: bool) -> None:
        self.iterations = iterations
        self.content = content

    def text(self, report: GuidanceIteration) -> str:
        lines = [f"AD guidance, step {report.step + 1}", f"AD loss {report.ad:.4g}"]
        if self.content:
            lines.append(f"content loss {report.content:.4g}")
        return "\n".join(lines)

    def __call__(self, report: GuidanceIteration) -> None:
        check_interrupt()
        if report.iteration == self.iterations - 1 or report.skipped:
            send_progress_text(self.text(report), executing_node_id())


class ADLossGuidance:
    DESCRIPTION = (
        "Attention Distillation guided sampling (the paper's improved classifier guidance): after every "
        "sampling step the next latent is optimized a few Adam iterations so that its self-attention matches "
        "the reference's. Put it between the model (after LoRA) and any sampler: KSampler, KSamplerAdvanced, "
        "SamplerCustom(Advanced); any sampler and scheduler, img2img, inpainting. Stack two of them for two "
        "references; PAG/SAG and other model patches still apply. The AD passes use the reference's empty "
        "prompt and no ControlNet, like the reference code's classifier; ControlNet on the conditioning still "
        "steers the image through the normal sampling pass. Text-to-image: lr 0.015, 2-3 iterations, AdaIN on, "
        "cfg 7.5. Texture synthesis: lr 0.05, 3 iterations, AdaIN off, cfg 1. ddim + ddim_uniform reproduces "
        "the reference code's steps. Flux (ComfyUI v0.3.64+): the reference code's FLUX.1-dev settings are lr 0.01, "
        "2 iterations, AdaIN on, euler + simple, 50 steps, ModelSamplingFlux and FluxGuidance 3.5 on the prompt; "
        "the AD passes always use guidance 1.0 and include the text tokens."
    )
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model; the input model is unchanged. Connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The model to sample with, after LoRA if you use one (the guidance sees the LoRA)."},
                ),
                "reference": (
                    AD_REFERENCE,
                    {"tooltip": "From Capture Reference Attention, captured with this model's checkpoint."},
                ),
                "lr": (
                    "FLOAT",
                    {
                        "default": 0.015,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Adam learning rate on the latent per step. Text-to-image: 0.015 (Flux: 0.01). Texture synthesis: 0.05.",
                    },
                ),
                "iterations": (
                    "INT",
                    {
                        "default": 2,
                        "min": 0,
                        "max": MAX_ITERATIONS,
                        "tooltip": "Adam iterations per sampling step; each costs a forward and backward through the "
                        "UNet up to the last selected layer. Text-to-image: 2-3. Texture synthesis: 3. 0 turns guidance off.",
                    },
                ),
                "adain": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Match the latent's per-channel mean/std to the noised reference before optimizing. "
                        "On for text-to-image; off for texture synthesis (which also wants cfg 1 on the sampler).",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Fraction of the schedule where guidance starts (0 = from the first step).",
                    },
                ),
                "end_percent": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Fraction of the schedule where guidance ends (1 = through the last step).",
                    },
                ),
                "noise_seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "tooltip": "Seed of the noise added to the reference (and content) at each step. Keep it fixed "
                        "to reuse the cached reference features across runs; the image seed is the sampler's.",
                    },
                ),
            },
            "optional": {
                "content": (
                    "LATENT",
                    {
                        "tooltip": "Optional content latent (VAE Encode, same size as the sampled latent): adds the "
                        "content (query) loss, weighted by content_weight."
                    },
                ),
                "content_weight": (
                    "FLOAT",
                    {
                        "default": 0.25,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Weight of the content loss when a content latent is connected (reference: 0.25).",
                    },
                ),
                "target_mask": (
                    "MASK",
                    {
                        "tooltip": "Region labels of the image being sampled (grey levels matching the reference mask "
                        "of Capture Reference Attention) for controlled synthesis."
                    },
                ),
                "gradient_checkpointing": CHECKPOINTING_INPUT,
                "windows": (AD_WINDOWS, {"tooltip": "From AD Texture Windows: guide a latent larger than the window in "
                                         "overlapping windows (the reference code's panorama mode), with the memory "
                                         "of one window."}),
            },
        }

    def patch(
        self,
        model,
        reference,
        lr,
        iterations,
        adain,
        start_percent,
        end_percent,
        noise_seed,
        content=None,
        content_weight=0.25,
        target_mask=None,
        gradient_checkpointing="auto",
        windows=None,
    ):
        with reported_as(NODE):
            require(isinstance(reference, ADReference), NODE, "'reference' must come from Capture Reference Attention")
            base = model.model
            family = family_of(base)
            check_reference_fits(NODE, reference, base, family)
            select_layers(base.diffusion_model, reference.layer_spec)
            channels = family.latent_channels(base)
            lr = finite_number(NODE, lr, "lr", minimum=0.0)
            iterations = whole_number(NODE, iterations, "iterations", 0, MAX_ITERATIONS)
            require(isinstance(adain, bool), NODE, f"'adain' must be true or false, got {adain!r}")
            start = finite_number(NODE, start_percent, "start_percent", minimum=0.0)
            end = finite_number(NODE, end_percent, "end_percent", minimum=0.0)
            require(start <= 1.0 and end <= 1.0, NODE, "start_percent and end_percent are fractions between 0 and 1")
            require(
                start <= end, NODE, f"start_percent ({start}) is after end_percent ({end}); guidance would never run"
            )
            seed = whole_number(NODE, noise_seed, "noise_seed", 0, MAX_SEED)
            content_weight = finite_number(NODE, content_weight, "content_weight", minimum=0.0)
            content_samples = None
            if content is not None:
                content_samples = latent_samples(NODE, content, "content", channels, family.latent_ndim).detach().clone()
            require(
                gradient_checkpointing in CHECKPOINTING_CHOICES,
                NODE,
                f"'gradient_checkpointing' must be one of {CHECKPOINTING_CHOICES}",
            )
            labels = None
            if target_mask is not None:
                require(isinstance(target_mask, torch.Tensor), NODE, "'target_mask' must be a MASK")
                require(
                    reference.labels is not None,
                    NODE,
                    "a target mask needs region labels on the reference too: "
                    "connect reference_mask on Capture Reference Attention",
                )
                labels = labels_from_mask(
                    mask_batch(NODE, target_mask, "target_mask", target_mask.shape[0] if target_mask.ndim == 3 else 1)
                )

            window_choice = window_settings(NODE, windows, family)
            patched = model.clone()
            if iterations == 0 or (lr == 0 and not adain):
                log.warning("%s: iterations or lr is 0 (and AdaIN off), so the model is returned unguided", NODE)
                return (patched,)
            hook = ADGuidanceHook(
                reference,
                GuidanceSettings(lr=lr, iterations=iterations, adain=adain, content_weight=content_weight),
                seed,
                start_percent=start,
                end_percent=end,
                content=content_samples,
                target_labels=labels,
                fallback_patcher=patched,
                on_iteration=GuidanceProgress(iterations, content_samples is not None and content_weight != 0),
                checkpointing=functools.partial(use_checkpointing, gradient_checkpointing),
                windows=window_choice,
            )
            patched.set_model_sampler_post_cfg_function(hook)
            return (patched,)
