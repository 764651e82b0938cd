"""Flux-shaped models through ComfyUI's own classes: tiny random-weight dev (guidance
embedding) and schnell (none) models loaded as the executor loads them, and meta-device
FLUX.1 configs (19 double, 38 single blocks) for the layer walk."""

from __future__ import annotations

import os

import pytest
import torch

FLUX1 = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
)
# Fields newer hosts' FluxParams declare without a default, with the value ComfyUI's detection gives
# FLUX.1 (v0.33: `txt_ids_dims` = [], comfy/model_detection.py); added only where the host declares them.
FLUX1_NEWER_FIELDS = {"txt_ids_dims": []}


def host_config(config: dict) -> dict:
    """`config` plus the FLUX.1 values of the fields this host's FluxParams declares."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    declared = {field.name for field in dataclasses.fields(FluxParams)}
    return dict(config, **{k: v for k, v in FLUX1_NEWER_FIELDS.items() if k in declared and k not in config})


TINY = dict(
    FLUX1, vec_in_dim=24, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=4,
    depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6],
)
TEXT_TOKENS = 6


def _host_reason() -> str | None:
    """Why the Flux tests cannot run here, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "Flux AD needs a ComfyUI v0.3.64 tree: set COMFYUI_PATH"
    try:
        import comfyui_version
    except ImportError:
        return f"COMFYUI_PATH={path} is not a full ComfyUI tree (no comfyui_version.py)"
    version = tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])
    if version < (0, 3, 64):
        return f"COMFYUI_PATH is ComfyUI {comfyui_version.__version__}; Flux AD needs v0.3.64 or newer"
    return None


HOST_REASON = _host_reason()
requires_flux_host = pytest.mark.skipif(HOST_REASON is not None, reason=HOST_REASON or "")


def _config(kind: str):
    import comfy.supported_models as sm

    config = host_config(dict(TINY, guidance_embed=(kind == "dev")))
    return sm.Flux(config) if kind == "dev" else sm.FluxSchnell(config)


def build(kind: str = "dev", dtype: torch.dtype = torch.float32, manual_cast: torch.dtype | None = None,
          seed: int = 0, scale: float = 0.08, weights: dict | None = None):
    """A ModelPatcher around a tiny Flux BaseModel; call inside torch.inference_mode().

    `weights` (fp32 state dict of the diffusion model) replaces the random ones.
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _config(kind)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, "", device=torch.device("cpu"))
    state = weights if weights is not None else random_weights(model.diffusion_model, seed, scale)
    model.load_model_weights({"model.diffusion_model." + k: v.to(dtype) for k, v in state.items()}, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_weights(diffusion_model: torch.nn.Module, seed: int = 0, scale: float = 0.08) -> dict:
    """fp32 weights; RMS-norm scales near 1 so that attention is not flat (named `.scale` up to v0.3.64,
    `query_norm.weight` / `key_norm.weight` since ComfyUI's own RMSNorm op serves Flux)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in diffusion_model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        state[name] = 1.0 + 0.2 * noise if name.endswith((".scale", "_norm.weight")) else noise * scale
    return state


def flux1_meta(kind: str = "dev"):
    """FLUX.1 as ComfyUI detects it: a meta-device state dict of the real architecture goes
    through `model_detection`; returns (detected model config, meta-device diffusion model)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    meta = Flux(device="meta", operations=comfy.ops.disable_weight_init, **host_config(dict(FLUX1, guidance_embed=(kind == "dev"))))
    state = {"model.diffusion_model." + k: v for k, v in meta.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    return config, meta


def null_conditioning(seed: int = 1, tokens: int = TEXT_TOKENS, guidance: float | None = 3.5,
                      dtype: torch.dtype = torch.float32) -> list:
    """A CONDITIONING shaped like CLIPTextEncode("") with a Flux CLIP (T5 tokens, pooled CLIP-L)."""
    generator = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(1, TINY["vec_in_dim"], generator=generator).to(dtype)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[torch.randn(1, tokens, TINY["context_in_dim"], generator=generator).to(dtype), options]]


def latent(seed: int = 2, batch: int = 1, height: int = 8, width: int = 6, dtype: torch.dtype = torch.float32):
    return torch.randn(batch, 16, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pass_inputs(base, latent: torch.Tensor, sigma: float, conditioning: list | None = None) -> tuple[float, dict]:
    """(network time, AD conditioning) of a Flux AD pass at σ, through the family's functions."""
    from attention_distillation_pack.attention import flux_family as ff

    time, _ = ff.feature_time(base.model_sampling, sigma)
    conditioning = conditioning if conditioning is not None else null_conditioning(dtype=latent.dtype)
    return time, ff.flux_conditioning(base, conditioning, latent, torch.device("cpu"))
