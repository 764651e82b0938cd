"""Qwen-Image models through ComfyUI v0.33's own classes: tiny random-weight T2I and Edit-2511 models
loaded as the executor loads them (supported_models config, model_base, load_model_weights,
ModelPatcher), and a meta-device config of the real architecture (60 blocks) for the layer walk."""

from __future__ import annotations

import os

import pytest
import torch

TINY = dict(
    image_model="qwen_image", in_channels=64, out_channels=16, num_layers=9, attention_head_dim=12,
    num_attention_heads=4, joint_attention_dim=24, axes_dims_rope=(4, 4, 4),
)
TEXT_TOKENS = 5  # CLIPTextEncode("") with Qwen-Image's text encoder (docs/DESIGN.md §2.8)


def _host_reason() -> str | None:
    """Why the Qwen-Image tests cannot run here, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "Qwen-Image AD needs a ComfyUI v0.33.0 tree: set COMFYUI_PATH"
    try:
        import comfyui_version
    except ImportError:
        return f"COMFYUI_PATH={path} is not a full ComfyUI tree (no comfyui_version.py)"
    version = tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])
    if version < (0, 33, 0):
        return f"COMFYUI_PATH is ComfyUI {comfyui_version.__version__}; Qwen-Image AD needs v0.33.0 or newer"
    return None


HOST_REASON = _host_reason()
requires_qwen_host = pytest.mark.skipif(HOST_REASON is not None, reason=HOST_REASON or "")


def build(edit: str | None = None, dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None,
          seed: int = 0, scale: float = 0.15, weights: dict | None = None):
    """A ModelPatcher around a tiny Qwen-Image BaseModel; call inside torch.inference_mode().

    `edit` "2511": the Edit-2511 variant (reference tokens modulated at t = 0); `weights` (fp32 state dict
    of the diffusion model) replaces the random ones."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.QwenImage(dict(TINY, **({"default_ref_method": "index_timestep_zero"} if edit == "2511" else {})))
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, "", device=torch.device("cpu"))
    state = weights if weights is not None else random_weights(model.diffusion_model, seed, scale)
    model.load_model_weights({"model.diffusion_model." + k: v.to(dtype) for k, v in state.items()}, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_weights(diffusion_model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> dict:
    """fp32 weights; RMS-norm weights near 1 so that attention is not flat."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in diffusion_model.state_dict().items():
        if value.numel() == 0:  # Edit-2511's marker buffer
            state[name] = value.float()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        state[name] = 1.0 + 0.2 * noise if "norm" in name and name.endswith(".weight") else noise * scale
    return state


def real_meta(edit: str | None = None):
    """Qwen-Image as ComfyUI detects it: a meta-device state dict of the real architecture goes through
    `model_detection`; returns (detected model config, meta-device diffusion model)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    kwargs = {"default_ref_method": "index_timestep_zero"} if edit == "2511" else {}
    meta = QwenImageTransformer2DModel(device="meta", operations=comfy.ops.disable_weight_init, **kwargs)
    state = {"model.diffusion_model." + k: v for k, v in meta.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    return config, meta


def null_conditioning(seed: int = 1, tokens: int = TEXT_TOKENS, dtype: torch.dtype = torch.float32,
                      **options) -> list:
    """A CONDITIONING shaped like CLIPTextEncode("") with Qwen-Image's text encoder: no pooled output."""
    context = torch.randn(1, tokens, TINY["joint_attention_dim"], generator=torch.Generator().manual_seed(seed))
    return [[context.to(dtype), {"pooled_output": None, **options}]]


def latent(seed: int = 2, batch: int = 1, height: int = 8, width: int = 6, dtype: torch.dtype = torch.float32):
    """A LATENT's samples as VAEEncode gives them for Qwen-Image: (B, 16, 1, H, W)."""
    return torch.randn(batch, 16, 1, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
