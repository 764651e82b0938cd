"""Latent AD Optimize on Flux (docs/DESIGN.md §2.7, last paragraph): the clean latent fed at the model's
own descending sigmas, null text, guidance 1.0, one Adam for the whole run, AD loss plus a content loss
on the image tokens' queries; several references, region masks, AD Texture Windows; the errors a Flux
MODEL gets where AD cannot follow it (seamless tiling, another family's reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tiny_flux as tf
from ad_helpers import capture, losses_at, optimize
from memory_meter import peak_bytes
from test_flux_guided import _features, _literal_model, _pack_model

pytestmark = tf.requires_flux_host


@pytest.fixture(scope="module")
def flux():
    return _pack_model("dev", lora=False)


@pytest.fixture(scope="module")
def reference(flux):
    return capture(flux, tf.latent(seed=21, height=8, width=8), tf.null_conditioning(guidance=3.5))


def test_optimize_is_the_literal_algorithm(pack, flux, reference):
    import comfy.samplers

    content = tf.latent(seed=31, height=8, width=6)
    ours = optimize(flux, reference, content, steps=3, lr=0.05, iterations=2, weight=0.5)

    base = _literal_model("dev", flux)
    null = tf.null_conditioning(guidance=3.5)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", 3)][:-1]
    s, c = base.process_latent_in(reference.latents), base.process_latent_in(content)
    x = c.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for sigma in sigmas:
        with torch.no_grad():
            refs = _features(base.diffusion_model, s, sigma, null)
            content_q = [q[:, :, tf.TEXT_TOKENS:] for q, *_ in _features(base.diffusion_model, c, sigma, null)]
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                records = _features(base.diffusion_model, x, sigma, null)
                ad = sum((out - F.scaled_dot_product_attention(q, rk, rv).detach()).abs().mean()
                         for (q, _, _, out), (_, rk, rv, _) in zip(records, refs, strict=True))
                content_term = sum((q[:, :, tf.TEXT_TOKENS:] - cq).abs().mean()
                                   for (q, *_), cq in zip(records, content_q, strict=True))
                (ad + 0.5 * content_term).backward()
            optimizer.step()
    literal = base.process_latent_out(x.detach())
    assert float((literal - content).abs().max()) > 1e-2
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)


def test_texture_from_seeded_noise_lowers_the_ad_loss_and_seeds_reproduce(pack, flux, reference):
    import comfy.sample

    empty = torch.zeros(1, 16, 8, 8)
    result = optimize(flux, reference, empty, steps=8, lr=0.05, seed=3)
    start = flux.model.process_latent_out(comfy.sample.prepare_noise(empty, 3))
    times = (0.9, 0.5, 0.1)
    before, _ = losses_at(flux, reference, start, times)
    after, _ = losses_at(flux, reference, result, times)
    assert after < 0.9 * before, (before, after)
    assert torch.equal(result, optimize(flux, reference, empty, steps=8, lr=0.05, seed=3))
    assert not torch.allclose(result, optimize(flux, reference, empty, steps=8, lr=0.05, seed=4))


def test_content_weight_keeps_the_content(pack, flux, reference):
    content = tf.latent(seed=31, height=8, width=8)
    times = (0.9, 0.5, 0.1)
    free = optimize(flux, reference, content, steps=6, lr=0.05, weight=0.0)
    kept = optimize(flux, reference, content, steps=6, lr=0.05, weight=2.0)
    _, content_free = losses_at(flux, reference, free, times, content=content)
    _, content_kept = losses_at(flux, reference, kept, times, content=content)
    assert content_kept < 0.8 * content_free, (content_free, content_kept)


def test_several_references_pool_their_keys_and_values(pack, flux):
    two = capture(flux, torch.cat([tf.latent(seed=21, height=8, width=8), tf.latent(seed=22, height=8, width=8)]),
                  tf.null_conditioning(guidance=3.5))
    from attention_distillation_pack.guidance.ad_pass import ad_pass

    with torch.inference_mode(), ad_pass(flux, two) as session:
        kv = session.reference_kv(0.5)
    tokens = tf.TEXT_TOKENS + 16
    assert kv[0].k.shape[2] == 2 * tokens and kv[0].text_tokens == tf.TEXT_TOKENS


def test_region_masks_restrict_image_tokens_to_their_region(pack, flux):
    """A target image token of label l attends to the reference's image tokens of label l only; text
    tokens attend to everything."""
    from attention_distillation_pack.guidance.ad_pass import ad_pass
    from attention_distillation_pack.guidance.optimize import RegionMasks

    ref_mask = torch.zeros(1, 64, 64)
    ref_mask[:, :, 32:] = 1.0  # right half of the reference: label 255
    ref = capture(flux, tf.latent(seed=21, height=8, width=8), tf.null_conditioning(guidance=3.5),
                  reference_mask=ref_mask)
    target = torch.ones(1, 8, 8, dtype=torch.int64) * 255  # every target token: the right half
    x = tf.latent(seed=5, height=8, width=8)
    with torch.inference_mode(), ad_pass(flux, ref) as session:
        kv = session.reference_kv(0.5)
        with torch.no_grad():
            records = session.features(x, 0.5)
    mask = RegionMasks(ref.labels, target).for_layers(kv, records)[0]
    text = tf.TEXT_TOKENS
    ref_labels = torch.zeros(4, 4)
    ref_labels[:, 2:] = 1
    allowed_columns = torch.cat([torch.zeros(text), ref_labels.flatten()]).bool()
    assert mask.shape == (1, 1, text + 16, text + 16)
    assert mask[0, 0, :text].all()
    assert torch.equal(mask[0, 0, text:], allowed_columns.expand(16, -1))
    masked = optimize(flux, ref, torch.zeros(1, 16, 8, 8), steps=2, seed=1, target_mask=target.float())
    assert not torch.allclose(masked, optimize(flux, ref, torch.zeros(1, 16, 8, 8), steps=2, seed=1))


def test_windows_bound_the_memory_of_a_large_texture(pack, flux, reference):
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    (window,) = ADTextureWindows().windows(64, 64)  # 8x8 latent pixels
    small = peak_bytes(lambda: optimize(flux, reference, torch.zeros(1, 16, 8, 8), steps=1))
    large = torch.zeros(1, 16, 32, 32)
    windowed = peak_bytes(lambda: optimize(flux, reference, large, steps=1, windows=window))
    whole = peak_bytes(lambda: optimize(flux, reference, large, steps=1))
    # what scales with the whole latent: the latent, its gradient, Adam's two moments, the window coverage
    # and the result (the latent has 16 channels and the tiny Flux's activations are small)
    latent_state = 6 * large.numel() * large.element_size()
    print(f"peak tensor memory: window {small} B, 16x latent windowed {windowed} B, unwindowed {whole} B")
    assert whole > 8 * small
    assert windowed <= 1.3 * small + latent_state, (small, windowed, whole)


def test_windows_of_half_patches_get_a_clear_error(pack, flux, reference):
    """Flux reads its latent in 2x2 patches: a window of an odd number of latent pixels is refused by
    both AD nodes, naming the node and the size that fits; SD takes the same windows."""
    import tiny_models as tm
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.nodes.windows import ADTextureWindows, window_settings

    (odd,) = ADTextureWindows().windows(72, 24)  # 9 and 3 latent pixels
    with pytest.raises(ADNodeError, match=r"Latent AD Optimize.*multiples of 16 pixels.*got 72 and 24"):
        optimize(flux, reference, torch.zeros(1, 16, 32, 32), steps=1, windows=odd)
    with pytest.raises(ADNodeError, match=r"AD Loss Guidance.*multiples of 16 pixels"):
        ADLossGuidance().patch(flux, reference, 0.01, 2, True, 0.0, 1.0, 0, windows=odd)
    assert window_settings("node", odd, family_of(tm.build("sd15").model)) is odd


def test_cancel_mid_run_leaves_nothing_behind(pack, flux, reference):
    import comfy.model_management as mm
    from test_flux_guided import sample

    before = sample(flux, steps=2)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            optimize(flux, reference, torch.zeros(1, 16, 8, 8), steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(flux, steps=2), before)
    assert all(p.is_inference() for p in flux.model.diffusion_model.parameters())


def test_flux_errors_name_the_node(pack, flux, reference):
    import tiny_models as tm
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.nodes.tiling import ADSeamlessTiling

    with torch.inference_mode():
        sd = tm.build("sd15")
    sd_reference = capture(sd, torch.randn(1, 4, 8, 8), tm.conditioning("sd15"))
    with pytest.raises(ADNodeError, match=r"\[Latent AD Optimize\] the reference was captured with another kind of model \(Flux\)"):
        optimize(sd, reference, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ADNodeError, match=r"\[AD Loss Guidance\] the reference was captured with another kind of model \(Flux\)"):
        ADLossGuidance().patch(sd, reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=r"\[Latent AD Optimize\] the reference was captured with another kind of model \(SD UNet\)"):
        optimize(flux, sd_reference, torch.zeros(1, 16, 8, 8))
    with pytest.raises(ADNodeError, match=r"\[AD Loss Guidance\] the reference was captured with another kind of model \(SD UNet\)"):
        ADLossGuidance().patch(flux, sd_reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=r"\[Capture Reference Attention\] .*with a Flux CLIP"):
        capture(flux, tf.latent(), tm.conditioning("sd15"))
    with pytest.raises(ADNodeError, match=r"\[AD Seamless Tiling\] Flux cannot be made to tile seamlessly"):
        ADSeamlessTiling().apply(flux, None, "both")
    with pytest.raises(ADNodeError, match=r"\[Capture Reference Attention\] .*out of range.*double blocks 0-1"):
        capture(flux, tf.latent(), tf.null_conditioning(), layers="0-5")
