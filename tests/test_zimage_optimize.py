"""Latent AD Optimize on Z-Image (docs/DESIGN.md §2.8): the clean latent at the MODEL's own `simple`
sigmas, null caption, one Adam for the run, AD loss over the real caption and image rows against every
reference key, plus a content loss on the real image rows' queries; texture from KSampler's noise for the
seed; several references, region masks, AD Texture Windows; the errors a Z-Image MODEL gets."""

from __future__ import annotations

import pytest
import torch
import tiny_zimage as tz
import zimage_literal as zl
from ad_helpers import capture, losses_at, optimize
from comfy_env import differentiable_kernels

pytestmark = tz.requires_zimage_host
SPEC = "1-2"
LAYERS = (1, 2)
TIMES = (0.9, 0.5, 0.1)


@pytest.fixture(scope="module")
def zimage():
    return zl.pack_model()


@pytest.fixture(scope="module")
def reference(zimage):
    return capture(zimage, tz.latent(seed=21, height=8, width=8), tz.null_conditioning(), layers=SPEC)


@differentiable_kernels()
def literal_optimize(patcher, reference: torch.Tensor, start: torch.Tensor, content: torch.Tensor | None,
                     steps: int, lr: float, iterations: int, weight: float) -> torch.Tensor:
    """§2.8's optimization from direct model calls; `start` and `content` in model space."""
    import comfy.samplers

    base = zl.literal_model(patcher)
    dm = base.diffusion_model
    caption = tz.null_conditioning()[0][0]
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps)][:-1]
    s = base.process_latent_in(reference)
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    text = caption.shape[1]
    for sigma in sigmas:
        with torch.no_grad():
            refs = zl.reference_kv(zl.features(dm, s, sigma, caption, LAYERS))
            content_q = ([q[:, :, text:] for q, *_ in zl.features(dm, content, sigma, caption, LAYERS)]
                         if content is not None else None)
        for _ in range(iterations):
            optimizer.zero_grad()
            records = zl.features(dm, x, sigma, caption, LAYERS)
            loss = zl.ad_loss(records, refs)
            if content_q is not None:
                loss = loss + weight * sum((q[:, :, text:] - cq).abs().mean()
                                           for (q, *_), cq in zip(records, content_q, strict=True))
            loss.backward()
            optimizer.step()
    return base.process_latent_out(x.detach())


def test_optimize_is_the_literal_algorithm(pack, zimage, reference):
    """Style transfer: content latent as start and content target, two Adam iterations per sigma."""
    content = tz.latent(seed=31, height=8, width=6)
    ours = optimize(zimage, reference, content, steps=3, lr=0.05, iterations=2, weight=0.5)
    c = zimage.model.process_latent_in(content)
    literal = literal_optimize(zimage, reference.latents, c, c, steps=3, lr=0.05, iterations=2, weight=0.5)
    assert float((literal - content).abs().max()) > 1e-2
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)


def test_texture_starts_from_ksamplers_noise_and_lowers_the_ad_loss(pack, zimage, reference):
    """An empty latent starts from `comfy.sample.prepare_noise(latent, seed)`, the literal's start too;
    the AD loss falls; seeds reproduce."""
    import comfy.sample

    empty = torch.zeros(1, 16, 8, 8)
    ours = optimize(zimage, reference, empty, steps=2, lr=0.05, seed=3)
    literal = literal_optimize(zimage, reference.latents, comfy.sample.prepare_noise(empty, 3), None, steps=2,
                               lr=0.05, iterations=1, weight=0.0)
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)
    result = optimize(zimage, reference, empty, steps=8, lr=0.05, seed=3)
    start = zimage.model.process_latent_out(comfy.sample.prepare_noise(empty, 3))
    before, _ = losses_at(zimage, reference, start, TIMES)
    after, _ = losses_at(zimage, reference, result, TIMES)
    assert after < 0.9 * before, (before, after)
    assert torch.equal(result, optimize(zimage, reference, empty, steps=8, lr=0.05, seed=3))
    assert not torch.allclose(result, optimize(zimage, reference, empty, steps=8, lr=0.05, seed=4))


def test_content_weight_keeps_the_content(pack, zimage, reference):
    content = tz.latent(seed=31, height=8, width=8)
    free = optimize(zimage, reference, content, steps=6, lr=0.05, weight=0.0)
    kept = optimize(zimage, reference, content, steps=6, lr=0.05, weight=2.0)
    _, content_free = losses_at(zimage, reference, free, TIMES, content=content)
    _, content_kept = losses_at(zimage, reference, kept, TIMES, content=content)
    assert content_kept < 0.8 * content_free, (content_free, content_kept)


def test_several_references_pool_every_token_pads_included(pack, zimage):
    """Two 8×8 references: 2 × (32 caption tokens incl. pads + 16 image tokens + 16 image pads) keys, the
    pads of each reference after its own image grid."""
    from attention_distillation_pack.guidance.ad_pass import ad_pass

    latents = torch.cat([tz.latent(seed=21, height=8, width=8), tz.latent(seed=22, height=8, width=8)])
    two = capture(zimage, latents, tz.null_conditioning(), layers=SPEC)
    with torch.inference_mode(), ad_pass(zimage, two) as session:
        kv = session.reference_kv(0.5)
    assert kv[0].k.shape[2] == 2 * 64
    assert (kv[0].text_tokens, kv[0].hw, kv[0].trailing_tokens) == (32, (4, 4), 16)
    base = zl.literal_model(zimage)
    with torch.no_grad():
        direct = zl.reference_kv(zl.features(base.diffusion_model, base.process_latent_in(latents), 0.5,
                                             tz.null_conditioning()[0][0], LAYERS))
    for ours, (k, v) in zip(kv, direct, strict=True):
        torch.testing.assert_close(ours.k, k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.v, v, rtol=1e-6, atol=1e-6)


def test_region_masks_restrict_real_image_rows_to_their_region(pack, zimage):
    """A real image row of label l attends to the reference's real image tokens of label l only, never to
    caption or pad keys; caption rows attend to every key."""
    from attention_distillation_pack.guidance.ad_pass import ad_pass
    from attention_distillation_pack.guidance.optimize import RegionMasks

    ref_mask = torch.zeros(1, 64, 64)
    ref_mask[:, :, 32:] = 1.0  # right half of the reference: label 255
    ref = capture(zimage, tz.latent(seed=21, height=8, width=8), tz.null_conditioning(), layers=SPEC,
                  reference_mask=ref_mask)
    target = torch.ones(1, 8, 6, dtype=torch.int64) * 255
    x = tz.latent(seed=5, height=8, width=6)
    with torch.inference_mode(), ad_pass(zimage, ref) as session:
        kv = session.reference_kv(0.5)
        with torch.no_grad():
            records = session.features(x, 0.5)
    mask = RegionMasks(ref.labels, target).for_layers(kv, records)[0]
    caption, image = tz.CAPTION_TOKENS, 12
    ref_labels = torch.zeros(4, 4)
    ref_labels[:, 2:] = 1
    allowed = torch.cat([torch.zeros(32), ref_labels.flatten(), torch.zeros(16)]).bool()
    assert mask.shape == (1, 1, caption + image, 32 + 16 + 16)
    assert mask[0, 0, :caption].all()
    assert torch.equal(mask[0, 0, caption:], allowed.expand(image, -1))
    masked = optimize(zimage, ref, torch.zeros(1, 16, 8, 6), steps=2, seed=1, target_mask=target.float())
    assert not torch.allclose(masked, optimize(zimage, ref, torch.zeros(1, 16, 8, 6), steps=2, seed=1))


def test_windows_optimize_a_larger_latent_and_half_patches_are_refused(pack, zimage, reference):
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    (window,) = ADTextureWindows().windows(64, 32)  # 8x8 latent pixels, stride 4
    large = torch.zeros(1, 16, 16, 12)
    result = optimize(zimage, reference, large, steps=2, windows=window)
    assert result.shape == large.shape and torch.isfinite(result).all()
    (odd,) = ADTextureWindows().windows(72, 24)
    with pytest.raises(ADNodeError, match=r"Latent AD Optimize.*on Z-Image.*multiples of 16 pixels"):
        optimize(zimage, reference, large, steps=1, windows=odd)


def test_cancel_mid_run_leaves_nothing_behind(pack, zimage, reference):
    import comfy.model_management as mm

    before = optimize(zimage, reference, torch.zeros(1, 16, 8, 8), steps=2)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            optimize(zimage, reference, torch.zeros(1, 16, 8, 8), steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(optimize(zimage, reference, torch.zeros(1, 16, 8, 8), steps=2), before)
    assert all(p.is_inference() for p in zimage.model.diffusion_model.parameters())
    assert getattr(mm, "in_training", False) is False


def test_zimage_errors_name_the_node(pack, zimage, reference):
    import tiny_flux as tf
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.nodes.tiling import ADSeamlessTiling

    with torch.inference_mode():
        flux = tf.build("dev")
    flux_reference = capture(flux, tf.latent(), tf.null_conditioning())
    with pytest.raises(ADNodeError, match=r"\[Latent AD Optimize\] the reference was captured with another kind of "
                                          r"model \(Flux\) but this MODEL is a Z-Image"):
        optimize(zimage, flux_reference, torch.zeros(1, 16, 8, 8))
    with pytest.raises(ADNodeError, match=r"\[AD Loss Guidance\] the reference was captured with another kind of "
                                          r"model \(Z-Image\)"):
        ADLossGuidance().patch(flux, reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=r"\[Capture Reference Attention\] .*takes 32-wide ones; encode the empty "
                                          r"prompt with Z-Image's text encoder"):
        capture(zimage, tz.latent(), [[torch.randn(1, 77, 48), {"pooled_output": torch.randn(1, 48)}]])
    with pytest.raises(ADNodeError, match=r"\[AD Seamless Tiling\] Z-Image cannot be made to tile seamlessly"):
        ADSeamlessTiling().apply(zimage, None, "both")
    with pytest.raises(ADNodeError, match=r"\[Capture Reference Attention\] .*out of range.*3 main layers, 0-2"):
        capture(zimage, tz.latent(), tz.null_conditioning(), layers="0-5")
    (model,) = ADLossGuidance().patch(zimage, reference, 0.01, 2, True, 0.0, 1.0, 0)
    import comfy.sample

    with pytest.raises(ValueError, match=r"AdaIN on Z-Image needs a latent of even height and width.*got 7x6"):
        with torch.inference_mode():
            comfy.sample.sample(model, torch.randn(1, 16, 7, 6), 2, 1.0, "euler", "simple", tz.null_conditioning(),
                                tz.null_conditioning(), torch.zeros(1, 16, 7, 6), disable_pbar=True)
