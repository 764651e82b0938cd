"""Z-Image-shaped models through ComfyUI v0.33's own classes: a tiny random-weight Z-Image
(`supported_models.ZImage` config, `model_base.Lumina2`, `load_model_weights`, `ModelPatcher`) loaded as
the executor loads it, and the real Z-Image(-Turbo) architecture on the meta device for the layer walk."""

from __future__ import annotations

import os

import pytest
import torch

# Z-Image(-Turbo) as ComfyUI v0.33.0 detects it (comfy/model_detection.py, "Z image"): 30 main layers.
ZIMAGE_REAL = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30, qk_norm=True,
    n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)
# Narrow but of the same anatomy. The width stays 256: Z-Image's modulation reads a 256-wide time
# embedding through min(dim, 256)-wide layers, so a narrower model does not build.
TINY = dict(ZIMAGE_REAL, dim=256, cap_feat_dim=32, n_layers=3, n_heads=4, n_kv_heads=4, axes_dims=[16, 24, 24])
CAPTION_TOKENS = 8  # CLIPTextEncode("") with Z-Image's Qwen3-4B template
PAD = 32


def _host_reason() -> str | None:
    """Why the Z-Image tests cannot run here, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "Z-Image AD needs a ComfyUI v0.33.0 tree: set COMFYUI_PATH"
    try:
        import comfyui_version
    except ImportError:
        return f"COMFYUI_PATH={path} is not a full ComfyUI tree (no comfyui_version.py)"
    version = tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])
    if version < (0, 33, 0):
        return f"COMFYUI_PATH is ComfyUI {comfyui_version.__version__}; Z-Image AD needs v0.33.0 or newer"
    return None


HOST_REASON = _host_reason()
requires_zimage_host = pytest.mark.skipif(HOST_REASON is not None, reason=HOST_REASON or "")


def build(dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None, seed: int = 0,
          weights: dict | None = None, **config):
    """A ModelPatcher around a tiny Z-Image BaseModel (Lumina2); call inside torch.inference_mode().
    `weights` (fp32 state dict of the diffusion model) replaces the random ones; `config` overrides TINY."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    model_config = sm.ZImage(dict(TINY, **config))
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    state = weights if weights is not None else random_weights(model.diffusion_model, seed)
    model.load_model_weights({"model.diffusion_model." + k: v.to(dtype) for k, v in state.items()}, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_weights(diffusion_model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict:
    """fp32 weights: norm scales near 1 (attention is not flat), pad tokens as large as embedded tokens (so
    that the pads the model attends to matter)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in diffusion_model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "cap_embedder.0.weight")):
            state[name] = 1.0 + 0.2 * noise
        elif name.endswith("pad_token"):
            state[name] = 0.5 * noise
        else:
            state[name] = noise * scale
    return state


def real_meta():
    """Z-Image as ComfyUI detects it: a meta-device state dict of the real architecture goes through
    `model_detection`; returns (detected model config, meta-device diffusion model)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    meta = NextDiT(device="meta", operations=comfy.ops.disable_weight_init, **ZIMAGE_REAL)
    state = {"model.diffusion_model." + k: v for k, v in meta.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    return config, meta


def null_conditioning(seed: int = 1, tokens: int = CAPTION_TOKENS, dtype: torch.dtype = torch.float32) -> list:
    """A CONDITIONING shaped like CLIPTextEncode("") with Z-Image's CLIP: caption features, no pooled output,
    an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, TINY["cap_feat_dim"], generator=generator).to(dtype)
    return [[context, {"pooled_output": None, "attention_mask": torch.ones(1, tokens, dtype=torch.long)}]]


def latent(seed: int = 2, batch: int = 1, height: int = 8, width: int = 6, dtype: torch.dtype = torch.float32):
    return torch.randn(batch, 16, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padded(count: int) -> int:
    return -(-count // PAD) * PAD
