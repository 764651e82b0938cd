"""AD Seamless Tiling: circular convolutions in MODEL and VAE clones, through ModelPatcher object
patches, on tiny random-weight models; the originals must come out of every use unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, optimize, pack_modules
from executor_models import random_state

H, W = 8, 12  # latent size of the UNet checks: non-square, so that axis mix-ups show
UNET_STRIDE = 2  # total downsampling of the tiny UNet (channel_mult [1, 2]): equivariant shifts are multiples
VAE_SCALE = 8
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
              "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
COND = tm.conditioning("sd15", seed=1)
NEG = tm.conditioning("sd15", seed=2)
SHIFTS = {"x": (0, UNET_STRIDE * 2), "y": (UNET_STRIDE, 0), "xy": (UNET_STRIDE, UNET_STRIDE * 2)}


@pytest.fixture(scope="module")
def mods(pack):
    return pack_modules(tiling="attention.tiling", node="nodes.tiling", errors="nodes.errors",
                        session="attention.session", guidance="nodes.guidance", windows="guidance.windows")


def build_vae(seed: int = 0):
    """A small SD-layout VAE (ch 32) with random weights, through comfy.sd.VAE like Load VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        skeleton = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    state = random_state(skeleton, torch.Generator().manual_seed(seed), torch.float32)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=state, config={"params": {"embed_dim": 4, "ddconfig": VAE_CONFIG}})


@pytest.fixture(scope="module", autouse=True)
def unload_at_the_end():
    """Leave no tiled clone loaded for the next test module."""
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def unet():
    with torch.inference_mode():
        return tm.build("sd15", seed=0)


@pytest.fixture(scope="module")
def vae():
    return build_vae()


def tile(mods, model, vae, tiling="both"):
    with torch.inference_mode():
        return mods.node.ADSeamlessTiling().apply(model, vae, tiling)


def unet_out(patcher, x: torch.Tensor, t: float = 500.0) -> torch.Tensor:
    """The UNet output of a patcher, loaded the way samplers load it (object and weight patches applied)."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        timesteps = torch.full((x.shape[0],), t)
        return patcher.model.diffusion_model(x, timesteps=timesteps, context=COND[0][0]).clone()


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(z).clone()


def roll(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the spatial dims of a latent (B, C, H, W) around the edges."""
    return torch.roll(t, (dy, dx), (-2, -1))


def roll_image(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The same for a decoded IMAGE (B, H, W, C)."""
    return torch.roll(img, (dy, dx), (1, 2))


def latent(seed: int, shape=(1, 4, H, W), scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- schema and errors ---------------------------------------------------------------------------


def test_node_schema_and_registration(pack, mods):
    cls = pack.NODE_CLASS_MAPPINGS["ADSeamlessTiling"]
    assert cls is mods.node.ADSeamlessTiling
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ADSeamlessTiling"] == "AD Seamless Tiling"
    spec = cls.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "vae", "tiling"]
    assert spec["tiling"][0] == ["both", "x only", "y only"] and spec["tiling"][1]["default"] == "both"
    assert all(definition[1]["tooltip"] for definition in spec.values())
    assert (cls.RETURN_TYPES, cls.RETURN_NAMES, cls.FUNCTION) == (("MODEL", "VAE"), ("model", "vae"), "apply")
    assert len(cls.OUTPUT_TOOLTIPS) == 2 and cls.CATEGORY == "Attention Distillation" and len(cls.DESCRIPTION) > 40


class _Patcher(SimpleNamespace):
    def clone(self):
        return self

    def add_object_patch(self, name, obj):
        raise AssertionError("must not be reached")


def test_bad_inputs_are_clear_errors(mods, unet, vae):
    import comfy.model_patcher

    error = mods.errors.ADNodeError
    node = mods.node.ADSeamlessTiling()
    with pytest.raises(error, match=r"\[AD Seamless Tiling\] 'tiling' must be one of both, x only, y only; got 'diagonal'"):
        node.apply(unet, vae, "diagonal")
    flux_like = _Patcher(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2),
                                               latent_format=SimpleNamespace(latent_channels=16)))
    with pytest.raises(error, match=r"\[AD Seamless Tiling\].*SD1.x, SD2.x or SDXL"):
        node.apply(flux_like, vae, "both")
    with pytest.raises(error, match="'model' must be a MODEL"):
        node.apply(object(), vae, "both")
    with pytest.raises(error, match="'vae' must be a VAE"):
        node.apply(unet, object(), "both")
    with pytest.raises(error, match="holds no model"):
        node.apply(unet, SimpleNamespace(patcher=vae.patcher, first_stage_model=None), "both")
    linear = comfy.model_patcher.ModelPatcher(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cpu"),
                                              torch.device("cpu"))
    with pytest.raises(error, match="no zero-padded 2-D convolutions"):
        node.apply(unet, SimpleNamespace(patcher=linear, first_stage_model=linear.model), "both")


# -- circularity: exact equivariance under rolls -------------------------------------------------


@pytest.mark.parametrize("tiling, wrapped", [("both", "xy"), ("x only", "x"), ("y only", "y")])
def test_vae_decoder_wraps_exactly_on_its_axes(mods, unet, vae, tiling, wrapped):
    _, tiled = tile(mods, unet, vae, tiling)
    z = latent(5, (1, 4, 6, 8))
    image = decode(tiled, z)
    for axis, (dy, dx) in {"x": (0, 1), "y": (1, 0)}.items():
        rolled = decode(tiled, roll(z, dy, dx))
        error = (rolled - roll_image(image, dy * VAE_SCALE, dx * VAE_SCALE)).abs().max().item()
        if axis in wrapped:
            assert error < 1e-4, (tiling, axis, error)
        else:
            assert error > 0.1, (tiling, axis, error)
    untiled = decode(vae, z)
    assert (decode(vae, roll(z, 1, 1)) - roll_image(untiled, VAE_SCALE, VAE_SCALE)).abs().max() > 0.1


@pytest.mark.parametrize("tiling, wrapped", [("both", "xy"), ("x only", "x"), ("y only", "y")])
def test_unet_wraps_exactly_on_its_axes_when_loaded(mods, unet, vae, tiling, wrapped):
    model, _ = tile(mods, unet, vae, tiling)
    x = latent(6)
    out = unet_out(model, x)
    for axis in ("x", "y"):
        dy, dx = SHIFTS[axis]
        error = (unet_out(model, roll(x, dy, dx)) - roll(out, dy, dx)).abs().max().item()
        if axis in wrapped:
            assert error < 1e-4, (tiling, axis, error)
        else:
            assert error > 1e-2, (tiling, axis, error)
    dy, dx = SHIFTS["xy"]
    assert (unet_out(unet, roll(x, dy, dx)) - roll(unet_out(unet, x), dy, dx)).abs().max() > 1e-2


def test_both_matches_torchs_own_circular_padding(mods, unet, vae):
    """An independent reference: a separate copy of the model whose convolutions use torch's
    padding_mode='circular'."""
    with torch.inference_mode():
        reference = tm.build("sd15", seed=0)
    for module in reference.model.diffusion_model.modules():
        if mods.tiling.pads_with_zeros(module):
            module.padding_mode = "circular"
    tiled, _ = tile(mods, unet, vae)
    x = latent(7)
    torch.testing.assert_close(unet_out(tiled, x), unet_out(reference, x), rtol=1e-5, atol=1e-5)


# -- the seam, measured, after texture synthesis -------------------------------------------------


def seam_and_inside(image: torch.Tensor) -> tuple[float, float]:
    """Mean |difference| across the wrap-around edges (last vs first column, last vs first row) and
    between neighbouring columns and rows inside the image, pooled over the batch and both axes."""
    img = image.movedim(-1, 1).float()
    seams, insides = [], []
    for dim in (-1, -2):
        n = img.shape[dim]
        seams.append((img.narrow(dim, 0, 1) - img.narrow(dim, n - 1, 1)).abs().mean())
        insides.append((img.narrow(dim, 1, n - 1) - img.narrow(dim, 0, n - 1)).abs().mean())
    return float(sum(seams) / 2), float(sum(insides) / 2)


def test_texture_synthesis_through_tiled_model_and_vae_has_no_seam(mods, unet, vae):
    model, tiled_vae = tile(mods, unet, vae)
    ref = capture(unet, latent(11, (1, 4, 8, 8), scale=5.0), COND)
    samples = optimize(model, ref, torch.zeros(4, 4, 8, 8), steps=4, lr=0.05, seed=0)
    seam, inside = seam_and_inside(decode(tiled_vae, samples))
    seam_untiled, inside_untiled = seam_and_inside(decode(vae, samples))
    print(f"\nseam metric (mean |diff|): tiled seam {seam:.4f} vs inside {inside:.4f} (ratio {seam / inside:.3f}); "
          f"untiled VAE seam {seam_untiled:.4f} vs inside {inside_untiled:.4f} (ratio {seam_untiled / inside_untiled:.3f})")
    assert seam <= 1.05 * inside
    assert seam_untiled > 1.15 * inside_untiled and seam_untiled > 1.15 * seam


def test_latent_ad_optimize_through_tiled_model_is_circular(mods, unet, vae):
    """The whole optimization commutes with a roll: the AD passes run the tiled convolutions."""
    model, _ = tile(mods, unet, vae)
    ref = capture(unet, latent(11, (1, 4, 8, 8), scale=5.0), COND)
    start = latent(12, (1, 4, 8, 8), scale=4.0)
    dy, dx = SHIFTS["xy"]
    out = optimize(model, ref, start, steps=3, lr=0.05, weight=0.0)
    out_rolled = optimize(model, ref, roll(start, dy, dx), steps=3, lr=0.05, weight=0.0)
    assert (out - start).abs().max() > 1e-2
    torch.testing.assert_close(out_rolled, roll(out, dy, dx), rtol=1e-4, atol=1e-4)
    untiled = optimize(unet, ref, start, steps=3, lr=0.05, weight=0.0)
    untiled_rolled = optimize(unet, ref, roll(start, dy, dx), steps=3, lr=0.05, weight=0.0)
    assert (untiled_rolled - roll(untiled, dy, dx)).abs().max() > 1e-3


# -- the originals are unchanged -----------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is b
    return a is b or a == b


def snapshot(root: torch.nn.Module) -> dict:
    """Per module: its class, its attributes (objects by identity), its parameters and buffers
    (objects by identity, values by copy)."""
    out = {}
    for name, module in root.named_modules():
        attrs = {k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
        tensors = {k: (v, v.detach().clone()) for k, v in [*module._parameters.items(), *module._buffers.items()]
                   if v is not None}
        out[name] = (type(module), attrs, tensors, list(module._modules))
    return out


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert list(before) == list(after)
    for name, (cls, attrs, tensors, children) in before.items():
        cls_after, attrs_after, tensors_after, children_after = after[name]
        assert cls_after is cls, name
        assert children_after == children, name
        assert attrs_after.keys() == attrs.keys(), (name, set(attrs_after) ^ set(attrs))
        for key, value in attrs.items():
            assert _same(value, attrs_after[key]), (name, key)
        assert tensors_after.keys() == tensors.keys(), name
        for key, (obj, value) in tensors.items():
            assert tensors_after[key][0] is obj, (name, key)
            assert torch.equal(tensors_after[key][1], value), (name, key)


def test_originals_are_unchanged_after_the_clones_are_used(mods, vae):
    import comfy.ops

    with torch.inference_mode():
        model = tm.build("sd15", seed=0)
    x, z = latent(8), latent(9, (1, 4, 6, 8))
    out_before, image_before = unet_out(model, x), decode(vae, z)
    unet_before = snapshot(model.model)
    vae_before = snapshot(vae.first_stage_model)
    vae_attrs = dict(vars(vae))

    tiled_model, tiled_vae = tile(mods, model, vae)
    assert not (unet_out(tiled_model, x) - out_before).abs().max() < 1e-3
    assert not (decode(tiled_vae, z) - image_before).abs().max() < 1e-3
    live = model.model.diffusion_model.input_blocks[0][0]
    assert mods.tiling.is_circular_view(live), "the tiled clone's object patches were not applied"

    assert torch.equal(unet_out(model, x), out_before)
    assert torch.equal(decode(vae, z), image_before)
    assert_same_snapshot(unet_before, snapshot(model.model))
    assert_same_snapshot(vae_before, snapshot(vae.first_stage_model))
    assert vars(vae).keys() == vae_attrs.keys() and all(vars(vae)[k] is v for k, v in vae_attrs.items())
    assert not model.object_patches and not vae.patcher.object_patches
    for cls in (comfy.ops.disable_weight_init.Conv2d, comfy.ops.manual_cast.Conv2d):
        assert "_conv_forward" not in vars(cls)


def test_encoder_is_left_as_it_is(mods, unet, vae):
    _, tiled_vae = tile(mods, unet, vae)
    paths = list(tiled_vae.patcher.object_patches)
    assert paths and all(p.startswith("decoder.") for p in paths)
    pixels = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(3))
    encoded = []
    for encoder in (tiled_vae, vae):
        torch.manual_seed(0)  # the encoder samples from its posterior
        with torch.inference_mode():
            encoded.append(encoder.encode(pixels))
    assert torch.equal(*encoded)


def test_decode_tiled_runs(mods, unet, vae):
    _, tiled_vae = tile(mods, unet, vae)
    z = latent(10, (1, 4, 12, 12))
    with torch.inference_mode():
        whole = tiled_vae.decode_tiled(z)
        tiles = tiled_vae.decode_tiled(z, tile_x=8, tile_y=8, overlap=2)
    assert whole.shape == tiles.shape == (1, 96, 96, 3)
    assert torch.isfinite(tiles).all()
    torch.testing.assert_close(whole, decode(tiled_vae, z), rtol=1e-4, atol=1e-4)


def conv_and_attention_patches(patcher) -> dict:
    """Weight differences on padded convolutions and on attention: a LoRA/LoCon-like patch set."""
    generator = torch.Generator().manual_seed(21)
    state = patcher.model.state_dict()
    keys = ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.out.2.weight",
            "diffusion_model.input_blocks.1.0.in_layers.2.weight",
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    return {k: (0.05 * torch.randn(state[k].shape, generator=generator),) for k in keys}


def test_lora_patched_clone_tiles_and_unpatches_cleanly(mods, vae):
    """Every order ComfyUI may load them in: the LoRA model, its tiled clone, the plain model
    (weights unpatched through the tiled tree), a full unload, and back."""
    import comfy.model_management

    with torch.inference_mode():
        model = tm.build("sd15", seed=0)
        expected_model = tm.build("sd15", seed=0)
    patches = conv_and_attention_patches(model)
    lora = model.clone()
    lora.add_patches(patches, 1.0)
    expected = expected_model.clone()
    expected.add_patches(patches, 1.0)
    for module in expected_model.model.diffusion_model.modules():
        if mods.tiling.pads_with_zeros(module):
            module.padding_mode = "circular"
    x = latent(13)
    plain = unet_out(model, x)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    untiled_lora = unet_out(lora, x)
    tiled_expected = unet_out(expected, x)
    tiled_lora, _ = tile(mods, lora, vae)
    assert (untiled_lora - plain).abs().max() > 1e-3 and (tiled_expected - untiled_lora).abs().max() > 1e-3

    for step, (patcher, want) in enumerate([
        (tiled_lora, tiled_expected),  # after the LoRA model: same weights, not re-patched
        (model, plain),  # LoRA weights unpatched through the tiled tree
        (tiled_lora, tiled_expected),  # LoRA patched into the views
        ("unload", None),
        (lora, untiled_lora),
        (tiled_lora, tiled_expected),
        (model, plain),
    ]):
        if patcher == "unload":
            comfy.model_management.unload_all_models()
            continue
        torch.testing.assert_close(unet_out(patcher, x), want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert torch.equal(unet_out(model, x), plain)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    comfy.model_management.unload_all_models()
    assert not any(mods.tiling.is_circular_view(m) for m in model.model.modules())


def lowvram_cycle(patcher, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Load in lowvram mode (weights cast per layer, LoRA applied on the fly), run, unload."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
        try:
            conv = patcher.model.diffusion_model.input_blocks[0][0]
            casting = bool(conv.comfy_cast_weights)
            out = patcher.model.diffusion_model(x, timesteps=torch.full((1,), 500.0), context=COND[0][0]).clone()
        finally:
            patcher.unpatch_model(cpu)
    return out, casting


def test_lowvram_loading_of_a_tiled_lora_clone(mods, vae):
    """Lowvram casting and on-the-fly LoRA go through the views, and unloading leaves exactly the
    state an untiled lowvram cycle leaves."""
    with torch.inference_mode():
        model, twin = tm.build("sd15", seed=0), tm.build("sd15", seed=0)
    patches = conv_and_attention_patches(model)
    lora, twin_lora = model.clone(), twin.clone()
    lora.add_patches(patches, 1.0)
    twin_lora.add_patches(patches, 1.0)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    tiled_lora, _ = tile(mods, lora, vae)
    x = latent(17)
    full = unet_out(tiled_lora, x)
    out, casting = lowvram_cycle(tiled_lora, x)
    assert casting, "the lowvram path was not taken"
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    assert (full - unet_out(tile(mods, model, vae)[0], x)).abs().max() > 1e-3, "the LoRA did not reach the views"
    lowvram_cycle(twin_lora, x)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    for (name, module), (_, twin_module) in zip(model.model.named_modules(), twin.model.named_modules()):
        assert type(module).__qualname__ == type(twin_module).__qualname__, name  # ModelSampling: a class per model
        assert not mods.tiling.is_circular_view(module), name
        assert vars(module).keys() == vars(twin_module).keys(), name
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())


# -- with the other nodes ------------------------------------------------------------------------


def sample(model, noise: torch.Tensor, steps: int = 3) -> torch.Tensor:
    import comfy.sample

    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, "ddim", "ddim_uniform", COND, NEG,
                                   torch.zeros_like(noise), seed=0, disable_pbar=True)


def test_ad_loss_guidance_through_tiled_model_keeps_sampling_circular(mods, unet, vae):
    model, _ = tile(mods, unet, vae)
    ref = capture(unet, latent(11, (1, 4, 8, 8), scale=5.0), COND)
    with torch.inference_mode():
        (guided,) = mods.guidance.ADLossGuidance().patch(model, ref, 0.05, 2, True, 0.0, 1.0, 0)
    assert set(guided.object_patches) == set(model.object_patches)
    noise = latent(14)
    dy, dx = SHIFTS["xy"]
    out = sample(guided, noise)
    assert torch.isfinite(out).all()
    assert (out - sample(model, noise)).abs().max() > 1e-3, "the guidance did nothing"
    # Adam normalizes the gradients, so float noise in them shows (measured up to ~5e-4); with AD passes
    # that do not wrap (the views bypassed inside them) the difference measured 3.4.
    torch.testing.assert_close(sample(guided, roll(noise, dy, dx)), roll(out, dy, dx), rtol=1e-3, atol=5e-3)


def test_tiled_and_untiled_features_are_cached_apart(mods, unet, vae):
    ref = capture(unet, latent(11, (1, 4, 8, 8), scale=5.0), COND)
    cache = ref.cache
    start = torch.zeros(1, 4, 8, 8)
    optimize(unet, ref, start, steps=3)
    hits = cache.hits
    optimize(unet, ref, start, steps=3, seed=1)
    assert cache.hits > hits, "the untiled model should reuse its own cached features"
    model, _ = tile(mods, unet, vae)
    hits, misses = cache.hits, cache.misses
    optimize(model, ref, start, steps=3)
    assert cache.hits == hits and cache.misses > misses, "the tiled model reused untiled features"
    again, _ = tile(mods, unet, vae)  # new view objects, same tiling: the same features
    hits = cache.hits
    optimize(again, ref, start, steps=3)
    assert cache.hits > hits
    keys = {mode: mods.session.ADModelSession(tile(mods, unet, vae, mode)[0], ref).model_key
            for mode in ("both", "x only", "y only")}
    keys["none"] = mods.session.ADModelSession(unet, ref).model_key
    assert len(set(keys.values())) == 4


def test_texture_windows_see_the_wrapped_axes(mods, unet, vae):
    wrap_axes = mods.windows.wrap_axes
    assert wrap_axes(unet) == (False, False)
    for mode, axes in {"both": (True, True), "x only": (True, False), "y only": (False, True)}.items():
        model, _ = tile(mods, unet, vae, mode)
        assert wrap_axes(model) == axes and wrap_axes(model.clone()) == axes
    assert wrap_axes(unet) == (False, False)


def test_tiling_again_replaces_the_views(mods, unet, vae):
    both_model, both_vae = tile(mods, unet, vae, "both")
    x = latent(15)
    unet_out(both_model, x)  # its views are now in the shared model: tiling must see through them
    decode(both_vae, latent(16, (1, 4, 4, 4)))
    for source in ((both_model, both_vae), (unet, vae)):
        model, tiled_vae = tile(mods, *source, "x only")
        assert model.object_patches.keys() == both_model.object_patches.keys()
        views = [*model.object_patches.values(), *tiled_vae.patcher.object_patches.values()]
        assert all(v.ad_wrap_x and not v.ad_wrap_y for v in views)
        assert not any(mods.tiling.is_circular_view_class(type(v).ad_base_class) for v in views)
    assert all(v.ad_wrap_y for v in both_model.object_patches.values()), "the input clone was changed"
    dy, dx = SHIFTS["y"]
    assert (unet_out(model, roll(x, dy, dx)) - roll(unet_out(model, x), dy, dx)).abs().max() > 1e-2
    dy, dx = SHIFTS["x"]
    assert (unet_out(model, roll(x, dy, dx)) - roll(unet_out(model, x), dy, dx)).abs().max() < 1e-4


def test_a_fine_tuned_tiled_vae_still_tiles(pack, mods, unet, vae):
    """AD Fine-Tune VAE Decoder copies the decoder as the VAE decodes, tiling included."""
    import importlib

    decoder_node = importlib.import_module("attention_distillation_pack.nodes.decoder")
    _, tiled = tile(mods, unet, vae, "both")
    decode(vae, latent(1, (1, 4, 4, 4)))  # the untiled VAE was loaded last: the copy must not see it
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        tuned, _ = decoder_node.ADFineTuneVAEDecoder().finetune(tiled, image, 1, 1e-4, 0, 0)
    z = latent(5, (1, 4, 6, 8))
    error = (decode(tuned, roll(z, 1, 1)) - roll_image(decode(tuned, z), VAE_SCALE, VAE_SCALE)).abs().max().item()
    assert error < 1e-4
