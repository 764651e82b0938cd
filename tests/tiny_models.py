"""Random-weight SD-family models built through ComfyUI's own classes, as CheckpointLoaderSimple
would build them (call inside torch.inference_mode())."""

from __future__ import annotations

import torch


def sd15_unet_config(channels: int = 32, context: int = 32) -> dict:
    return dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, out_channels=4, model_channels=channels,
        num_res_blocks=[1, 1], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
        channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=False,
        context_dim=context, use_temporal_resblock=False, use_temporal_attention=False,
    )


def sdxl_unet_config(channels: int = 64, context: int = 64) -> dict:
    return dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4,
        model_channels=channels, num_res_blocks=[1, 1], transformer_depth=[0, 2],
        transformer_depth_output=[0, 0, 2, 2], channel_mult=[1, 2], transformer_depth_middle=2,
        use_linear_in_transformer=True, context_dim=context,
        use_temporal_resblock=False, use_temporal_attention=False,
    )


def build(kind: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 0.05):
    """A ModelPatcher around a tiny SD15 or SDXL BaseModel with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.SD15(sd15_unet_config()) if kind == "sd15" else sm.SDXL(sdxl_unet_config())
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    state = {
        "model.diffusion_model." + k: torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype) * scale
        for k, v in model.diffusion_model.state_dict().items()
    }
    model.load_model_weights(state, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conditioning(kind: str = "sd15", seed: int = 1, batch: int = 1, dtype: torch.dtype = torch.float32) -> list:
    generator = torch.Generator().manual_seed(seed)
    if kind == "sd15":
        return [[torch.randn(batch, 77, 32, generator=generator).to(dtype), {}]]
    return [[
        torch.randn(batch, 77, 64, generator=generator).to(dtype),
        {"pooled_output": torch.randn(batch, 1280, generator=generator).to(dtype), "width": 256, "height": 256},
    ]]


def lora_state_dict(patcher, rank: int = 2, seed: int = 3, match: str = "attn1", scale: float = 0.1) -> dict:
    """A LoRA in the kohya format ComfyUI's loader reads, on 2-D weights whose name has `match`."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    generator = torch.Generator().manual_seed(seed)
    weights = patcher.model.state_dict()
    lora = {}
    for lora_key, model_key in key_map.items():
        if not isinstance(lora_key, str) or not lora_key.startswith("lora_unet_") or match not in lora_key:
            continue
        if not isinstance(model_key, str) or weights[model_key].ndim != 2:
            continue
        out_dim, in_dim = weights[model_key].shape
        lora[lora_key + ".lora_up.weight"] = torch.randn(out_dim, rank, generator=generator) * scale
        lora[lora_key + ".lora_down.weight"] = torch.randn(rank, in_dim, generator=generator) * scale
        lora[lora_key + ".alpha"] = torch.tensor(float(rank))
    return lora
