"""Latent AD Optimize: style/appearance transfer and texture synthesis by optimization."""

from __future__ import annotations

import logging
import math

import torch

from ..attention.families import family_of
from ..attention.reference import ADReference
from ..guidance.losses import labels_from_mask
from ..guidance.optimize import IterationReport, OptimizeSettings, optimize_on_model
from ..guidance.windows import plan_windows, wrap_axes
from .common import (
    AD_REFERENCE,
    CATEGORY,
    CHECKPOINTING_CHOICES,
    CHECKPOINTING_INPUT,
    MAX_SEED,
    check_interrupt,
    load_for_ad,
    use_checkpointing,
)
from .errors import reported_as, require
from .inputs import check_reference_fits, finite_number, latent_samples, mask_batch, whole_number
from .loss_plot import Series, loss_curve_image
from .progress import NodeProgress
from .windows import AD_WINDOWS, window_settings

NODE = "Latent AD Optimize"
log = logging.getLogger(__name__)


def is_empty_latent(samples: torch.Tensor) -> bool:
    """EmptyLatentImage gives zeros: that asks for texture synthesis from seeded noise."""
    return not bool(samples.abs().sum() > 0)


def seeded_noise(samples: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise the way ComfyUI's samplers draw it for this latent and seed."""
    import comfy.sample

    return comfy.sample.prepare_noise(samples, seed)


class LatentADOptimize:
    DESCRIPTION = (
        "Optimizes a latent so its self-attention matches the reference (Attention Distillation, "
        "the reference code's optimize mode). Connect a content latent for style or appearance "
        "transfer, or an Empty Latent Image for texture synthesis from seeded noise (any size). "
        "Decode the result with VAE Decode."
    )
    CATEGORY = CATEGORY
    FUNCTION = "optimize"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("LATENT", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The optimized latent, in ComfyUI's LATENT space (ready for VAE Decode).",
        "Plot of the AD loss (and the content loss, right axis) at every step: wire it to Preview Image. "
        "Healthy: the AD loss falls fast in the first steps, then levels off.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The same model the reference was captured with (LoRA-patched models work)."}),
                "reference": (AD_REFERENCE, {"tooltip": "From Capture Reference Attention."}),
                "latent": (
                    "LATENT",
                    {"tooltip": "Start point: the content latent (VAE Encode of the photo) for transfer, "
                     "or Empty Latent Image for texture synthesis from noise."},
                ),
                "steps": ("INT", {"default": 200, "min": 1, "max": 1000,
                                  "tooltip": "Timesteps of the descending schedule (SD: the reference code's DDIM steps, 200 transfer, "
                                  "300 texture; Flux: the model's own simple sigmas)."}),
                "lr": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.005,
                                 "tooltip": "Adam learning rate on the latent (reference: 0.05). 0 returns the start latent."}),
                "iterations": ("INT", {"default": 1, "min": 0, "max": 20,
                                       "tooltip": "Adam steps per timestep (reference: 1). 0 returns the start latent."}),
                "content_weight": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "Weight of the content (query) loss. Lower it if the content leaks; 0 for textures."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the start noise when the latent is empty (texture synthesis)."}),
            },
            "optional": {
                "content": ("LATENT", {"tooltip": "Content target of the content loss. Default: the start latent when it is not empty."}),
                "target_mask": ("MASK", {"tooltip": "Region labels of the result (same grey levels as the reference mask) for controlled synthesis."}),
                "gradient_checkpointing": CHECKPOINTING_INPUT,
                "windows": (AD_WINDOWS, {"tooltip": "From AD Texture Windows: optimize a latent larger than the window "
                                         "in overlapping windows, with the memory of one window."}),
            },
        }

    def optimize(self, model, reference, latent, steps, lr, iterations, content_weight, seed, content=None,
                 target_mask=None, gradient_checkpointing="auto", windows=None):
        with reported_as(NODE):
            require(isinstance(reference, ADReference), NODE, "'reference' must come from Capture Reference Attention")
            base = model.model
            family = family_of(base)
            check_reference_fits(NODE, reference, base, family)
            channels = family.latent_channels(base)
            samples = latent_samples(NODE, latent, "latent", channels, family.latent_ndim)
            steps = whole_number(NODE, steps, "steps", 1, 1000)
            iterations = whole_number(NODE, iterations, "iterations", 0, 1000)
            lr = finite_number(NODE, lr, "lr", minimum=0.0)
            content_weight = finite_number(NODE, content_weight, "content_weight", minimum=0.0)
            seed = whole_number(NODE, seed, "seed", 0, MAX_SEED)
            content_samples = latent_samples(NODE, content, "content", channels, family.latent_ndim) if content is not None else None
            labels = None
            if target_mask is not None:
                require(reference.labels is not None, NODE,
                        "a target mask needs region labels on the reference too: connect reference_mask on Capture Reference Attention")
                labels = labels_from_mask(mask_batch(NODE, target_mask, "target_mask", samples.shape[0]))

            window_choice = window_settings(NODE, windows, family)
            if lr == 0 or iterations == 0:
                log.warning("%s: lr or iterations is 0, so the node does nothing and returns its latent unchanged", NODE)
                return (latent, loss_curve_image([], "step", NODE, note="nothing optimized: lr or iterations is 0"))
            empty = is_empty_latent(samples)
            start = seeded_noise(samples, seed) if empty else None
            if content_samples is None and not empty:
                content_samples = samples

            plan = None
            pass_shape = tuple(samples.shape)
            if window_choice is not None:
                wrap_x, wrap_y = wrap_axes(model)
                plan = plan_windows(samples.shape[-2], samples.shape[-1], window_choice, wrap_y=wrap_y, wrap_x=wrap_x)
                pass_shape = (*samples.shape[:-2], plan[0].height, plan[0].width)
            load_for_ad(model, pass_shape)
            require(gradient_checkpointing in CHECKPOINTING_CHOICES, NODE,
                    f"'gradient_checkpointing' must be one of {CHECKPOINTING_CHOICES}")
            checkpointing = use_checkpointing(gradient_checkpointing, model, pass_shape)
            use_content = content_samples is not None and content_weight != 0
            history = StepLosses(steps, use_content)
            with NodeProgress(NODE, steps, patcher=model) as progress:

                def on_iteration(report: IterationReport) -> None:
                    check_interrupt()
                    if report.iteration == iterations - 1:  # a step's losses are its last iteration's
                        history.record(report)
                        progress.update(report.step + 1, history.text(report.step), latent=report.latent,
                                        **history.latest(report.step))

                settings = OptimizeSettings(steps=steps, lr=lr, iterations=iterations, content_weight=content_weight)
                out = optimize_on_model(model, reference, samples, settings, start=start, content=content_samples,
                                        target_labels=labels, windows=plan, gradient_checkpointing=checkpointing,
                                        on_iteration=on_iteration, before_window=check_interrupt)
            history.log_summary()
            output = {k: v for k, v in latent.items() if k != "noise_mask"}
            output["samples"] = out
            return (output, loss_curve_image(history.series(), "step", NODE))


class StepLosses:
    """AD and content loss at each step of a run (its last iteration's), for the text on the node,
    the log line and the loss curve."""

    def __init__(self, steps: int, content: bool) -> None:
        self.steps = steps
        self.content = content
        self.ad = [math.nan] * steps
        self.content_loss = [math.nan] * steps

    def record(self, report: IterationReport) -> None:
        self.ad[report.step] = math.nan if report.skipped else report.ad
        self.content_loss[report.step] = math.nan if report.skipped else report.content

    def latest(self, step: int) -> dict[str, float]:
        values = {"ad": self.ad[step]}
        if self.content:
            values["content"] = self.content_loss[step]
        return values

    def text(self, step: int) -> str:
        lines = [f"step {step + 1}/{self.steps}", f"AD loss {self.ad[step]:.4g}"]
        if self.content:
            lines.append(f"content loss {self.content_loss[step]:.4g}")
        return "\n".join(lines)

    def series(self) -> list[Series]:
        return [Series("AD loss", self.ad)] + ([Series("content loss", self.content_loss)] if self.content else [])

    def log_summary(self) -> None:
        done = [v for v in self.ad if not math.isnan(v)]
        if done:
            log.info("%s: AD loss %.4g at the first step, %.4g at the last (%d steps)", NODE, done[0], done[-1],
                     self.steps)
