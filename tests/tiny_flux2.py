"""Flux.2-shaped models through ComfyUI v0.33's own classes: tiny random-weight dev-like (guidance
embedding) and Klein-like (none) models with the fields ComfyUI's detection sets for Flux.2
(comfy/model_detection.py, its flux2 branch), loaded as the executor loads them, and meta-device
configs of the real architectures for the layer walk (docs/DESIGN.md §2.10)."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf

# what detection sets for every Flux.2 checkpoint; depth, widths and guidance come from the weights
DETECTED = dict(
    image_model="flux2", axes_dim=[32, 32, 32, 32], mlp_ratio=3.0, theta=2000, in_channels=128, out_channels=128,
    global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False, default_ref_method="index",
    ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1, vec_in_dim=None, yak_mlp=False, txt_norm=False,
)
# (double, single, heads, context width, guidance embedding) of the public configs
REAL = {
    "dev": (8, 48, 48, 15360, True),
    "klein-4b": (5, 20, 24, 7680, False),
    "klein-9b": (8, 24, 32, 12288, False),
}
TINY = dict(DETECTED, axes_dim=[4, 4, 4, 4], num_heads=4, hidden_size=64, context_in_dim=32, depth=2,
            depth_single_blocks=3)
TEXT_TOKENS = 6
CHANNELS = 128


def _host_reason() -> str | None:
    reason = tf.HOST_REASON
    if reason is not None:
        return reason
    import comfy.model_base

    if not hasattr(comfy.model_base, "Flux2"):
        return "this ComfyUI has no Flux.2 (model_base.Flux2, ComfyUI v0.33)"
    return None


HOST_REASON = _host_reason()
requires_flux2_host = pytest.mark.skipif(HOST_REASON is not None, reason=HOST_REASON or "")


def build(kind: str = "dev", dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 0.08,
          weights: dict | None = None):
    """A ModelPatcher around a tiny Flux.2 BaseModel (`kind` "dev": guidance embedding; "klein": none),
    made by ComfyUI's `supported_models.Flux2`; call inside torch.inference_mode()."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.Flux2(dict(TINY, guidance_embed=(kind == "dev")))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    state = weights if weights is not None else tf.random_weights(model.diffusion_model, seed, scale)
    model.load_model_weights({"model.diffusion_model." + k: v.to(dtype) for k, v in state.items()}, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def real_meta(variant: str):
    """A real Flux.2 architecture as ComfyUI detects it: a meta-device state dict goes through
    `model_detection`; returns (detected model config, meta-device diffusion model)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    double, single, heads, context, guidance = REAL[variant]
    meta = Flux(device="meta", operations=comfy.ops.disable_weight_init, **dict(
        DETECTED, num_heads=heads, hidden_size=heads * 128, context_in_dim=context, depth=double,
        depth_single_blocks=single, guidance_embed=guidance))
    state = {"model.diffusion_model." + k: v for k, v in meta.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    return config, meta


def null_conditioning(seed: int = 1, tokens: int = TEXT_TOKENS, guidance: float | None = 3.5,
                      dtype: torch.dtype = torch.float32) -> list:
    """A CONDITIONING shaped like CLIPTextEncode("") with a Flux.2 text encoder: stacked LM hidden
    states, no pooled output, an attention mask."""
    generator = torch.Generator().manual_seed(seed)
    options = {"pooled_output": None, "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[torch.randn(1, tokens, TINY["context_in_dim"], generator=generator).to(dtype), options]]


def latent(seed: int = 2, batch: int = 1, height: int = 5, width: int = 4, dtype: torch.dtype = torch.float32):
    """A Flux.2 LATENT (B, 128, H, W); odd sizes are valid (patch size 1)."""
    return torch.randn(batch, CHANNELS, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
