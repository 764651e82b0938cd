"""One AD forward through a ComfyUI SD UNet: the exact input the reference code feeds it."""

from __future__ import annotations

from typing import Any

import torch

from .checkpointing import checkpointed_forward
from .backends import backward_capable_attention
from .family import PIXELS_PER_LATENT, UnsupportedModelError, compute_dtype
from .host_training import training_kernels
from .recorder import AttentionRecorder, LayerRecord, StopForward
from .sd_unet import SelfAttentionLayer


def conditioning_kwargs(
    base_model: Any,
    conditioning: list,
    latent: torch.Tensor,
    device: torch.device,
    image_hw: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """UNet keyword inputs (context, y) for a CONDITIONING, batched to `latent`.

    Goes through the model's own `extra_conds`, so SDXL's pooled/size vector is built the
    way sampling builds it. Size keys absent from the conditioning come from `image_hw`, the
    (rows, cols) in latent pixels of the image being made (default: `latent`'s own), as a
    sampler takes them from the whole latent it samples.
    """
    if not conditioning:
        raise ValueError("the conditioning is empty; connect CLIPTextEncode with empty text")
    cross_attn, options = conditioning[0][0], dict(conditioning[0][1])
    rows, cols = image_hw if image_hw is not None else (int(latent.shape[-2]), int(latent.shape[-1]))
    params = dict(options)
    params.update(
        cross_attn=cross_attn,
        device=device,
        noise=latent,
        width=options.get("width", cols * PIXELS_PER_LATENT),
        height=options.get("height", rows * PIXELS_PER_LATENT),
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
        self.dtype = compute_dtype(base_model)

    def run(self, unet_input: torch.Tensor, timestep: float, cond: dict[str, torch.Tensor]) -> list[LayerRecord]:
        """Features of the AD layers for `unet_input` at integer-valued `timestep`.

        The UNet sees `unet_input` as is (no sigma scaling): that is the reference code's input.
        """
        recorder = AttentionRecorder(self.layers, stop_early=self.stop_early)
        options = recorder.transformer_options()
        options["optimized_attention_override"] = backward_capable_attention
        batch = unet_input.shape[0]
        timesteps = torch.full((batch,), float(timestep), device=unet_input.device, dtype=torch.float32)
        kwargs = {}
        for name, value in cond.items():
            if value.shape[0] != batch:
                value = value[:1].expand(batch, *value.shape[1:])
            kwargs[name] = value.to(self.dtype) if value.is_floating_point() else value
        context = kwargs.pop("context")
        x = unet_input.to(self.dtype)
        with training_kernels():
            if self.checkpoint and x.requires_grad:
                checkpointed_forward(self.diffusion_model, x, timesteps, context, recorder, options, y=kwargs.get("y"))
                return recorder.ordered()
            try:
                self.diffusion_model(x, timesteps, context=context, control=None, transformer_options=options, **kwargs)
            except StopForward:
                pass
        return recorder.ordered()
