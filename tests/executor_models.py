"""Random-weight model files for running the shipped workflows in ComfyUI's executor.

- an SD1.5 single-file checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD15: the small
  SD15-detectable UNet of tests/checkpoints.py, a full-size CLIP-L text encoder and the SD VAE
  (~460 MB in fp16), so CLIPTextEncode, VAE Encode and VAE Decode run;
- an SDXL-class checkpoint: a UNet that ComfyUI detects as an SDXL-family model (by default the
  Segmind Vega layout, which ComfyUI runs as model_base.SDXL with the SDXL text encoders and latent
  format; AD_TEST_SDXL_UNET=full gives the real SDXL layout, 2.6B parameters), CLIP-L + CLIP-G and
  the VAE;
- a ControlNet in the original single-file format matching the SD15 UNet, and the LoRA of
  tests/checkpoints.py.

State dicts come from ComfyUI's own classes built on the meta device and are converted to the
checkpoint layout with the model config's own `*_for_saving` functions. Weights: normalization
scales 1, biases 0, other weights N(0, 1/fan_in). Needs a ComfyUI tree importable as `comfy`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import torch
from checkpoints import SD15_DETECTABLE_UNET, write_sd15_lora

RECIPE = "executor-models-v1"
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SDXL_CLASS_UNETS = {
    # Segmind Vega: ComfyUI's supported_models.Segmind_Vega(SDXL), detected by transformer_depth.
    "vega": dict(transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=1,
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2]),
    # SDXL base 1.0.
    "full": dict(transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
SDXL_COMMON = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
)


def cache_dir() -> Path:
    """Where the model files are kept between runs: $AD_TEST_CACHE, else a folder in the user's cache."""
    configured = os.environ.get("AD_TEST_CACHE")
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = base if configured else base / "comfyui-attention-distillation-tests"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def random_state(module: torch.nn.Module, generator: torch.Generator, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Random values for every parameter of a (meta) module; buffers named position_ids get positions."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    state: dict[str, torch.Tensor] = {}
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            shape = tuple(param.shape)
            if isinstance(sub, norms) and name == "weight":
                value = torch.ones(shape)
            elif name == "bias" or len(shape) < 2:
                value = torch.zeros(shape)
            else:
                value = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
            state[key] = value.to(dtype)
        for name, buffer in sub.named_buffers(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if "position_ids" in name:
                state[key] = torch.arange(buffer.shape[-1]).expand(tuple(buffer.shape)).clone()
    return state


def _unet(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)


def _vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)


def _checkpoint_state(model_config, unet, clip, generator) -> dict[str, torch.Tensor]:
    state = model_config.process_unet_state_dict_for_saving(random_state(unet, generator))
    state.update(model_config.process_clip_state_dict_for_saving(random_state(clip, generator)))
    vae = random_state(_vae(), generator)
    # Encoder log-variance channels strongly negative: VAE Encode is then nearly deterministic.
    vae["quant_conv.bias"][4:] = -20.0
    state.update(model_config.process_vae_state_dict_for_saving(vae))
    return state


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    import safetensors.torch

    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.replace(path)
    return path


def build_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.sd1_clip
    import comfy.supported_models

    generator = torch.Generator().manual_seed(seed)
    model_config = comfy.supported_models.SD15(dict(SD15_DETECTABLE_UNET))
    clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
    return _save(_checkpoint_state(model_config, _unet(SD15_DETECTABLE_UNET), clip, generator), path)


def sdxl_unet_config(shape: str) -> dict:
    return {**SDXL_COMMON, **SDXL_CLASS_UNETS[shape]}


def build_sdxl_checkpoint(path: Path, shape: str = "vega", seed: int = 2) -> Path:
    import comfy.sdxl_clip
    import comfy.supported_models

    generator = torch.Generator().manual_seed(seed)
    config = sdxl_unet_config(shape)
    model_config = comfy.supported_models.SDXL(dict(config))
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32)
    return _save(_checkpoint_state(model_config, _unet(config), clip, generator), path)


def build_sd15_controlnet(path: Path, seed: int = 3) -> Path:
    """A ControlNet (original single-file format, `control_model.` keys) for the SD15 test UNet."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SD15_DETECTABLE_UNET.items() if k not in ("out_channels", "transformer_depth_output")}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float32, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    state = {"control_model." + k: v for k, v in random_state(net, generator).items()}
    return _save(state, path)


def _recipe_key(*parts) -> str:
    return hashlib.sha256(repr((RECIPE, *parts)).encode()).hexdigest()[:12]


def cached(kind: str, log=print) -> Path:
    """The cached file of a kind ("sd15", "sdxl", "sd15-lora", "sd15-controlnet"), built on first use."""
    sdxl_shape = os.environ.get("AD_TEST_SDXL_UNET", "vega")
    builders = {
        "sd15": (lambda p: build_sd15_checkpoint(p), sorted(SD15_DETECTABLE_UNET.items())),
        "sdxl": (lambda p: build_sdxl_checkpoint(p, sdxl_shape), sorted(sdxl_unet_config(sdxl_shape).items())),
        "sd15-lora": (lambda p: write_sd15_lora(p), sorted(SD15_DETECTABLE_UNET.items())),
        "sd15-controlnet": (lambda p: build_sd15_controlnet(p), sorted(SD15_DETECTABLE_UNET.items())),
    }
    build, recipe = builders[kind]
    label = kind if kind != "sdxl" else f"sdxl-{sdxl_shape}"
    path = cache_dir() / f"random-{label}-{_recipe_key(kind, recipe)}.safetensors"
    if not path.is_file():
        start = time.perf_counter()
        build(path)
        log(f"built {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    return path
