"""Gradient checkpointing for the differentiated AD pass through an SD UNet.

The UNet is run block by block (the same sequence of input, middle and output blocks as
ComfyUI's forward). Each block before the one holding the last selected layer runs without
keeping activations; its backward recomputes it. The AD features recorded inside a block are
outputs of the checkpointed function, so the loss reaches them through the recomputation.
"""

from __future__ import annotations


import torch

from .recompute import CheckpointedBlock
from .recorder import AttentionRecorder, LayerRecord, StopForward
from .sd_unet import count_transformers, unet_segments


def checkpointed_forward(
    diffusion_model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    recorder: AttentionRecorder,
    options: dict,
    y: torch.Tensor | None = None,
) -> None:
    """Run the UNet up to the recorder's last layer with every earlier block checkpointed.

    Fills `recorder.records` with graph-connected q/out of the selected layers.
    """
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    options_base = dict(options)
    options_base["original_shape"] = list(x.shape)
    emb = diffusion_model.time_embed(timestep_embedding(timesteps, diffusion_model.model_channels).to(x.dtype))
    if getattr(diffusion_model, "num_classes", None) is not None:
        emb = emb + diffusion_model.label_emb(y)

    last_block = recorder.last_key[:2]
    main_records = recorder.records
    h, skips, transformer_index = x, [], 0
    for name, block_id, block in unet_segments(diffusion_model):
        if name == "output":
            h = torch.cat([h, skips.pop()], dim=1)
        output_shape = skips[-1].shape if (name == "output" and skips) else None
        keys = [key for key in recorder.keys if key[:2] == (name, block_id)]
        start_index = transformer_index
        hw: dict = {}

        def run(h_in: torch.Tensor, name=name, block_id=block_id, block=block, keys=keys,
                start_index=start_index, output_shape=output_shape, hw=hw) -> tuple[torch.Tensor, ...]:
            options = dict(options_base)
            options["block"] = (name, block_id)
            options["transformer_index"] = start_index
            local: dict = {}
            recorder.records = local
            try:
                h_out = block(h_in, emb, context, options, output_shape)
            finally:
                recorder.records = main_records
            hw.update({key: local[key].hw for key in keys})
            return (h_out, *[t for key in keys for t in (local[key].q, local[key].out)])

        if (name, block_id) == last_block or not h.requires_grad:
            options = dict(options_base, block=(name, block_id), transformer_index=start_index)
            try:
                h = block(h, emb, context, options, output_shape)
            except StopForward:
                return
        else:
            h, *features = CheckpointedBlock.apply(run, h)
            for i, key in enumerate(keys):
                main_records[key] = LayerRecord(q=features[2 * i], out=features[2 * i + 1], hw=hw[key])
        transformer_index += count_transformers(block)
        if name == "input":
            skips.append(h)
    raise RuntimeError("the last AD layer never ran")
