"""Capture Reference Attention: binds reference latent(s), layers and null conditioning."""

from __future__ import annotations

import logging

from ..attention.layers import PAPER_DEFAULT_SPEC, select_layers
from ..attention.reference import ADReference
from ..attention.families import family_of
from ..guidance.losses import labels_from_mask
from .common import AD_REFERENCE, CATEGORY
from .errors import reported_as, require
from .inputs import finite_number, latent_samples, mask_batch

NODE = "Capture Reference Attention"
log = logging.getLogger(__name__)


class CaptureReferenceAttention:
    DESCRIPTION = (
        "Binds a style, texture or appearance reference to a model for Attention Distillation: "
        "the reference latent(s), the self-attention layers to distill and the empty-prompt "
        "conditioning. The reference's keys/values are computed per noise level when first needed "
        "and cached, so re-running a graph with another seed does not compute them again."
    )
    CATEGORY = CATEGORY
    FUNCTION = "capture"
    RETURN_TYPES = (AD_REFERENCE,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("The reference bound to this model's layers, for Latent AD Optimize or AD Loss Guidance.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x, SDXL, Flux (FLUX.1-dev/-schnell, ComfyUI v0.3.64+) or Flux.2 (dev/Klein, ComfyUI v0.33+) "
                                       "model, after LoRA if you use one."}),
                "reference": (
                    "LATENT",
                    {"tooltip": "The reference image encoded with VAE Encode. A batch means several references whose keys/values are pooled."},
                ),
                "null_conditioning": (
                    "CONDITIONING",
                    {"tooltip": "CLIPTextEncode with EMPTY text: the reference code reads attention under the empty prompt, never the user prompt. "
                     "Flux: its text tokens are part of the features; T5TokenizerOptions min_length 512 before the encode matches "
                     "the reference code's padding. Flux.2: padded with zeros to 512 tokens, as the sampler pads it. "
                     "Its guidance value is ignored (AD passes use 1.0 where the model embeds guidance)."},
                ),
                "layers": (
                    "STRING",
                    {
                        "default": PAPER_DEFAULT_SPEC,
                        "tooltip": "Self-attention layers to distill, counted in execution order. 'paper default' = the last 6 "
                        "(SD1.5: 10-15, SDXL: 64-69); on Flux the last 7 (FLUX.1: 50-56 = single blocks 31-37, double "
                        "blocks being 0-18 and single blocks 19-56); on Flux.2 the last ceil(7N/57) of its N blocks (dev: 49-55, "
                        "Klein 4B: 21-24, 9B: 28-31). Or indices and ranges like '10-15' or '3,5,7'.",
                    },
                ),
            },
            "optional": {
                "reference_mask": (
                    "MASK",
                    {"tooltip": "Region labels of the reference for controlled synthesis: each grey level is a region; "
                     "target regions of the same level attend only to it. Use with a target mask."},
                ),
                "attn_scale": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                     "tooltip": "Scale of the queries in the AD target (reference code: 1.0)."},
                ),
            },
        }

    def capture(self, model, reference, null_conditioning, layers, reference_mask=None, attn_scale=1.0):
        with reported_as(NODE):
            base = model.model
            family = family_of(base)
            samples = latent_samples(NODE, reference, "reference", family.latent_channels(base), family.latent_ndim)
            select_layers(base.diffusion_model, layers)
            require(isinstance(null_conditioning, list) and len(null_conditioning) > 0, NODE,
                    "'null_conditioning' is empty; connect CLIPTextEncode with empty text")
            try:
                mismatch = family.conditioning_mismatch(base, null_conditioning)
                if mismatch is None:
                    family.conditioning(base, null_conditioning, samples[:1].float(), samples.device)
            except (KeyError, TypeError, AttributeError, ValueError) as error:
                require(False, NODE, f"'null_conditioning' does not fit this model ({error}); encode it with this checkpoint's CLIP")
            require(mismatch is None, NODE, f"'null_conditioning' does not fit this model: {mismatch}")
            note = family.conditioning_note(null_conditioning)
            if note:
                log.warning("%s: %s", NODE, note)
            scale = finite_number(NODE, attn_scale, "attn_scale", minimum=0.0)
            labels = None
            if reference_mask is not None:
                labels = labels_from_mask(mask_batch(NODE, reference_mask, "reference_mask", samples.shape[0]))
                labels = labels.expand(samples.shape[0], -1, -1).clone()
            return (
                ADReference(
                    latents=samples.detach().clone(),
                    layer_spec=layers,
                    conditioning=null_conditioning,
                    labels=labels,
                    attn_scale=scale,
                    family=family.name,
                ),
            )
