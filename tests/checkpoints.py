"""A ~21M-parameter random UNet checkpoint that ComfyUI's detection recognises as SD15
(320 channels, 768 context, conv proj_in), and a LoRA for it, written as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

SD15_DETECTABLE_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, use_spatial_transformer=True,
    legacy=False, use_checkpoint=False,
)


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    """Parameter shapes of a ComfyUI UNetModel, built on the meta device (no memory)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in unet.state_dict().items()}


def write_sd15_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    state = {
        "model.diffusion_model." + k: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        for k, shape in unet_shapes(SD15_DETECTABLE_UNET).items()
    }
    safetensors.torch.save_file(state, str(path))
    return path


def write_sd15_lora(path: Path, seed: int = 1, rank: int = 4, dtype: torch.dtype = torch.float16) -> Path:
    """A kohya-format LoRA on every attn1 q/k/v of the detectable checkpoint."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key, shape in unet_shapes(SD15_DETECTABLE_UNET).items():
        if key.endswith(("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            lora[name + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=generator) * 0.05).to(dtype)
            lora[name + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=generator) * 0.05).to(dtype)
            lora[name + ".alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(lora, str(path))
    return path
