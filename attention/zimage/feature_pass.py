"""One AD forward of ComfyUI's Z-Image (docs/DESIGN.md §2.8): the latent itself at `timestep(σ)` = σ with
the null caption, recording the selected main layers through `optimized_attention_override`.

NextDiT has no block replace patch (`patches_replace["dit"]`), so nothing can wrap one of its main layers
for gradient checkpointing from inside `NextDiT.forward`. The pass therefore drives the forward up to the
last selected layer itself, from ComfyUI's own pieces in ComfyUI's order: the time embedding
(`t_embedder` of (1 − timesteps)·`time_scale`), `patchify_and_embed` (caption and image embedding,
padding, RoPE tables, both refiners) and then each main layer called as `NextDiT._forward` calls it, with
`block_type`/`block_index` set. Nothing after the last selected layer runs: its attention raises
`StopForward` once recorded. `tests/test_zimage_features.py` checks the features against ComfyUI's whole
forward.

Every attention call of the pass goes through the override: the selected layers' records q, k, v (after
the q/k RMSNorm and RoPE) and the attention output before `out`, and all of them use SDPA, which every
backend can differentiate; an override the MODEL carries is chained, not replaced. ControlNet-type model
patches (`patches["double_block"]`, `patches["noise_refiner"]`: Z-Image Fun ControlNet) stay out of AD
passes, as ControlNet does on SD and Flux.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends import ad_attention, backward_capable_kernel
from ..family import compute_dtype
from ..host_training import training_kernels
from ..layer_spec import LayerSpecError
from ..recompute import CheckpointedBlock
from ..recorder import LayerRecord, StopForward, split_heads
from .anatomy import TokenLayout, ZImageAttentionLayer, check_zimage_model, token_layout

CONTROL_PATCHES = ("double_block", "noise_refiner")  # what NextDiT reads from `patches`: model-patch ControlNets


@dataclass
class PassState:
    """What the attention overrides of one AD forward share."""

    selected: tuple[int, ...]
    layout: TokenLayout
    stop_early: bool = True
    records: dict[int, LayerRecord] = field(default_factory=dict)

    def record(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        layout = self.layout
        if q.shape[2] != layout.sequence:
            raise RuntimeError(
                f"Z-Image main layer {index} attends over {q.shape[2]} tokens where Attention Distillation expects "
                f"{layout.sequence} ({layout.text} caption tokens padded to {layout.text_padded}, {layout.image} "
                f"image tokens padded to {layout.image_padded}); this ComfyUI's Z-Image differs from v0.33.0's"
            )
        self.records[index] = LayerRecord(
            q=layout.query_rows(q), out=layout.query_rows(split_heads(out, int(q.shape[1]))), hw=layout.grid,
            k=k, v=v, text_tokens=layout.text, key_layout=layout.keys_around_grid,
        )

    @contextlib.contextmanager
    def capture(self, local: dict[int, LayerRecord]) -> Iterator[None]:
        """Send records to `local` (a checkpointed layer returns them as outputs)."""
        main, self.records = self.records, local
        try:
            yield
        finally:
            self.records = main


class AttentionOverride:
    """`optimized_attention_override` of one AD forward: SDPA under the MODEL's own override (attention/backends.py);
    on a selected main layer (`index`) it records the features and, after the last one, stops the pass."""

    def __init__(self, state: PassState, previous: Callable | None, index: int | None = None) -> None:
        self.state = state
        self.previous = previous
        self.index = index

    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        out = ad_attention(self.previous, backward_capable_kernel(func), q, k, v, *args, **kwargs)
        if self.index is None or self.index not in self.state.selected:
            return out
        if not kwargs.get("skip_reshape", False):
            raise RuntimeError("this ComfyUI's Z-Image attention does not pass split heads; Z-Image AD cannot read it")
        self.state.record(self.index, q, k, v, out)
        if self.state.stop_early and self.index == self.state.selected[-1]:
            raise StopForward
        return out


def pass_options(transformer_options: dict | None, override: AttentionOverride) -> dict:
    """A fresh options dict for one AD forward: the MODEL's own (rope options, wrappers, its attention
    override chained by `override`) without ControlNet-type model patches. The MODEL's dicts are not touched."""
    options = dict(transformer_options or {})
    patches = {k: v for k, v in (options.get("patches") or {}).items() if k not in CONTROL_PATCHES}
    options["patches"] = patches
    options["optimized_attention_override"] = override
    return options


class ZImageFeaturePass:
    """One AD forward of a Z-Image model recording the selected main layers (see the module docstring).

    `transformer_options` are the MODEL's own (`patcher.model_options["transformer_options"]`)."""

    def __init__(self, base_model: Any, layers: list[ZImageAttentionLayer], stop_early: bool = True,
                 checkpoint: bool = False, transformer_options: dict | None = None) -> None:
        check_zimage_model(base_model)
        if not layers:
            raise LayerSpecError("no Z-Image main layer selected")
        self.base_model = base_model
        self.diffusion_model = base_model.diffusion_model
        self.selected = tuple(sorted(layer.ad_index for layer in layers))
        self.stop_early = stop_early
        self.checkpoint = checkpoint
        self.transformer_options = transformer_options or {}
        self.previous_override = self.transformer_options.get("optimized_attention_override")
        self.dtype = compute_dtype(base_model)

    def run(self, model_input: torch.Tensor, time: float, cond: dict[str, Any]) -> list[LayerRecord]:
        """Features of the selected layers for `model_input` (B, 16, H, W; the latent itself) at network
        `time` (`timestep(σ)` = σ), with `cond` from `zimage_conditioning`."""
        dm = self.diffusion_model
        batch, _, height, width = model_input.shape
        context = cond["context"].to(model_input.device, self.dtype)
        if context.shape[0] != batch:
            context = context[:1].expand(batch, -1, -1)
        state = PassState(self.selected, token_layout(dm, int(context.shape[1]), height, width), self.stop_early)
        options = pass_options(self.transformer_options, AttentionOverride(state, self.previous_override))
        last = self.selected[-1] if self.stop_early else len(dm.layers) - 1
        with training_kernels():
            img, mask, freqs, adaln = self._embedded(model_input, time, context, cond["num_tokens"], options)
            options["total_blocks"] = len(dm.layers)
            options["block_type"] = "double"
            try:
                for index in range(last + 1):
                    img = self._layer(state, index, img, mask, freqs, adaln, options, last)
            except StopForward:
                pass
        missing = [index for index in self.selected if index not in state.records]
        if missing:
            raise RuntimeError(f"Z-Image main layers {missing} did not run in the AD forward")
        return [state.records[index] for index in self.selected]

    def _embedded(self, model_input: torch.Tensor, time: float, context: torch.Tensor, num_tokens: int,
                  options: dict) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """The joint sequence entering main layer 0, its mask, RoPE tables and modulation input."""
        import comfy.ldm.common_dit

        dm = self.diffusion_model
        if getattr(dm, "clip_text_pooled_proj", None) is not None:
            raise RuntimeError("this Lumina 2 model takes a pooled text vector; it is not Z-Image")
        patch = int(dm.patch_size)
        x = comfy.ldm.common_dit.pad_to_patch_size(model_input.to(self.dtype), (patch, patch))
        timesteps = torch.full((x.shape[0],), float(time), device=x.device, dtype=torch.float32)
        adaln = dm.t_embedder((1.0 - timesteps) * dm.time_scale, dtype=x.dtype)
        embedded = dm.patchify_and_embed(x, context, None, adaln, num_tokens, transformer_options=options)
        img, mask, freqs = embedded[0], embedded[1], embedded[4]
        return img, mask, freqs.to(img.device), adaln

    def _layer(self, state: PassState, index: int, img: torch.Tensor, mask: Any, freqs: torch.Tensor,
               adaln: torch.Tensor, options: dict, last: int) -> torch.Tensor:
        """Main layer `index` as NextDiT's loop calls it, with its own options (a checkpointed layer is
        recomputed after later layers ran), checkpointed where that saves memory."""
        layer = self.diffusion_model.layers[index]
        layer_options = dict(options, block_index=index,
                             optimized_attention_override=AttentionOverride(state, self.previous_override, index))

        def call(hidden: torch.Tensor) -> torch.Tensor:
            return layer(hidden, mask, freqs, adaln, transformer_options=layer_options)

        differentiated = torch.is_grad_enabled() and img.requires_grad
        constants_need_grad = adaln.requires_grad or freqs.requires_grad
        if not differentiated or not self.checkpoint or index == last or constants_need_grad:
            return call(img)
        recorded = index in state.selected

        def run(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
            local: dict[int, LayerRecord] = {}
            with state.capture(local):
                out = call(hidden)
            return (out, local[index].q, local[index].out) if recorded else (out,)

        outputs = CheckpointedBlock.apply(run, img)
        if recorded:
            layout = state.layout
            state.records[index] = LayerRecord(q=outputs[1], out=outputs[2], hw=layout.grid, text_tokens=layout.text,
                                               key_layout=layout.keys_around_grid)
        return outputs[0]
