"""SDXL size conditioning of the AD passes (DESIGN §2.2): every pass, the reference's included,
gets the time ids of the image being made, as the reference code's pipeline_sdxl.py gives its
style pass the output's `add_time_ids`. Checked against a literal implementation of that rule."""

from __future__ import annotations

import math

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, optimize
from literal_ad import ad_optimize, softmax_attention
from literal_ad import extract as literal_features

XL_SCALE = 0.13025  # SDXL's latent scaling factor (process_latent_in)
OUT = (16, 16)  # output latent: 128 px
REFERENCE_SIZES = {"smaller": (8, 8), "larger": (24, 24), "other aspect": (8, 16)}
LAYERS = "2-7"


pytestmark = pytest.mark.usefixtures("one_thread")


def plain_null(seed: int = 9) -> list:
    """The empty prompt as plain CLIP Text Encode gives it: pooled output, no size keys."""
    cond = tm.conditioning("sdxl", seed=seed)
    del cond[0][1]["width"], cond[0][1]["height"]
    return cond


def literal_y(pooled: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """The reference code's added conditioning: the pooled empty prompt, then the sinusoidal
    embeddings (256 wide, cos first, float32) of original size, crop (0, 0) and target size,
    all the output's."""
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ids = torch.tensor([height_px, width_px, 0, 0, height_px, width_px], dtype=torch.float32)
    args = ids[:, None] * freqs[None]
    time_embeds = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)
    return torch.cat([pooled.float(), time_embeds], dim=1)


def latent(shape, seed: int, scale: float = 5.0) -> torch.Tensor:
    return scale * torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def xl_models():
    """The same tiny SDXL weights as CheckpointLoaderSimple builds them, and as a plain module."""
    with torch.inference_mode():
        patcher = tm.build("sdxl", seed=0, dtype=torch.float64)
    plain = tm.build("sdxl", seed=0, dtype=torch.float64).model.diffusion_model.requires_grad_(False)
    return patcher, plain


def layer_keys(pack, plain) -> list:
    from attention_distillation_pack.attention.layers import list_self_attention_layers

    return [la.patch_key for la in list_self_attention_layers(plain)[2:8]]


class UNetCalls:
    """Records (input shape, context, y) of every forward of a diffusion model (a test spy,
    removed on exit)."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        self.model, self.calls = diffusion_model, []

    def __enter__(self) -> UNetCalls:
        def record(module, args, kwargs):
            y = kwargs.get("y")
            self.calls.append((tuple(args[0].shape), kwargs["context"].detach().clone(), y if y is None else y.clone()))

        self.handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# -- the reference pass's y ---------------------------------------------------------------------


def test_reference_pass_gets_the_output_size(pack, xl_models):
    patcher, _ = xl_models
    null = plain_null()
    pooled = null[0][1]["pooled_output"]
    ref = capture(patcher, latent((8, 8), 3), null, LAYERS)  # a 64 px reference
    with UNetCalls(patcher.model.diffusion_model) as spy:
        optimize(patcher, ref, torch.zeros(1, 4, *OUT), steps=1, lr=0.05)
    reference_calls = [y for shape, _, y in spy.calls if shape[-2:] == (8, 8)]
    current_calls = [y for shape, _, y in spy.calls if shape[-2:] == OUT]
    assert len(reference_calls) == 1 and len(current_calls) == 1
    built_for_output = patcher.model.encode_adm(pooled_output=pooled, width=128, height=128)
    built_for_reference = patcher.model.encode_adm(pooled_output=pooled, width=64, height=64)
    for y in reference_calls + current_calls:
        assert torch.equal(y.float(), built_for_output.float())
        assert torch.allclose(y.float(), literal_y(pooled, 128, 128), rtol=0, atol=1e-6)
    assert (built_for_reference - built_for_output).abs().max() > 0.1, "the two sizes must give different ids"


def test_size_keys_set_on_the_null_conditioning_are_respected(pack, xl_models):
    """CLIPTextEncodeSDXL sets the size keys: they are used as given, for any output size, and
    features built under them are shared between output sizes."""
    patcher, _ = xl_models
    null = tm.conditioning("sdxl", seed=9)
    null[0][1].update(width=1024, height=768, crop_w=16, crop_h=8, target_width=512, target_height=384)
    ref = capture(patcher, latent((8, 8), 3), null, LAYERS)
    expected = patcher.model.encode_adm(**null[0][1])
    for shape in (OUT, (8, 24)):
        with UNetCalls(patcher.model.diffusion_model) as spy:
            optimize(patcher, ref, torch.zeros(1, 4, *shape), steps=1, lr=0.05)
        assert spy.calls and all(torch.equal(y.float(), expected.float()) for _, _, y in spy.calls)
    assert ref.cache.misses == 1 and ref.cache.hits == 1


# -- equivalence with the literal rule --------------------------------------------------------------


@pytest.mark.parametrize("case", list(REFERENCE_SIZES))
def test_optimize_equals_the_reference_code_rule(pack, xl_models, case):
    """Style transfer (content loss on), 2 steps in float64: equal to rounding with every pass
    on the output's time ids; the reference's own ids would move the result far."""
    patcher, plain = xl_models
    null = plain_null()
    reference, content = latent(REFERENCE_SIZES[case], 11).double(), latent(OUT, 12).double()
    ref = capture(patcher, reference, null, LAYERS)
    got = optimize(patcher, ref, content, steps=2, lr=0.05, iterations=1, weight=0.25)

    keys, context, pooled = layer_keys(pack, plain), null[0][0].double(), null[0][1]["pooled_output"]

    y_out = literal_y(pooled, OUT[0] * 8, OUT[1] * 8).double()

    def literal(y_reference: torch.Tensor) -> torch.Tensor:
        return ad_optimize(plain, reference * XL_SCALE, content * XL_SCALE, context, keys, 2, 0.05, 1,
                           content=content * XL_SCALE, content_weight=0.25, y=y_out, y_reference=y_reference) / XL_SCALE

    expected = literal(y_out)
    own_size = literal(literal_y(pooled, reference.shape[-2] * 8, reference.shape[-1] * 8).double())
    assert (expected - content).abs().median() > 0.1, "the optimization did not move the latent"
    assert (got - expected).abs().max() <= 1e-9 * float(expected.abs().max())
    assert (own_size - expected).abs().max() > 1e-3, "the reference's own size must make a difference here"


# -- guided sampling ----------------------------------------------------------------------------------


def alphas_cumprod() -> torch.Tensor:
    """SD's (and SDXL's) scaled-linear schedule, computed independently in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def literal_adain(x, target, eps=1e-6):
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = target.mean(dim=(0, 2, 3), keepdim=True), target.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + eps) * t_std + t_mean


def literal_guided_update(unet, x_next, t_next, reference, context, keys, y_reference, y_out, lr, iterations, noise):
    """The reference code's AD() after one DDIM step (pipeline_sdxl.py): AdaIN to the noised
    reference, reference features with fresh noise on `y_reference`, a fresh Adam on the VP
    latent with features on `y_out`. In and out: k-diffusion latents in model space."""
    a = float(alphas_cumprod()[t_next])
    eps_ref, eps_adain = noise
    z = literal_adain(x_next * math.sqrt(a), math.sqrt(a) * reference + math.sqrt(1 - a) * eps_adain)
    with torch.no_grad():
        noised = math.sqrt(a) * reference + math.sqrt(1 - a) * eps_ref
        ref_feats = literal_features(unet, noised, t_next, context, keys, y_reference)
    z = z.detach().requires_grad_(True)
    adam = torch.optim.Adam([z], lr=lr)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t):
        for _ in range(iterations):
            adam.zero_grad()
            loss = 0.0
            for (q, _, _, out), (_, k_ref, v_ref, _) in zip(literal_features(unet, z, t_next, context, keys, y_out),
                                                            ref_feats):
                with torch.no_grad():
                    target = softmax_attention(q, k_ref, v_ref)
                loss = loss + (out - target).abs().mean()
            loss.backward()
            adam.step()
    return z.detach() / math.sqrt(a)


@pytest.fixture(scope="module")
def xl32_models():
    with torch.inference_mode():
        patcher = tm.build("sdxl", seed=0)
    plain = tm.build("sdxl", seed=0).model.diffusion_model.requires_grad_(False)
    return patcher, plain


POS, NEG = tm.conditioning("sdxl", seed=1), tm.conditioning("sdxl", seed=2)


def sample(model, shape=OUT, steps=5, last_step=None, sampler="ddim", scheduler="ddim_uniform"):
    import comfy.sample

    with torch.inference_mode():
        empty = torch.zeros(1, 4, *shape)
        return comfy.sample.sample(model, comfy.sample.prepare_noise(empty, 0), steps, 5.0, sampler, scheduler, POS,
                                   NEG, empty, seed=0, last_step=last_step, disable_pbar=True)


def guide(model, ref, lr=0.05, iterations=3, seed=7, **optional):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    with torch.inference_mode():
        return ADLossGuidance().patch(model, ref, lr, iterations, True, 0.0, 1.0, seed, **optional)[0]


@pytest.mark.parametrize("case", list(REFERENCE_SIZES))
def test_guided_step_equals_the_reference_code_rule(pack, xl32_models, case):
    """One ddim step of 5 (t 801 → 601) with AD Loss Guidance equals the literal AD() on the
    output's time ids to float32 tolerance; on the reference's own ids it does not."""
    from attention_distillation_pack.guidance import guided

    patcher, plain = xl32_models
    null = plain_null()
    reference = latent(REFERENCE_SIZES[case], 21)
    ref = capture(patcher, reference, null, LAYERS)
    ours = sample(guide(patcher, ref), last_step=1) * XL_SCALE
    x_next = sample(patcher, last_step=1) * XL_SCALE
    shape, key = tuple(reference.shape), 601 * 1000
    noise = (guided.step_noise(shape, 7, key, guided.STREAM_REFERENCE), guided.step_noise(shape, 7, key, guided.STREAM_ADAIN))
    pooled, keys = null[0][1]["pooled_output"], layer_keys(pack, plain)
    y_out = literal_y(pooled, OUT[0] * 8, OUT[1] * 8)

    def literal(y_reference, start=x_next):
        return literal_guided_update(plain, start, 601, reference * XL_SCALE, null[0][0], keys, y_reference, y_out,
                                     0.05, 3, noise)

    expected = literal(y_out)
    sensitivity = float((literal(y_out, x_next * (1 + 1e-6)) - expected).abs().max())
    own_size = literal(literal_y(pooled, shape[-2] * 8, shape[-1] * 8))
    moved = float((expected - x_next).abs().max())
    assert moved > 1e-2, "the guidance must move the latent for the comparison to mean anything"
    difference = float((ours - expected).abs().max())
    # float32: Adam's sign-like first steps amplify rounding (DESIGN §2.4), as in test_guidance.py
    assert difference <= 10 * max(sensitivity, 1e-6 * float(expected.abs().max())), (difference, sensitivity, moved)
    assert float((own_size - expected).abs().max()) > 100 * difference + 1e-4


# -- windows ------------------------------------------------------------------------------------------


def texture_windows():
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    return ADTextureWindows().windows(64, 32)[0]  # 8-latent-pixel windows every 4: 3×3 on the output


def test_windows_get_the_size_of_the_whole_image(pack, xl32_models):
    """Every AD pass of a windowed run, optimize or guided, gets the whole output's time ids (the
    reference code's panorama mode gives all its windows one conditioning, the image's)."""
    patcher, _ = xl32_models
    null = plain_null()
    ref = capture(patcher, latent((8, 16), 3), null, LAYERS)
    expected = patcher.model.encode_adm(pooled_output=null[0][1]["pooled_output"], width=128, height=128)
    with UNetCalls(patcher.model.diffusion_model) as spy:
        optimize(patcher, ref, torch.zeros(1, 4, *OUT), steps=1, windows=texture_windows())
    shapes = [shape[-2:] for shape, _, _ in spy.calls]
    assert shapes.count((8, 8)) == 9 and (8, 16) in shapes and OUT not in shapes
    assert all(torch.equal(y, expected.to(y)) for _, _, y in spy.calls)

    with UNetCalls(patcher.model.diffusion_model) as spy:
        sample(guide(patcher, ref, iterations=1, windows=texture_windows()), steps=2, sampler="euler", scheduler="normal")
    ad_calls = [(shape[-2:], y) for shape, context, y in spy.calls if torch.equal(context[:1], null[0][0].to(context))]
    assert [shape for shape, _ in ad_calls].count((8, 8)) == 2 * 9
    assert all(torch.equal(y[:1], expected.to(y)) for _, y in ad_calls)


# -- the feature cache ------------------------------------------------------------------------------------


def test_cache_keys_on_the_output_size(pack, xl32_models):
    """Texture from noise, 2 steps (2 reference passes a run): two output sizes compute the
    reference's features twice, re-runs at a size reuse them."""
    patcher, _ = xl32_models
    ref = capture(patcher, latent((8, 8), 3), plain_null(), LAYERS)
    for shape, misses, hits in ((OUT, 2, 0), (OUT, 2, 2), ((24, 24), 4, 2), (OUT, 4, 4), ((24, 24), 4, 6)):
        optimize(patcher, ref, torch.zeros(1, 4, *shape), steps=2)
        assert (ref.cache.misses, ref.cache.hits) == (misses, hits), shape


def test_sd15_is_unaffected(pack):
    """SD1.x/2.x have no size conditioning: every pass feeds the same context and no y whatever
    the output size, and the reference's features are shared between output sizes."""
    with torch.inference_mode():
        patcher = tm.build("sd15", seed=0)
    null = tm.conditioning("sd15", seed=9)
    ref = capture(patcher, latent((8, 8), 3), null, "paper default")
    with UNetCalls(patcher.model.diffusion_model) as spy:
        for shape in (OUT, (24, 12)):
            optimize(patcher, ref, torch.zeros(1, 4, *shape), steps=2)
    assert len(spy.calls) == 2 + 2 * 2, "2 reference passes (the second run reuses them) and 2 passes a run"
    assert all(y is None and torch.equal(context, null[0][0]) for _, context, y in spy.calls)
    assert (ref.cache.misses, ref.cache.hits) == (2, 2)
