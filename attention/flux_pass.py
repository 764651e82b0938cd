"""One AD forward of a ComfyUI Flux or Flux.2 model (docs/DESIGN.md §2.7, §2.10): the latent itself at the
network time, null text, null pooled vector (FLUX.1 only), guidance 1.0 where embedded;
`patches_replace["dit"]` wrappers (attention/flux_blocks.py) record the selected blocks and stop the
forward after the last one."""

from __future__ import annotations

from typing import Any

import torch

from .family import compute_dtype
from .flux_blocks import FluxLayerRecord, FluxPassState, wrapped_options
from .host_training import training_kernels
from .flux_model import (
    DOUBLE_BLOCK,
    SINGLE_BLOCK,
    FluxAttentionLayer,
    check_flux_model,
    image_token_grid,
    list_flux_attention_layers,
)
from .layer_spec import LayerSpecError
from .recorder import StopForward


class FluxFeaturePass:
    """One AD forward of a Flux model, recording the selected blocks (see the module docstring).

    `transformer_options` are the MODEL's own (`patcher.model_options["transformer_options"]`): their
    dit replaces, attn1 patches, `rope_options` and attention override run inside the pass, a kernel
    choice excepted (attention/backends.py); they are never modified.
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
        self.dtype = compute_dtype(base_model)
        every = list_flux_attention_layers(self.diffusion_model)
        last = self.layers[-1].ad_index if stop_early else len(every) - 1
        modules = {DOUBLE_BLOCK: self.diffusion_model.double_blocks, SINGLE_BLOCK: self.diffusion_model.single_blocks}
        self.wrapped_blocks = {layer.patch_key: modules[layer.kind][layer.number] for layer in every[: last + 1]}

    def run(self, model_input: torch.Tensor, time: float, cond: dict[str, torch.Tensor]) -> list[FluxLayerRecord]:
        """Features of the selected blocks for `model_input` (B, C, H, W; the latent itself) at
        network `time` (`feature_time`), with `cond` from `flux_conditioning` (FLUX.1) or
        `flux2_conditioning` (Flux.2: no pooled `y`)."""
        batch, _, height, width = model_input.shape
        patch = int(self.diffusion_model.patch_size)
        context = cond["context"]
        state = FluxPassState(
            selected=self.keys,
            hw=image_token_grid(height, width, patch),
            text_tokens=int(context.shape[1]),
            stop_early=self.stop_early,
            checkpoint=self.checkpoint,
        )
        options = wrapped_options(self.transformer_options, state, self.wrapped_blocks)
        device = model_input.device

        def batched(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, self.dtype)
            return t if t.shape[0] == batch else t[:1].expand(batch, *t.shape[1:])

        guidance, pooled = cond.get("guidance"), cond.get("y")
        with training_kernels():
            try:
                self.diffusion_model(
                    model_input.to(self.dtype), torch.full((batch,), float(time), device=device), batched(context),
                    y=batched(pooled) if pooled is not None else None,
                    guidance=batched(guidance) if guidance is not None else None,
                    control=None, transformer_options=options,
                )
            except StopForward:
                pass
        missing = [key for key in self.keys if key not in state.records]
        if missing:
            raise RuntimeError(f"Flux blocks {missing} did not run in the AD forward")
        return [state.records[key] for key in self.keys]
