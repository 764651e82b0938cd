"""Random-weight model files that ComfyUI's own loaders detect as SD1.5, SDXL and FLUX.1-dev, for the GPU check
(docs/gpu-check.md). Nothing is downloaded: every state dict comes from ComfyUI's own classes built on the meta
device, converted to the file layout with the model config's own `*_for_saving` functions where a checkpoint
bundles several models, and written tensor by tensor (a full FLUX.1 never sits in memory at once).

Values: weights N(0, 1/fan_in), biases 0, other one-dimensional parameters (norm scales) 1. Scales:

- "full": the real architectures (SD1.5 UNet 860M, SDXL UNet 2.6B, FLUX.1-dev 11.9B parameters in fp8 e4m3fn)
  with their real text encoders (CLIP-L; CLIP-L + CLIP-G; CLIP-L + T5-XXL in fp8 e4m3fn) and VAEs;
- "tiny": the smallest UNets ComfyUI still detects as each family (a one-level SD1.5 UNet, Segmind Vega for
  SDXL, a 2-head FLUX.1-dev with 1 double and 2 single blocks), for a CPU rehearsal. Text encoders and VAEs
  stay full size: ComfyUI builds them from fixed configs (T5-XXL always has 4.7B parameters).

Needs a ComfyUI tree importable as `comfy` (scripts/gpucheck/launch.py boots it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path

# Folder (ComfyUI's model folder name) and file name of each model file, by kind and scale.
KINDS = {
    "sd15": "checkpoints", "sdxl": "checkpoints", "flux": "diffusion_models",
    "clip_l": "text_encoders", "t5xxl": "text_encoders", "flux_vae": "vae",
}
FAMILY_KINDS = {"sd15": ("sd15",), "sdxl": ("sdxl",), "flux": ("flux", "clip_l", "t5xxl", "flux_vae")}

SD15_FULL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, use_spatial_transformer=True, legacy=False,
    use_checkpoint=False,
)
SD15_TINY = dict(SD15_FULL, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=-1)
SDXL_COMMON = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
)
SDXL_FULL = dict(SDXL_COMMON, transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
SDXL_TINY = dict(SDXL_COMMON, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=1,  # Segmind Vega
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2])
FLUX_FULL = dict(
    in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
)
# ComfyUI's detection reads the width from img_in and sets 128-channel heads (sum of axes_dim).
FLUX_TINY = dict(FLUX_FULL, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=2)
UNETS = {"full": {"sd15": SD15_FULL, "sdxl": SDXL_FULL, "flux": FLUX_FULL},
         "tiny": {"sd15": SD15_TINY, "sdxl": SDXL_TINY, "flux": FLUX_TINY}}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
FLUX_VAE = dict(SD_VAE, z_channels=16)
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
                      "int64": "I64", "int32": "I32"}


def file_name(kind: str, scale: str) -> str:
    return f"{kind}-{scale}-random.safetensors"


def relative_path(kind: str, scale: str) -> str:
    return f"{KINDS[kind]}/{file_name(kind, scale)}"


def _state(module) -> dict:
    return dict(module.state_dict())


def _unet(config: dict):
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)


def _sd_vae(ddconfig: dict):
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])


def checkpoint_spec(family: str, scale: str) -> dict:
    """An SD1.5 or SDXL single-file checkpoint: UNet, text encoder(s) and VAE, in the layout ComfyUI saves."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models

    config = UNETS[scale][family]
    if family == "sd15":
        model_config = comfy.supported_models.SD15(dict(config))
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
    else:
        model_config = comfy.supported_models.SDXL(dict(config))
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta")
    spec = model_config.process_unet_state_dict_for_saving(_state(_unet(config)))
    spec.update(model_config.process_clip_state_dict_for_saving(_state(clip)))
    spec.update(model_config.process_vae_state_dict_for_saving(_state(_sd_vae(SD_VAE))))
    return spec


def flux_config(scale: str) -> dict:
    """The FLUX.1-dev parameters this host's FluxParams declares (older hosts lack `txt_ids_dims`)."""
    from comfy.ldm.flux.model import FluxParams

    declared = {field.name for field in dataclasses.fields(FluxParams)}
    return {k: v for k, v in UNETS[scale]["flux"].items() if k in declared}


def flux_spec(scale: str) -> dict:
    """The diffusion model alone, as ComfyUI's "Load Diffusion Model" (UNETLoader) reads it."""
    import comfy.ops
    import torch
    from comfy.ldm.flux.model import Flux

    return _state(Flux(image_model="flux", **flux_config(scale), dtype=torch.float32, device="meta",
                       operations=comfy.ops.disable_weight_init))


def text_encoder_spec(kind: str) -> dict:
    """CLIP-L or T5-XXL as DualCLIPLoader (type flux) loads them: the encoder's transformer state dict."""
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip

    model = (comfy.sd1_clip.SDClipModel(device="meta") if kind == "clip_l"
             else comfy.text_encoders.sd3_clip.T5XXLModel(device="meta"))
    return _state(model.transformer)


def flux_vae_spec() -> dict:
    """The 16-channel FLUX.1 autoencoder (ae.safetensors layout: encoder.*, decoder.*, no quant convs)."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    target = "comfy.ldm.modules.diffusionmodules.model."
    with torch.device("meta"):
        engine = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": target + "Encoder", "params": FLUX_VAE},
            decoder_config={"target": target + "Decoder", "params": FLUX_VAE})
    return _state(engine)


def spec_of(kind: str, scale: str) -> tuple[dict, "object"]:
    """(name → meta or real tensor, storage dtype) of one file."""
    import torch

    if kind in ("sd15", "sdxl"):
        return checkpoint_spec(kind, scale), torch.float16
    if kind == "flux":
        return flux_spec(scale), torch.float8_e4m3fn
    if kind == "clip_l":
        return text_encoder_spec(kind), torch.float16
    if kind == "t5xxl":
        return text_encoder_spec(kind), torch.float8_e4m3fn
    if kind == "flux_vae":
        return flux_vae_spec(), torch.float32
    raise ValueError(f"unknown model kind {kind!r}")


def random_value(name: str, template, dtype, generator, device):
    """The tensor written for `name`: a real template as it is, else a random weight, a zero bias or a unit scale."""
    import torch

    if template.device.type != "meta":
        return template
    if not template.dtype.is_floating_point:
        return torch.arange(template.shape[-1]).expand(tuple(template.shape)).clone()
    shape = tuple(template.shape)
    if len(shape) >= 2:
        values = torch.randn(shape, generator=generator, device=device) / math.sqrt(math.prod(shape[1:]))
    elif name.rsplit(".", 1)[-1].endswith("bias"):
        values = torch.zeros(shape, device=device)
    else:
        values = torch.ones(shape, device=device)
    return values.to(dtype)


def recipe(spec: dict, dtype) -> str:
    """A digest of names, shapes and the storage dtype: a file written from the same recipe is reused."""
    text = json.dumps(sorted((k, list(v.shape), str(v.dtype)) for k, v in spec.items())) + str(dtype)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_safetensors(path: Path, spec: dict, make: Callable, metadata: dict[str, str]) -> int:
    """Write a safetensors file one tensor at a time: `make(name, template)` gives each tensor. Returns bytes."""
    import torch

    names = sorted(spec)
    header: dict = {"__metadata__": metadata}
    offset, tensors = 0, {}
    for name in names:
        template = spec[name]
        value_dtype = make(name, template, probe=True)
        size = math.prod(template.shape) * torch.empty((), dtype=value_dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(value_dtype).removeprefix("torch.")],
                        "shape": list(template.shape), "data_offsets": [offset, offset + size]}
        tensors[name] = size
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            value = make(name, spec[name]).detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            assert value.numel() == tensors[name], name
            out.write(value.numpy().data)
    partial.replace(path)
    return 8 + len(encoded) + offset


def stored_recipe(path: Path) -> str | None:
    """The recipe digest in an existing file's header, or None."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(length)).get("__metadata__", {}).get("ad_gpu_check_recipe")
    except (OSError, ValueError, struct.error):
        return None


def build(kind: str, scale: str, models_dir: Path, device: str, seed: int = 0, log=print) -> Path:
    """Write (or reuse) one model file under models_dir/<folder>/."""
    import torch

    spec, dtype = spec_of(kind, scale)
    path = models_dir / relative_path(kind, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = recipe(spec, dtype)
    if path.is_file() and stored_recipe(path) == digest:
        log(f"reusing {path.name}")
        return path
    generator = torch.Generator(device=device).manual_seed(seed)

    def make(name, template, probe=False):
        if probe:
            return template.dtype if template.device.type != "meta" or not template.dtype.is_floating_point else dtype
        return random_value(name, template, dtype, generator, device)

    start = time.perf_counter()
    size = write_safetensors(path, spec, make, {"ad_gpu_check_recipe": digest, "format": "pt"})
    log(f"built {path.name}: {size / 2**30:.2f} GiB, {sum(math.prod(v.shape) for v in spec.values()) / 1e9:.2f}B "
        f"values in {time.perf_counter() - start:.0f} s")
    return path


def build_family_files(families: list[str], scale: str, models_dir: Path, device: str, log=print) -> dict:
    """Every file the families' graphs load; returns kind → path."""
    return {kind: build(kind, scale, models_dir, device, log=log)
            for family in families for kind in FAMILY_KINDS[family]}
