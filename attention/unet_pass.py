"""One AD forward through a ComfyUI UNet: the exact input the reference code feeds it."""

from __future__ import annotations

from typing import Any

import torch

from .layers import SelfAttentionLayer
from .checkpointing import checkpointed_forward
from .naming import shown_as_pack
from .recorder import AttentionRecorder, LayerRecord, StopForward


@shown_as_pack
class UnsupportedModelError(ValueError):
    """The MODEL is not an SD-family UNet this pack can read."""


def check_sd_unet(base_model: Any) -> None:
    """Raise `UnsupportedModelError` unless `base_model` is an SD1.x/2.x/SDXL-style UNet."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = getattr(base_model, "diffusion_model", None)
    name = type(base_model).__name__
    if diffusion_model is None or type(diffusion_model) is not UNetModel:
        kind = type(diffusion_model).__name__ if diffusion_model is not None else "no diffusion model"
        raise UnsupportedModelError(
            f"the MODEL is {name} ({kind}); Attention Distillation needs an SD1.x, SD2.x or SDXL UNet checkpoint"
        )
    channels = int(getattr(base_model.latent_format, "latent_channels", 4))
    if int(diffusion_model.in_channels) != channels:
        raise UnsupportedModelError(
            f"the UNet takes {diffusion_model.in_channels} input channels but its latents have {channels} "
            "(inpainting or instruct-pix2pix model); use the base checkpoint"
        )


def latent_channels(base_model: Any) -> int:
    return int(getattr(base_model.latent_format, "latent_channels", 4))


def latent_dtype(latent: torch.Tensor) -> torch.dtype:
    """Latents, losses and Adam stay in float32 at least, whatever the UNet computes in."""
    return torch.promote_types(latent.dtype, torch.float32)


def unet_dtype(base_model: Any) -> torch.dtype:
    """The dtype ComfyUI computes the UNet in (manual cast where the weights are stored lower)."""
    dtype = base_model.get_dtype()
    manual = getattr(base_model, "manual_cast_dtype", None)
    return manual if manual is not None else dtype


def conditioning_kwargs(base_model: Any, conditioning: list, latent: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """UNet keyword inputs (context, y) for a CONDITIONING, batched to `latent`.

    Goes through the model's own `extra_conds`, so SDXL's pooled/size vector is built the
    way sampling builds it.
    """
    if not conditioning:
        raise ValueError("the conditioning is empty; connect CLIPTextEncode with empty text")
    cross_attn, options = conditioning[0][0], dict(conditioning[0][1])
    params = dict(options)
    params.update(
        cross_attn=cross_attn,
        device=device,
        noise=latent,
        width=options.get("width", latent.shape[-1] * 8),
        height=options.get("height", latent.shape[-2] * 8),
    )
    model_conds = base_model.extra_conds(**params)
    if "c_concat" in model_conds:
        raise UnsupportedModelError("models that need a concat latent (inpainting, pix2pix) are not supported")
    batch = latent.shape[0]
    out: dict[str, torch.Tensor] = {}
    for name, cond in model_conds.items():
        value = cond.process_cond(batch_size=batch, device=device, area=None).cond
        out[name] = value.detach().clone()
    return {"context": out.pop("c_crossattn"), **{k: v for k, v in out.items() if k == "y"}}


def _backward_capable_attention(func, *args, **kwargs):
    """`optimized_attention_override` for AD passes: SDPA, which every backend can differentiate
    (sage/flash kernels cannot)."""
    import comfy.ldm.modules.attention as attention

    sdpa = getattr(attention, "attention_pytorch", None)
    return (sdpa or func)(*args, **kwargs)


class UNetFeaturePass:
    """Runs the diffusion model on (UNet input, timestep) with a recorder on the AD layers."""

    def __init__(
        self, base_model: Any, layers: list[SelfAttentionLayer], stop_early: bool = True, checkpoint: bool = False
    ) -> None:
        self.base_model = base_model
        self.diffusion_model = base_model.diffusion_model
        self.layers = list(layers)
        self.stop_early = stop_early
        self.checkpoint = checkpoint
        self.dtype = unet_dtype(base_model)

    def run(self, unet_input: torch.Tensor, timestep: float, cond: dict[str, torch.Tensor]) -> list[LayerRecord]:
        """Features of the AD layers for `unet_input` at integer-valued `timestep`.

        The UNet sees `unet_input` as is (no sigma scaling): that is the reference code's input.
        """
        recorder = AttentionRecorder(self.layers, stop_early=self.stop_early)
        options = recorder.transformer_options()
        options["optimized_attention_override"] = _backward_capable_attention
        batch = unet_input.shape[0]
        timesteps = torch.full((batch,), float(timestep), device=unet_input.device, dtype=torch.float32)
        kwargs = {}
        for name, value in cond.items():
            if value.shape[0] != batch:
                value = value[:1].expand(batch, *value.shape[1:])
            kwargs[name] = value.to(self.dtype) if value.is_floating_point() else value
        context = kwargs.pop("context")
        x = unet_input.to(self.dtype)
        if self.checkpoint and x.requires_grad:
            checkpointed_forward(self.diffusion_model, x, timesteps, context, recorder, options, y=kwargs.get("y"))
            return recorder.ordered()
        try:
            self.diffusion_model(x, timesteps, context=context, control=None, transformer_options=options, **kwargs)
        except StopForward:
            pass
        return recorder.ordered()
