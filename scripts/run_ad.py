"""Run the pack's main job headless: style transfer and texture synthesis with Latent AD Optimize.

The pack is loaded by path, as ComfyUI loads a custom node, and its node classes are called directly
inside `torch.inference_mode()`, as ComfyUI's executor calls them:

    Load Checkpoint → CLIP Text Encode ("") ─┐
    Load Image → VAE Encode (style) ─────────┴→ Capture Reference Attention ─┐
    Load Image → VAE Encode (content) or Empty Latent Image ─────────────────┴→ Latent AD Optimize
                                                                               → VAE Decode → PNG

With --checkpoint (an SD1.5 or SDXL single-file .safetensors) it uses the reference code's settings
(512², style transfer: 200 steps, content weight 0.25; texture: 300 steps, content weight 0; lr 0.05,
1 iteration). Without one it builds a random-weight SD1.5-format checkpoint once (cached in
.ad-cache/) and runs small, fast settings: the pipeline is real, the pictures are meaningless.

    python scripts/run_ad.py [--checkpoint PATH] [--images DIR] [--output DIR] [--size N] [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))  # shared helpers: comfy_env (boot), pack_loader, checkpoints, executor_models
DEFAULT_IMAGES = REPO / "example-images"  # shipped with the pack: see SOURCE.md there
CONTENT_IMAGE = "content-deer.jpg"
STYLE_IMAGE = "style-1.jpg"
TEXTURE_IMAGE = "texture-17.jpg"
PACK_NAME = "attention_distillation_quickstart"

# The reference code's defaults (docs/DESIGN.md §2.6) for a real checkpoint.
REAL_SIZE = 512
STYLE_SETTINGS = {"steps": 200, "lr": 0.05, "iterations": 1, "content_weight": 0.25}
TEXTURE_SETTINGS = {"steps": 300, "lr": 0.05, "iterations": 1, "content_weight": 0.0}
# Small and fast for the random-weight demonstration.
RANDOM_SIZE = 256
RANDOM_STEPS = 10

# Bump when the random checkpoint's recipe changes, so a stale cached file is not reused (the UNet
# configuration is part of the file name too).
RANDOM_RECIPE = 1
RANDOM_WARNING = (
    "NOTE: no --checkpoint given, so this run uses a RANDOM-WEIGHT model (a small SD1.5-format UNet and a\n"
    "      full-size SD VAE, no text encoder). It exercises the real pipeline end to end, but the\n"
    "      pictures it writes are MEANINGLESS noise patterns. Pass --checkpoint PATH to a real SD1.5 or\n"
    "      SDXL .safetensors file for real results."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 or SDXL single-file .safetensors checkpoint")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help=f"folder with {CONTENT_IMAGE}, {STYLE_IMAGE} and {TEXTURE_IMAGE} (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO / "output", help="where PNGs go (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=REPO / ".ad-cache",
                        help="where the random-weight checkpoint is kept (default: %(default)s)")
    parser.add_argument("--size", type=int, help=f"image side in pixels, a multiple of 8 (default: {REAL_SIZE} with "
                        f"a checkpoint, {RANDOM_SIZE} without)")
    parser.add_argument("--steps", type=int, help=f"timesteps for both tasks (default: {STYLE_SETTINGS['steps']} style, "
                        f"{TEXTURE_SETTINGS['steps']} texture with a checkpoint; {RANDOM_STEPS} without)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the texture's start noise (default: %(default)s)")
    parser.add_argument("--task", choices=("both", "style", "texture"), default="both", help="what to run (default: both)")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                        help="a ComfyUI source tree to use instead of the installed `comfy` package (default: $COMFYUI_PATH)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's and the pack's INFO logs")
    args = parser.parse_args(argv)
    if args.size is not None and (args.size < 64 or args.size % 8):
        parser.error("--size must be a multiple of 8, at least 64")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        parser.error("--steps must be between 1 and 1000")
    return args


# -- ComfyUI and the pack ------------------------------------------------------------------------------

def boot_comfy(comfyui: Path | None, force_cpu: bool) -> None:
    """Make `import comfy` work: an optional source tree first on sys.path, torchvision stubbed where
    it cannot be imported, the CPU chosen before `comfy.model_management` is imported when no GPU is there."""
    if comfyui is not None:
        if not (comfyui / "comfy" / "sd.py").is_file():
            sys.exit(f"error: {comfyui} is not a ComfyUI source tree (no comfy/sd.py)")
        sys.path.insert(0, str(comfyui.resolve()))
    from comfy_env import stub_torchvision  # stubs torchvision only where it cannot be imported

    stub_torchvision()
    import comfy.cli_args

    mps = getattr(torch.backends, "mps", None)
    if force_cpu or not (torch.cuda.is_available() or (mps is not None and mps.is_available())):
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # reads args.cpu when first imported


# -- the random-weight checkpoint -----------------------------------------------------------------------

def _random_state(module: torch.nn.Module, prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random fp16 weights for every parameter of a (meta) module (the tests' recipe: normalization
    scales 1, biases 0, other weights N(0, 1/fan_in)), keys prefixed for a single-file checkpoint."""
    from executor_models import random_state

    state = random_state(module, generator)
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"no random value for buffers {sorted(missing)[:5]}")
    return {prefix + key: value for key, value in state.items()}


def build_random_checkpoint(path: Path, seed: int = 0) -> None:
    """An SD1.5 single-file checkpoint with random weights that ComfyUI's detection reads as SD15:
    a one-level UNet (320 channels, 768 context, conv proj_in, 3 self-attention layers, ~21M
    parameters) and a full-size SD VAE. No text encoder: the run uses zero conditioning."""
    import comfy.ops
    import safetensors.torch
    from checkpoints import SD15_DETECTABLE_UNET  # the tests' SD15-detectable UNet configuration
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SD15_DETECTABLE_UNET, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    # The SD1.x/SD2.x VAE, as comfy.sd.VAE builds it for a state dict with `quant_conv`.
    vae_config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=vae_config, embed_dim=4)

    generator = torch.Generator().manual_seed(seed)
    state = _random_state(unet, "model.diffusion_model.", generator)
    state.update(_random_state(vae, "first_stage_model.", generator))
    # The encoder's log-variance channels: strongly negative, so VAE Encode is nearly deterministic.
    state["first_stage_model.quant_conv.bias"][4:] = -20.0

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file(state, str(partial))
    partial.replace(path)


def random_checkpoint(cache: Path) -> Path:
    from checkpoints import SD15_DETECTABLE_UNET

    key = hashlib.sha256(repr((RANDOM_RECIPE, sorted(SD15_DETECTABLE_UNET.items()))).encode()).hexdigest()[:12]
    path = cache / f"random-sd15-{key}.safetensors"
    if path.is_file():
        print(f"random-weight checkpoint: {path} (cached)")
        return path
    start = time.perf_counter()
    build_random_checkpoint(path)
    print(f"random-weight checkpoint: built {path} ({path.stat().st_size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - start:.1f} s")
    return path


# -- images ---------------------------------------------------------------------------------------------

def load_image(path: Path, size: int) -> torch.Tensor:
    """An IMAGE (1, H, W, 3) float in [0, 1], resized to size×size like the reference code's loader."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


def save_png(image: torch.Tensor, path: Path) -> None:
    """What ComfyUI's Save Image writes for the first image of an IMAGE batch."""
    import numpy as np
    from PIL import Image

    pixels = np.clip(255.0 * image[0].float().cpu().numpy(), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# -- the run --------------------------------------------------------------------------------------------

def empty_prompt_conditioning(clip, random_weights: bool) -> list:
    """CLIP Text Encode with empty text; all zeros when the checkpoint has no text encoder."""
    if clip is None:
        if not random_weights:
            sys.exit("error: the checkpoint has no text encoder (CLIP) weights; use a full SD1.5/SDXL checkpoint")
        return [[torch.zeros(1, 77, 768), {}]]
    tokens = clip.tokenize("")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def check_text_encoder_files() -> None:
    """The ComfyUI core on PyPI (notcomfy) ships without CLIP's tokenizer and configuration files, so
    it cannot load a checkpoint's text encoder; say what to do instead of failing deep inside it."""
    import comfy

    core = Path(comfy.__file__).parent
    missing = [name for name in ("sd1_tokenizer/vocab.json", "sd1_clip_config.json") if not (core / name).is_file()]
    if missing:
        sys.exit(
            f"error: this ComfyUI core ({core}) lacks {', '.join(missing)}, so it cannot load the text encoder\n"
            "       that encodes the empty prompt of a real checkpoint (the `notcomfy` package from PyPI ships\n"
            "       without them). Run with a ComfyUI checkout, from ComfyUI's own Python environment:\n"
            "         COMFYUI_PATH=/path/to/ComfyUI AD_PYTHON=/path/to/ComfyUI/venv/bin/python \\\n"
            "           bash scripts/quickstart.sh --checkpoint MODEL.safetensors"
        )


def progress_printer(label: str):
    """A ComfyUI progress-bar hook that prints about ten lines per task."""
    state = {"start": time.perf_counter(), "shown": -1}

    def hook(value, total, *args, **kwargs) -> None:
        tenth = int(10 * value / max(total, 1))
        if tenth != state["shown"]:
            state["shown"] = tenth
            print(f"  {label}: step {value}/{total}  {time.perf_counter() - state['start']:.1f} s", flush=True)

    return hook


def run_task(pack, label, model, vae, conditioning, reference_image, latent, settings, seed, output: Path):
    """Capture Reference Attention → Latent AD Optimize → VAE Decode → PNG, like a ComfyUI graph."""
    import comfy.utils

    capture = pack.NODE_CLASS_MAPPINGS["CaptureReferenceAttention"]()
    optimize = pack.NODE_CLASS_MAPPINGS["LatentADOptimize"]()
    start = time.perf_counter()
    reference = {"samples": vae.encode(reference_image[:, :, :, :3])}
    (ad_reference,) = getattr(capture, capture.FUNCTION)(model, reference, conditioning, "paper default")
    comfy.utils.set_progress_bar_global_hook(progress_printer(label))
    try:
        result, _loss_curve = getattr(optimize, optimize.FUNCTION)(model, ad_reference, latent, seed=seed, **settings)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    image = vae.decode(result["samples"])
    save_png(image, output)
    seconds = time.perf_counter() - start
    print(f"{label}: {settings['steps']} steps in {seconds:.1f} s → {output}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    images = {name: args.images / name for name in (CONTENT_IMAGE, STYLE_IMAGE, TEXTURE_IMAGE)}
    missing = [str(p) for p in images.values() if not p.is_file()]
    if missing:
        sys.exit(f"error: reference images not found: {', '.join(missing)} (use --images DIR)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        sys.exit(f"error: checkpoint not found: {args.checkpoint}")

    random_weights = args.checkpoint is None
    if random_weights:
        print(RANDOM_WARNING)
    size = args.size or (RANDOM_SIZE if random_weights else REAL_SIZE)
    style = dict(STYLE_SETTINGS, steps=args.steps or (RANDOM_STEPS if random_weights else STYLE_SETTINGS["steps"]))
    texture = dict(TEXTURE_SETTINGS, steps=args.steps or (RANDOM_STEPS if random_weights else TEXTURE_SETTINGS["steps"]))

    total_start = time.perf_counter()
    boot_comfy(args.comfyui, args.cpu)
    import comfy
    import comfy.model_management
    import comfy.sd
    from pack_loader import load_pack

    pack = load_pack(PACK_NAME)  # by path, under an arbitrary package name, as ComfyUI loads custom nodes
    print(f"ComfyUI core: {Path(comfy.__file__).parent}; device: {comfy.model_management.get_torch_device()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pack loaded by path from {REPO} as '{PACK_NAME}': {', '.join(pack.NODE_DISPLAY_NAME_MAPPINGS.values())}")

    checkpoint = random_checkpoint(args.cache) if random_weights else args.checkpoint
    if not random_weights:
        check_text_encoder_files()
    prefix = "random-weights_" if random_weights else ""
    written: list[Path] = []
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        start = time.perf_counter()
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
        conditioning = empty_prompt_conditioning(clip, random_weights)
        print(f"loaded {checkpoint.name} as {type(model.model.model_config).__name__} in {time.perf_counter() - start:.1f} s")

        if args.task in ("both", "style"):
            content = load_image(images[CONTENT_IMAGE], size)
            content_latent = {"samples": vae.encode(content[:, :, :, :3])}
            out = args.output / f"{prefix}style-transfer_{images[CONTENT_IMAGE].stem}_{images[STYLE_IMAGE].stem}.png"
            run_task(pack, "style transfer", model, vae, conditioning, load_image(images[STYLE_IMAGE], size),
                     content_latent, style, args.seed, out)
            written.append(out)
        if args.task in ("both", "texture"):
            empty = {"samples": torch.zeros(1, 4, size // 8, size // 8)}  # Empty Latent Image
            out = args.output / f"{prefix}texture-synthesis_{images[TEXTURE_IMAGE].stem}.png"
            run_task(pack, "texture synthesis", model, vae, conditioning, load_image(images[TEXTURE_IMAGE], size),
                     empty, texture, args.seed, out)
            written.append(out)

    print(f"total: {time.perf_counter() - total_start:.1f} s at {size}x{size}")
    print("wrote:")
    for path in written:
        print(f"  {path}")
    if random_weights:
        print("(random weights: these pictures are meaningless; they only show that the pipeline runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
