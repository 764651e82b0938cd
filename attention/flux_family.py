"""The Flux family (FLUX.1-dev, FLUX.1-schnell and other `comfy.ldm.flux` models): its
attention layers, the conditioning and parametrization of an AD pass, and that pass.

Layers are counted as the reference code counts its attention calls: the double blocks
first (0..D-1), then the single blocks (D..D+S-1). Its "paper default" `(50, 57)` on
FLUX.1 (19 double, 38 single blocks) is the last 7 single blocks; on other depths the
default is the last 7 single blocks too (all of them where there are fewer).

An AD pass feeds the latent itself at the AD time (flow matching, ComfyUI's CONST
parametrization: the model input is x, the timestep is the model's own `timestep(σ)`, which
is σ on Flux), with the null text, the null pooled vector and guidance 1.0 whatever the null
conditioning carries (dev embeds guidance, schnell has no guidance input).

Null text. The reference code encodes "" padded to 512 T5 tokens; ComfyUI's Flux tokenizer
pads to 256. ComfyUI's T5 attends over the pad tokens without a mask, so every output
depends on the padded length: a 256-token encoding cannot be extended to the reference's
afterwards. The pass therefore uses the null conditioning exactly as given and reports its
token count; to match the reference, encode "" with `null_text_tokenizer_options()` (what
ComfyUI's own T5TokenizerOptions node sets, min_length 512).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .flux_blocks import BlockKey, FluxLayerRecord, FluxPassState, wrapped_options
from .layers import PAPER_DEFAULT_SPEC, LayerSpecError, parse_layer_spec
from .recorder import StopForward
from .unet_pass import UnsupportedModelError, unet_dtype

FLUX_PAPER_DEFAULT_COUNT = 7
REFERENCE_T5_TOKENS = 512
HOST_MESSAGE = (
    "Flux needs ComfyUI v0.3.64 or newer: this ComfyUI has no attention override in its Flux blocks, "
    "so Attention Distillation cannot read them; update ComfyUI"
)
DOUBLE_BLOCK = "double_block"
SINGLE_BLOCK = "single_block"


def host_supports_flux() -> bool:
    """True where ComfyUI's Flux attention passes `transformer_options` to an attention
    function that honours `optimized_attention_override` (v0.3.64)."""
    import comfy.ldm.modules.attention as attention

    try:
        import comfy.ldm.flux.math as flux_math
    except ImportError:
        return False
    takes_options = "transformer_options" in inspect.signature(flux_math.attention).parameters
    return takes_options and hasattr(attention, "wrap_attn")


def is_flux(diffusion_model: Any) -> bool:
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return False
    return isinstance(diffusion_model, Flux)


def check_flux_model(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless AD can run on this Flux MODEL in this ComfyUI."""
    if not host_supports_flux():
        raise UnsupportedModelError(HOST_MESSAGE)
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if not is_flux(diffusion_model):
        raise UnsupportedModelError(f"the MODEL is {type(base_model).__name__}, not a Flux model")
    import comfy.model_sampling

    if not isinstance(base_model.model_sampling, comfy.model_sampling.CONST):
        raise UnsupportedModelError("this Flux MODEL is not a flow-matching (CONST) model; Flux AD needs one")
    patch = int(diffusion_model.patch_size)
    in_channels = int(diffusion_model.img_in.weight.shape[1]) // (patch * patch)
    out_channels = int(diffusion_model.params.out_channels)
    if in_channels != out_channels:
        raise UnsupportedModelError(
            f"this Flux model takes {in_channels} latent channels but makes {out_channels} (Fill, Canny or Depth "
            "model, or a control LoRA); AD needs a text-to-image Flux model"
        )


@dataclass(frozen=True)
class FluxAttentionLayer:
    """One Flux block's joint attention, in the order the reference code counts it."""

    ad_index: int
    kind: str
    number: int
    heads: int
    dim_head: int

    @property
    def patch_key(self) -> BlockKey:
        """The key ComfyUI looks up in `patches_replace["dit"]`."""
        return (self.kind, self.number)


def list_flux_attention_layers(diffusion_model: torch.nn.Module) -> list[FluxAttentionLayer]:
    """Every attention layer of a ComfyUI Flux model: double blocks, then single blocks."""
    layers: list[FluxAttentionLayer] = []
    for kind, blocks in ((DOUBLE_BLOCK, diffusion_model.double_blocks), (SINGLE_BLOCK, diffusion_model.single_blocks)):
        for number, block in enumerate(blocks):
            heads = int(block.num_heads)
            hidden = int(getattr(block, "hidden_size", diffusion_model.hidden_size))
            layers.append(FluxAttentionLayer(len(layers), kind, number, heads, hidden // heads))
    return layers


def describe_layers(layers: list[FluxAttentionLayer]) -> str:
    """E.g. "57 attention layers: double blocks 0-18, single blocks 19-56"."""
    parts = []
    for kind, name in ((DOUBLE_BLOCK, "double blocks"), (SINGLE_BLOCK, "single blocks")):
        indices = [layer.ad_index for layer in layers if layer.kind == kind]
        if indices:
            parts.append(f"{name} {indices[0]}-{indices[-1]}")
    return f"{len(layers)} attention layers: " + ", ".join(parts)


def paper_default_indices(layers: list[FluxAttentionLayer]) -> tuple[int, ...]:
    """The last 7 single blocks (the reference's `(50, 57)` on FLUX.1); all single blocks
    where there are fewer; the last 7 layers of a model without single blocks."""
    single = [layer.ad_index for layer in layers if layer.kind == SINGLE_BLOCK]
    pool = single or [layer.ad_index for layer in layers]
    return tuple(pool[-FLUX_PAPER_DEFAULT_COUNT:])


def parse_flux_layer_spec(spec: str, layers: list[FluxAttentionLayer]) -> tuple[int, ...]:
    """"paper default", indices and ranges ("50-56", "19,31..37") as on SD; out-of-range
    selections name this model's valid range and its blocks."""
    if not layers:
        raise LayerSpecError("the Flux model has no attention blocks")
    if (spec or "").strip().lower() in ("default", PAPER_DEFAULT_SPEC, "paper"):
        return paper_default_indices(layers)
    try:
        return parse_layer_spec(spec, len(layers))
    except LayerSpecError as error:
        raise LayerSpecError(f"{error} (this Flux model has {describe_layers(layers)})") from None


def select_flux_layers(diffusion_model: torch.nn.Module, spec: str) -> list[FluxAttentionLayer]:
    layers = list_flux_attention_layers(diffusion_model)
    return [layers[i] for i in parse_flux_layer_spec(spec, layers)]


def null_text_tokenizer_options() -> dict[str, int]:
    """`clip.tokenize("", tokenizer_options=...)` options that pad T5 as the reference does."""
    return {"t5xxl_min_length": REFERENCE_T5_TOKENS}


@dataclass(frozen=True)
class FluxNullCondition:
    """The null conditioning of every AD pass: T5 tokens (1, T, C) and the pooled CLIP-L vector."""

    context: torch.Tensor
    pooled: torch.Tensor

    @property
    def text_tokens(self) -> int:
        return int(self.context.shape[1])


def flux_null_condition(conditioning: list, device: torch.device) -> FluxNullCondition:
    """The first entry of a CONDITIONING (CLIPTextEncode of "" with a Flux CLIP). Its
    `guidance` is ignored (AD passes use 1.0); a Flux Kontext reference latent on it is not
    the AD reference and stays out of the AD passes."""
    if not conditioning:
        raise ValueError("the null conditioning is empty; connect CLIPTextEncode with empty text and a Flux CLIP")
    context, options = conditioning[0][0], conditioning[0][1]
    pooled = options.get("pooled_output")
    if pooled is None:
        raise ValueError(
            "the null conditioning has no pooled output; encode the empty prompt with a Flux CLIP "
            "(DualCLIPLoader type flux: clip_l and t5xxl)"
        )
    return FluxNullCondition(
        context=context[:1].detach().clone().to(device), pooled=pooled[:1].detach().clone().to(device)
    )


def image_token_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Image tokens per column and row: ComfyUI pads the latent to the patch size."""
    return ((height + patch_size // 2) // patch_size, (width + patch_size // 2) // patch_size)


class FluxFeaturePass:
    """One AD forward of a Flux model, recording the selected blocks (see the module docstring).

    `transformer_options` are the MODEL's own (`patcher.model_options["transformer_options"]`):
    their dit replaces and attention override run inside the pass; they are never modified.
    """

    def __init__(
        self,
        base_model: Any,
        layers: list[FluxAttentionLayer],
        stop_early: bool = True,
        checkpoint: bool = False,
        transformer_options: dict | None = None,
    ) -> None:
        check_flux_model(base_model)
        if not layers:
            raise LayerSpecError("no Flux attention layer selected")
        self.base_model = base_model
        self.diffusion_model = base_model.diffusion_model
        self.layers = sorted(layers, key=lambda layer: layer.ad_index)
        self.keys = tuple(layer.patch_key for layer in self.layers)
        self.stop_early = stop_early
        self.checkpoint = checkpoint
        self.transformer_options = transformer_options
        self.dtype = unet_dtype(base_model)
        self.guidance_embed = bool(self.diffusion_model.params.guidance_embed)
        every = list_flux_attention_layers(self.diffusion_model)
        last = self.layers[-1].ad_index if stop_early else len(every) - 1
        modules = {DOUBLE_BLOCK: self.diffusion_model.double_blocks, SINGLE_BLOCK: self.diffusion_model.single_blocks}
        self.wrapped_blocks = {layer.patch_key: modules[layer.kind][layer.number] for layer in every[: last + 1]}

    def run(self, latent: torch.Tensor, sigma: float, cond: FluxNullCondition) -> list[FluxLayerRecord]:
        """Features of the selected blocks for `latent` (B, 16, H, W) at noise level `sigma`."""
        batch, _, height, width = latent.shape
        patch = int(self.diffusion_model.patch_size)
        state = FluxPassState(
            selected=self.keys,
            hw=image_token_grid(height, width, patch),
            text_tokens=cond.text_tokens,
            stop_early=self.stop_early,
            checkpoint=self.checkpoint,
        )
        options = wrapped_options(self.transformer_options, state, self.wrapped_blocks)
        sampling = self.base_model.model_sampling
        sigmas = torch.full((batch,), float(sigma), device=latent.device, dtype=torch.float32)
        model_input = sampling.calculate_input(sigmas, latent).to(self.dtype)
        timesteps = sampling.timestep(sigmas).float()
        context = cond.context.to(latent.device, self.dtype).expand(batch, -1, -1)
        pooled = cond.pooled.to(latent.device, self.dtype).expand(batch, -1)
        guidance = torch.ones(batch, device=latent.device, dtype=self.dtype) if self.guidance_embed else None
        try:
            self.diffusion_model(
                model_input, timesteps, context, y=pooled, guidance=guidance, control=None,
                transformer_options=options,
            )
        except StopForward:
            pass
        missing = [key for key in self.keys if key not in state.records]
        if missing:
            raise RuntimeError(f"Flux blocks {missing} did not run in the AD forward")
        return [state.records[key] for key in self.keys]
