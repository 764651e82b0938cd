"""One AD forward of a ComfyUI Qwen-Image model (docs/DESIGN.md §2.8): the latent itself, (B, 16, 1, H, W),
at the network time, with the null text only (no reference latents, whatever the conditioning carries);
block wrappers (attention/qwen_image/blocks.py) record the selected blocks and stop after the last one."""

from __future__ import annotations

from typing import Any

import torch

from ..family import compute_dtype
from ..flux_blocks import FluxLayerRecord, FluxPassState
from ..host_training import training_kernels
from ..layer_spec import LayerSpecError
from ..recorder import StopForward
from .anatomy import BLOCK, PATCH, QwenImageAttentionLayer, as_model_latent, check_latent_size, check_qwen_image_model
from .blocks import wrapped_options


class QwenImageFeaturePass:
    """One AD forward of a Qwen-Image model. `transformer_options` are the MODEL's own: their dit
    replaces, wrappers and attention override run inside the pass; they are never modified."""

    def __init__(self, base_model: Any, layers: list[QwenImageAttentionLayer], stop_early: bool = True,
                 checkpoint: bool = False, transformer_options: dict | None = None) -> None:
        check_qwen_image_model(base_model)
        if not layers:
            raise LayerSpecError("no Qwen-Image attention layer selected")
        self.diffusion_model = base_model.diffusion_model
        self.layers = sorted(layers, key=lambda layer: layer.ad_index)
        self.keys = tuple(layer.patch_key for layer in self.layers)
        self.stop_early = stop_early
        self.checkpoint = checkpoint
        self.transformer_options = transformer_options
        self.dtype = compute_dtype(base_model)
        blocks = self.diffusion_model.transformer_blocks
        last = self.layers[-1].ad_index if stop_early else len(blocks) - 1
        self.wrapped_blocks = {(BLOCK, i): blocks[i] for i in range(last + 1)}

    def run(self, model_input: torch.Tensor, time: float, cond: dict[str, torch.Tensor]) -> list[FluxLayerRecord]:
        """Features of the selected blocks for `model_input` (the latent itself, (B, 16, 1, H, W)) at network
        `time`, with `cond` from `qwen_conditioning`."""
        x = as_model_latent(model_input)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        check_latent_size(height, width)
        device = x.device

        def batched(t: torch.Tensor) -> torch.Tensor:
            return t if t.shape[0] == batch else t[:1].expand(batch, *t.shape[1:])

        context = batched(cond["context"].to(device, self.dtype))
        mask = cond.get("attention_mask")
        mask = batched(mask.to(device, self.dtype)) if mask is not None else None
        state = FluxPassState(selected=self.keys, hw=(height // PATCH, width // PATCH),
                              text_tokens=int(context.shape[1]), stop_early=self.stop_early, checkpoint=self.checkpoint)
        options = wrapped_options(self.transformer_options, state, self.wrapped_blocks, mask)
        with training_kernels():
            try:
                self.diffusion_model(x.to(self.dtype), torch.full((batch,), float(time), device=device), context,
                                     attention_mask=mask, control=None, transformer_options=options)
            except StopForward:
                pass
        missing = [key for key in self.keys if key not in state.records]
        if missing:
            raise RuntimeError(f"Qwen-Image blocks {missing} did not run in the AD forward")
        return [state.records[key] for key in self.keys]
