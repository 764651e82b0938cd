"""AD Fine-Tune VAE Decoder: the paper's improved VAE decoding, on ComfyUI's own VAE."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..guidance.decoder_tuning import StepReport, TilePlan, clone_module, finetune_decoder
from .common import CATEGORY, MAX_SEED, check_interrupt
from .errors import reported_as, require
from .inputs import finite_number, whole_number
from .loss_plot import Series, loss_curve_image
from .progress import NodeProgress

NODE = "AD Fine-Tune VAE Decoder"
MAX_TILE = 16384
TRAINED = "decoder"
# Children of the first stage model that decoding never runs: left out of the training copy.
ENCODE_ONLY = frozenset({"encoder", "quant_conv", "regularization"})
# State ComfyUI's ModelPatcher keeps on the model it manages and on its modules (load device, low-VRAM
# casting). A copy must start without it, as a freshly loaded VAE does, or its new patcher would
# believe it is already loaded wherever the original is.
PATCHER_MODEL_STATE = ("device", "model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
                       "current_weight_patches_uuid", "current_patcher")
PATCHER_MODULE_STATE = ("comfy_cast_weights", "prev_comfy_cast_weights", "weight_function", "bias_function",
                        "comfy_patched_weights")
TRAINING_OOM_ADVICE = ("out of memory while fine-tuning the decoder; lower tile_size (memory follows the tile, "
                       "not the image), or free memory by running the node before loading other models")
log = logging.getLogger(__name__)


def image_decoder_model(vae: Any) -> tuple[torch.nn.Module, int]:
    """The VAE's first stage model and its pixels per latent cell; only 2D image VAEs with a decoder."""
    model = getattr(vae, "first_stage_model", None)
    require(model is not None and hasattr(vae, "patcher"), NODE, "'vae' is not a loaded VAE; connect a VAE output")
    ratio = getattr(vae, "upscale_ratio", None)
    image_vae = getattr(vae, "latent_dim", 2) == 2 and isinstance(ratio, int) and ratio == getattr(vae, "downscale_ratio", None)
    decoder = getattr(model, TRAINED, None)
    require(
        image_vae and isinstance(decoder, torch.nn.Module) and callable(getattr(model, "decode", None)),
        NODE,
        f"this VAE ({type(model).__name__}) has no image decoder to fine-tune; use the full image VAE of "
        "an SD1.x, SD2.x, SDXL, SD3 or Flux checkpoint (not TAESD, video or audio VAEs)",
    )
    return model, ratio


def reference_pixels(images: Any, ratio: int) -> torch.Tensor:
    """RGB of an IMAGE batch, centre-cropped to whole latent cells the way VAE Encode crops."""
    require(isinstance(images, torch.Tensor), NODE, "'images' is not an IMAGE; connect Load Image or another IMAGE output")
    require(images.ndim == 4, NODE, f"'images' must be an IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
    require(images.shape[0] > 0, NODE, "'images' holds no image (batch of zero)")
    require(images.shape[-1] in (3, 4), NODE,
            f"'images' must have 3 (RGB) or 4 (RGBA) channels last, got shape {tuple(images.shape)}")
    height, width = int(images.shape[1]), int(images.shape[2])
    require(height >= ratio and width >= ratio, NODE, f"'images' is {width}x{height}; it must be at least {ratio}x{ratio} pixels")
    require(bool(torch.isfinite(images).all()), NODE, "'images' contains NaN or infinite values")
    top, left = (height % ratio) // 2, (width % ratio) // 2
    return images[:, top:top + height // ratio * ratio, left:left + width // ratio * ratio, :3]


@contextlib.contextmanager
def posterior_mean(model: torch.nn.Module) -> Iterator[None]:
    """Encode to the mean of the latent distribution, like the reference code.

    Older ComfyUI samples from it (DiagonalGaussianRegularizer(sample=True)); the flag is
    switched off for the encode and restored, so the VAE is left as it was."""
    regularizer = getattr(model, "regularization", None)
    if not getattr(regularizer, "sample", False):
        yield
        return
    regularizer.sample = False
    try:
        yield
    finally:
        regularizer.sample = True


def forget_patcher_state(model: torch.nn.Module) -> None:
    """Drop ModelPatcher bookkeeping copied from the original, leaving the class defaults."""
    for name in PATCHER_MODEL_STATE:
        model.__dict__.pop(name, None)
    for module in model.modules():
        for name in PATCHER_MODULE_STATE:
            module.__dict__.pop(name, None)


def decoding_children(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The children that decoding runs (the decoder, post_quant_conv where there is one)."""
    return {n: c for n, c in model.named_children() if n not in ENCODE_ONLY}


def training_view(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A float32 copy of the decoding path on `device` with only the decoder trainable; the encoder
    is left out (shared, never run). Call outside inference mode: the copies are normal tensors."""

    def fp32_copy(name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        return t.detach().to(device=device, dtype=dtype, copy=True)

    view = copy.copy(model)
    view._parameters = {n: torch.nn.Parameter(fp32_copy(n, p), requires_grad=False)
                        for n, p in model._parameters.items() if p is not None}
    view._buffers = {n: fp32_copy(n, b) for n, b in model._buffers.items() if b is not None}
    children = dict(model._modules)
    for name, child in decoding_children(model).items():
        children[name] = clone_module(child, fp32_copy, trainable=lambda _, trained=name == TRAINED: trained)
        forget_patcher_state(children[name])
    view._modules = children
    return view


def tuned_vae(vae: Any, trained: dict[str, torch.Tensor]) -> Any:
    """A new VAE around a new first stage model: the fine-tuned decoder in the VAE's dtypes, every
    other weight shared with the input VAE (same storage, own Parameter objects), its own patcher."""
    import comfy.model_patcher

    model = vae.first_stage_model
    offload = vae.patcher.offload_device

    def make(name: str, t: torch.Tensor) -> torch.Tensor:
        return trained.get(name, t).to(device=offload, dtype=t.dtype)

    clone = clone_module(model, make)
    forget_patcher_state(clone)
    result = copy.copy(vae)
    result.first_stage_model = clone
    result.patcher = comfy.model_patcher.ModelPatcher(clone, load_device=vae.patcher.load_device, offload_device=offload)
    return result


def training_memory(vae: Any, model: torch.nn.Module, tile_latent: tuple[int, ...]) -> int:
    """Bytes to free before training: float32 weights of the decoding path, gradients and Adam state of the
    decoder, and the tile's activations."""
    weights = sum(p.numel() * 4 for c in decoding_children(model).values() for p in c.parameters())
    trainable = sum(p.numel() * 4 for p in getattr(model, TRAINED).parameters())
    try:
        activations = int(vae.memory_used_decode(tile_latent, torch.float32)) * 3  # kept for the backward pass
    except Exception:  # odd VAEs: let ComfyUI decide
        activations = 0
    return weights + 3 * trainable + activations


class ADFineTuneVAEDecoder:
    DESCRIPTION = (
        "Fine-tunes a copy of the VAE decoder on the reference image(s) so that decoding gives back "
        "their fine detail (the paper's improved VAE decoding): L1 reconstruction of the reference, "
        "Adam on the decoder only. Decode the AD result with the returned VAE; the input VAE is not "
        "changed. Large images train a tile at a time, so memory follows tile_size."
    )
    CATEGORY = CATEGORY
    FUNCTION = "finetune"
    RETURN_TYPES = ("VAE", "IMAGE")
    RETURN_NAMES = ("vae", "loss_curve")
    OUTPUT_TOOLTIPS = ("A VAE with the fine-tuned decoder (encoder shared with the input VAE): use it in VAE Decode "
                       "for the AD result.",
                       "Plot of the reference's L1 reconstruction loss at every epoch: wire it to Preview Image. "
                       "Healthy: it falls steadily and flattens out; a rising curve means lr is too high.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE (the one the AD latent will be decoded with). It is not modified."}),
                "images": ("IMAGE", {"tooltip": "The reference image(s) whose look the decoder should reproduce; "
                                     "a batch trains on all of them."}),
                "epochs": ("INT", {"default": 75, "min": 0, "max": 10000,
                                   "tooltip": "Training epochs (reference code: 75). Each is one Adam step per tile. "
                                   "0 returns the input VAE."}),
                "lr": ("FLOAT", {"default": 0.0001, "min": 0.0, "max": 0.01, "step": 0.00001,
                                 "tooltip": "Adam learning rate on the decoder weights (reference code: 0.0001). 0 returns the input VAE."}),
                "tile_size": ("INT", {"default": 512, "min": 0, "max": MAX_TILE, "step": 64,
                                      "tooltip": "Images larger than this (pixels) train on tiles of this size, so memory "
                                      "stays bounded. 0 = whole images. Lower it if memory runs out."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                 "tooltip": "Seed of the tile positions and order (only used when the images are tiled)."}),
            },
        }

    def finetune(self, vae, images, epochs, lr, tile_size, seed):
        with reported_as(NODE, oom_advice=TRAINING_OOM_ADVICE):
            model, ratio = image_decoder_model(vae)
            pixels = reference_pixels(images, ratio)
            epochs = whole_number(NODE, epochs, "epochs", 0, 10000)
            lr = finite_number(NODE, lr, "lr", minimum=0.0)
            tile_size = whole_number(NODE, tile_size, "tile_size", 0, MAX_TILE)
            require(tile_size == 0 or tile_size >= ratio, NODE,
                    f"'tile_size' must be 0 (no tiling) or at least {ratio} pixels, got {tile_size}")
            seed = whole_number(NODE, seed, "seed", 0, MAX_SEED)
            if epochs == 0 or lr == 0:
                log.warning("%s: epochs or lr is 0, so the node returns its VAE unchanged", NODE)
                return (vae, loss_curve_image([], "epoch", NODE, note="nothing trained: epochs or lr is 0"))
            with posterior_mean(model):
                latents = vae.encode(pixels)
            targets = vae.process_input(pixels).movedim(-1, 1)
            check_interrupt()
            trained, history = self._train(vae, model, latents, targets, epochs, lr, TilePlan(tile_size // ratio, seed))
            curve = loss_curve_image([Series("reconstruction L1", history)], "epoch", NODE)
            return (tuned_vae(vae, trained), curve)

    @staticmethod
    def _train(vae: Any, model: torch.nn.Module, latents: torch.Tensor, targets: torch.Tensor, epochs: int,
               lr: float, plan: TilePlan) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Fine-tune a float32 copy of the decoder; return its weights by their name in the first stage model,
        and the loss of every epoch."""
        import comfy.model_management

        device = vae.device
        tile = (1, latents.shape[1], min(plan.tile or latents.shape[-2], latents.shape[-2]),
                min(plan.tile or latents.shape[-1], latents.shape[-1]))

        def on_step(report: StepReport) -> None:
            check_interrupt()

        comfy.model_management.free_memory(training_memory(vae, model, tile), device)
        # Copy the decoder as this VAE decodes: loaded, with its object patches (AD Seamless Tiling's
        # circular convolutions) in place, so a fine-tuned tiled VAE still tiles.
        comfy.model_management.load_models_gpu([vae.patcher])
        with torch.inference_mode(False):
            view = training_view(model, device)
        decoder = getattr(view, TRAINED)
        with NodeProgress(NODE, epochs, unit="epoch") as progress:

            def on_epoch(epoch: int, loss: float) -> None:
                progress.update(epoch + 1, f"epoch {epoch + 1}/{epochs}\nreconstruction L1 {loss:.4g}", l1=loss)

            history = finetune_decoder(view.decode, decoder.parameters(), latents, targets, epochs, lr, plan,
                                       on_step=on_step, on_epoch=on_epoch)
        log.info("%s: reference L1 %.4f in the first epoch, %.4f in the last (%d epochs)", NODE, history[0],
                 history[-1], epochs)
        return {f"{TRAINED}.{name}": p.detach() for name, p in decoder.named_parameters()}, history
