"""AD Fine-Tune VAE Decoder: the reference's reconstruction improves, the input VAE never changes,
memory follows the tile, Cancel and bad input are handled."""

from __future__ import annotations

import math

import pytest
import torch
from executor_models import SD_VAE, random_state

# The SD VAE layout with few channels: three downsamplings (8 pixels per latent cell), GroupNorm(32).
SMALL_VAE = {**SD_VAE, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}


def small_vae(dtype: torch.dtype = torch.float32):
    """comfy.sd.VAE with random weights, loaded under inference mode as ComfyUI's executor loads it."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        layout = AutoencoderKL(ddconfig=SMALL_VAE, embed_dim=4)
    state = random_state(layout, torch.Generator().manual_seed(5), dtype=torch.float32)
    config = {"params": {"ddconfig": SMALL_VAE, "embed_dim": 4}}
    with torch.inference_mode():
        return comfy.sd.VAE(sd=state, config=config, dtype=dtype)


def smooth_image(height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """An IMAGE (B, H, W, 3) in [0, 1]: bilinear-upsampled noise, so there is structure to learn."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(1, height // 8), max(1, width // 8), generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return up.movedim(1, -1).contiguous()


def snapshot(vae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.first_stage_model.state_dict().items()}


def assert_same_state(vae, before: dict[str, torch.Tensor]) -> None:
    after = vae.first_stage_model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def finetune(pack, vae, images, epochs=3, lr=1e-4, tile_size=512, seed=0):
    node = pack.nodes.decoder.ADFineTuneVAEDecoder()
    with torch.inference_mode():
        return node.finetune(vae, images, epochs, lr, tile_size, seed)[0]


def encode_mean(pack, vae, images) -> torch.Tensor:
    with torch.inference_mode(), pack.nodes.decoder.posterior_mean(vae.first_stage_model):
        return vae.encode(images)


def decode(vae, latents) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(latents)


def reconstruction_l1(pack, vae_for_decoding, reference_vae, images) -> float:
    """L1 in [0, 1] pixels between the image and the decode of its (reference VAE's) mean latent."""
    return float((decode(vae_for_decoding, encode_mean(pack, reference_vae, images)) - images).abs().mean())


@pytest.fixture(scope="module")
def tuned(pack):
    """One fine-tuning run shared by the checks: 64x64 reference, 30 epochs at lr 1e-3."""
    vae = small_vae()
    image = smooth_image(64, 64)
    state = snapshot(vae)
    latent = encode_mean(pack, vae, image)
    decoded = decode(vae, latent)
    before = reconstruction_l1(pack, vae, vae, image)
    result = finetune(pack, vae, image, epochs=30, lr=1e-3)
    fresh = loaded_state(result.first_stage_model)
    after = reconstruction_l1(pack, result, vae, image)
    print(f"\nreconstruction L1 of the 64x64 reference (30 epochs, lr 1e-3): {before:.4f} -> {after:.4f}")
    return vae, image, state, latent, decoded, result, fresh, before, after


def loaded_state(model: torch.nn.Module) -> tuple[int, int]:
    """What ModelPatcher records about a loaded model: its loaded bytes, and modules marked as patched."""
    marked = sum(1 for m in model.modules() if vars(m).get("comfy_patched_weights"))
    return int(getattr(model, "model_loaded_weight_memory", 0)), marked


# -- the fine-tuned VAE ---------------------------------------------------------------------------------------

def test_reconstruction_of_the_reference_falls(tuned):
    *_, before, after = tuned
    assert after < 0.7 * before, (before, after)


def test_input_vae_is_unchanged(tuned):
    vae, _, state, latent, decoded, result, fresh, *_ = tuned
    assert fresh == (0, 0), "the new patcher must not inherit the input VAE's loaded state"
    assert loaded_state(vae.first_stage_model)[0] > 0, "the input VAE was loaded (by VAE Encode) before the node ran"
    assert result is not vae and result.first_stage_model is not vae.first_stage_model
    assert result.patcher is not vae.patcher and result.patcher.model is result.first_stage_model
    assert_same_state(vae, state)
    assert torch.equal(decode(vae, latent), decoded)
    assert all(p.is_inference() for p in vae.first_stage_model.parameters()), "the original's weights were replaced"


def test_result_shares_the_encoder_and_owns_the_decoder(pack, tuned):
    vae, image, _, latent, decoded, result, *_ = tuned
    original = dict(vae.first_stage_model.named_parameters())
    for name, param in result.first_stage_model.named_parameters():
        source = original[name]
        assert param is not source and param.dtype == source.dtype and not param.requires_grad
        if name.startswith("decoder."):
            assert param.data_ptr() != source.data_ptr()
        else:  # encoder, quant_conv, post_quant_conv: same storage, no copy
            assert param.data_ptr() == source.data_ptr() and torch.equal(param, source), name
    assert not torch.equal(decode(result, latent), decoded)
    torch.manual_seed(0)
    a = encode_mean(pack, vae, image)
    torch.manual_seed(0)
    b = encode_mean(pack, result, image)
    assert torch.equal(a, b), "the returned VAE must encode like the input VAE"
    assert (result.patcher.load_device, result.patcher.offload_device) == (vae.patcher.load_device,
                                                                            vae.patcher.offload_device)


def test_training_targets_are_the_mean_latent_and_the_image_in_minus_one_one(pack, monkeypatch):
    """Like the reference code: the distribution mean (not a sample), L1 against the image scaled to [-1, 1]."""
    module = pack.nodes.decoder
    calls = []
    monkeypatch.setattr(module, "finetune_decoder", lambda decode, params, latents, targets, *a, **k: calls.append(
        (latents, targets)) or [0.0])
    vae = small_vae()
    image = smooth_image(36, 44)  # cropped to 32x40 like VAE Encode: 2 rows off the top, 2 columns off the left
    finetune(pack, vae, image, epochs=1)
    ((latents, targets),) = calls
    model = vae.first_stage_model
    pixels = image[:, 2:34, 2:42].movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        mean = model.quant_conv(model.encoder(pixels)).chunk(2, dim=1)[0]
    assert torch.allclose(latents, mean, atol=1e-5)
    assert torch.equal(targets, pixels)
    assert model.regularization.sample == small_vae().first_stage_model.regularization.sample


def test_loss_falls_with_the_default_lr(pack, monkeypatch):
    module = pack.nodes.decoder
    histories = []

    def spy(*args, **kwargs):
        histories.append(real(*args, **kwargs))
        return histories[-1]

    real = module.finetune_decoder
    monkeypatch.setattr(module, "finetune_decoder", spy)
    vae = small_vae()
    image = smooth_image(64, 64, seed=1)
    before = reconstruction_l1(pack, vae, vae, image)
    result = finetune(pack, vae, image, epochs=8)
    after = reconstruction_l1(pack, result, vae, image)
    (history,) = histories
    print(f"\nlr 1e-4, 8 epochs: training L1 {history[0]:.5f} -> {history[-1]:.5f}, reconstruction {before:.5f} -> {after:.5f}")
    assert len(history) == 8 and history[-1] < history[0]
    assert after < before


def test_low_precision_vae_trains_in_float32_and_keeps_its_dtype(pack, monkeypatch):
    module = pack.nodes.decoder
    seen = []

    def spy(decode, *args, **kwargs):
        return real(lambda z: seen.append(z.dtype) or decode(z), *args, **kwargs)

    real = module.finetune_decoder
    monkeypatch.setattr(module, "finetune_decoder", spy)
    vae = small_vae(torch.bfloat16)
    state = snapshot(vae)
    result = finetune(pack, vae, smooth_image(32, 32), epochs=2, lr=1e-3)
    assert seen and set(seen) == {torch.float32}
    assert {p.dtype for p in result.first_stage_model.parameters()} == {torch.bfloat16}
    assert_same_state(vae, state)


def test_epochs_zero_returns_a_vae_that_decodes_like_the_input(pack):
    vae = small_vae()
    image = smooth_image(32, 32)
    latent = encode_mean(pack, vae, image)
    for result in (finetune(pack, vae, image, epochs=0), finetune(pack, vae, image, epochs=3, lr=0.0)):
        assert torch.equal(decode(result, latent), decode(vae, latent))


# -- tiles ------------------------------------------------------------------------------------------------------

def test_node_trains_large_images_on_tiles(pack, monkeypatch):
    module = pack.nodes.decoder
    shapes = []

    def spy(decode, *args, **kwargs):
        return real(lambda z: shapes.append(tuple(z.shape)) or decode(z), *args, **kwargs)

    real = module.finetune_decoder
    monkeypatch.setattr(module, "finetune_decoder", spy)
    vae = small_vae()
    state = snapshot(vae)
    images = smooth_image(100, 136, batch=2)  # cropped to 96x136 pixels, 12x17 latent cells
    finetune(pack, vae, images, epochs=1, tile_size=64, seed=4)
    assert shapes and all(s == (1, 4, 8, 8) for s in shapes), set(shapes)
    assert len(shapes) == 2 * (2 * 3), "one epoch: the 2x3 tiles that cover 12x17 cells, for each of the 2 images"
    assert_same_state(vae, state)


class PositionDecoder(torch.nn.Module):
    """Pixels from latents by a 1x1 conv and pixel shuffle; records where each crop came from."""

    def __init__(self, scale: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3 * scale * scale, 1)
        self.shuffle = torch.nn.PixelShuffle(scale)
        self.seen: list[tuple[int, int, int, int]] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        index = int(z[0, 3, 0, 0])  # channel 3 holds each cell's flat position
        self.seen.append((index, z.shape[-2], z.shape[-1], z.shape[0]))
        return self.shuffle(self.conv(z))


def position_latents(height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, height, width, generator=g)
    latents[0, 3] = torch.arange(height * width, dtype=torch.float32).reshape(height, width)
    return latents


def test_tiles_cover_the_whole_latent_every_epoch(pack):
    dt = pack.guidance.decoder_tuning
    height, width, tile = 20, 13, 8
    latents = position_latents(height, width)
    targets = torch.rand(1, 3, height * 8, width * 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = PositionDecoder()
    epochs_of_steps = []
    dt.finetune_decoder(model, model.parameters(), latents, targets, epochs=3, lr=1e-3, plan=dt.TilePlan(tile, seed=2),
                        on_step=lambda r: epochs_of_steps.append(r.epoch))
    assert all((h, w, b) == (tile, tile, 1) for _, h, w, b in model.seen)
    for epoch in range(3):
        covered = torch.zeros(height, width, dtype=torch.bool)
        for (index, h, w, _), e in zip(model.seen, epochs_of_steps, strict=True):
            if e == epoch:
                top, left = divmod(index, width)
                covered[top:top + h, left:left + w] = True
        assert covered.all(), f"epoch {epoch} left cells untrained"
    assert len({tuple(s[0] for s, e in zip(model.seen, epochs_of_steps) if e == k) for k in range(3)}) > 1, \
        "tile positions or order must change between epochs"


@pytest.mark.parametrize("length", range(1, 30))
def test_axis_starts_are_the_fewest_whole_tiles_that_cover(pack, length):
    dt = pack.guidance.decoder_tuning
    for tile in range(1, 10):
        count = dt.tiles_along(length, tile)
        assert count == max(1, math.ceil(length / tile))
        for offset in range(count * tile - length + 1 if count > 1 else 1):
            starts = dt.axis_starts(length, tile, offset)
            size = min(tile, length)
            assert len(set(starts)) == count and starts == sorted(starts)
            assert starts[0] == 0 and starts[-1] + size == length
            assert all(b - a <= size for a, b in zip(starts, starts[1:]))


# -- determinism, Cancel, errors --------------------------------------------------------------------------------

def test_training_function_is_deterministic_for_a_seed(pack):
    dt = pack.guidance.decoder_tuning
    latents = position_latents(12, 10)
    targets = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def run(seed: int):
        torch.manual_seed(0)  # the same initial weights for every run: only the tile plan's seed differs
        model = PositionDecoder()
        history = dt.finetune_decoder(model, model.parameters(), latents, targets, epochs=4, lr=1e-2,
                                      plan=dt.TilePlan(4, seed=seed))
        return history, [s[0] for s in model.seen], model.conv.weight.detach().clone()

    a, b, c = run(7), run(7), run(8)
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[1] != c[1] and not torch.equal(a[2], c[2])


def test_training_function_rejects_inference_weights(pack):
    dt = pack.guidance.decoder_tuning
    with torch.inference_mode():
        model = PositionDecoder()
    with pytest.raises(ValueError, match="inference"):
        dt.finetune_decoder(model, model.parameters(), position_latents(2, 2), torch.zeros(1, 3, 16, 16), 1, 1e-3)


def test_cancel_stops_training_and_leaves_everything_as_it_was(pack):
    import comfy.model_management as mm
    import comfy.utils

    vae = small_vae()
    state = snapshot(vae)
    seen = []

    def hook(value, total, preview=None, *args, **kwargs):
        seen.append((value, total))
        if len(seen) == 1:  # ComfyUI always sends a bar's first update (v0.33 throttles the ones after it)
            mm.interrupt_current_processing(True)  # the user presses Cancel during the next epoch

    comfy.utils.set_progress_bar_global_hook(hook)
    node = pack.nodes.decoder.ADFineTuneVAEDecoder()
    try:
        with torch.inference_mode():
            with pytest.raises(mm.InterruptProcessingException):
                node.finetune(vae, smooth_image(32, 32), 6, 1e-3, 512, 0)
            assert torch.is_inference_mode_enabled()
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [(1, 6)], seen
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert not mm.processing_interrupted()
    assert_same_state(vae, state)
    assert getattr(vae.first_stage_model.regularization, "sample", None) == getattr(small_vae().first_stage_model.regularization,
                                                                                     "sample", None)


@pytest.fixture(scope="module")
def plain_vae():
    return small_vae()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": torch.zeros(0, 32, 32, 3)}, "no image"),
        ({"images": torch.zeros(32, 32, 3)}, r"\(B, H, W, C\)"),
        ({"images": torch.zeros(1, 32, 32, 2)}, "3 \\(RGB\\) or 4"),
        ({"images": torch.zeros(1, 4, 32, 3)}, "at least 8x8"),
        ({"images": torch.full((1, 32, 32, 3), math.nan)}, "NaN"),
        ({"images": None}, "not an IMAGE"),
        ({"lr": math.nan}, "'lr' must be a finite number"),
        ({"lr": math.inf}, "'lr' must be a finite number"),
        ({"lr": -1e-4}, "'lr' must be at least 0"),
        ({"epochs": -1}, "'epochs' must be between 0 and 10000"),
        ({"tile_size": 4}, "'tile_size' must be 0"),
        ({"vae": object()}, "not a loaded VAE"),
    ],
)
def test_bad_input_is_reported_clearly(pack, plain_vae, change, message):
    args = {"vae": plain_vae, "images": smooth_image(32, 32), "epochs": 1, "lr": 1e-4, "tile_size": 512, "seed": 0}
    args.update(change)
    node = pack.nodes.decoder.ADFineTuneVAEDecoder()
    with pytest.raises(pack.nodes.errors.ADNodeError, match=message) as caught:
        with torch.inference_mode():
            node.finetune(**args)
    assert str(caught.value).startswith("[AD Fine-Tune VAE Decoder] ")


def test_vae_without_an_image_decoder_is_refused(pack):
    from types import SimpleNamespace

    taesd_like = SimpleNamespace(first_stage_model=torch.nn.Conv2d(4, 3, 1), patcher=None, latent_dim=2,
                                 upscale_ratio=8, downscale_ratio=8)
    with pytest.raises(pack.nodes.errors.ADNodeError, match="no image decoder"):
        finetune(pack, taesd_like, smooth_image(32, 32))


def test_out_of_memory_is_reported_with_advice(pack, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pack.nodes.decoder, "finetune_decoder", out_of_memory)
    vae = small_vae()
    state = snapshot(vae)
    with pytest.raises(pack.nodes.errors.ADNodeError, match="lower tile_size"):
        finetune(pack, vae, smooth_image(32, 32), epochs=1)
    assert_same_state(vae, state)


def test_node_schema(pack):
    cls = pack.NODE_CLASS_MAPPINGS["ADFineTuneVAEDecoder"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ADFineTuneVAEDecoder"] == "AD Fine-Tune VAE Decoder"
    assert cls.RETURN_TYPES == ("VAE", "IMAGE") and cls.RETURN_NAMES == ("vae", "loss_curve") and cls.FUNCTION == "finetune"
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["vae", "images", "epochs", "lr", "tile_size", "seed"]
    assert required["epochs"][1]["default"] == 75 and required["lr"][1]["default"] == 0.0001
    assert required["tile_size"][1]["default"] == 512 and required["tile_size"][1]["step"] == 64
