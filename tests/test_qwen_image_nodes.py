"""The AD nodes on a Qwen-Image MODEL beyond the single-step equivalences (tests/test_qwen_image_guided.py):
several references pool their keys and values, region masks and AD Texture Windows run on the 5-D latent,
Cancel leaves the MODEL as it was, and the errors name the node (another family's reference, seamless
tiling, half-patch windows, layers out of range)."""

from __future__ import annotations

import pytest
import torch
import tiny_qwen_image as tq
from ad_helpers import capture, optimize

pytestmark = tq.requires_qwen_host


@pytest.fixture(scope="module")
def qwen():
    with torch.inference_mode():
        return tq.build()


@pytest.fixture(scope="module")
def reference(qwen):
    return capture(qwen, tq.latent(seed=21, height=8, width=8), tq.null_conditioning())


def test_several_references_pool_their_keys_and_values(pack, qwen):
    from attention_distillation_pack.guidance.ad_pass import ad_pass

    two = capture(qwen, torch.cat([tq.latent(seed=21, height=8, width=8), tq.latent(seed=22, height=8, width=8)]),
                  tq.null_conditioning())
    with torch.inference_mode(), ad_pass(qwen, two) as session:
        kv = session.reference_kv(0.5)
    assert kv[0].k.shape[2] == 2 * (tq.TEXT_TOKENS + 16) and kv[0].text_tokens == tq.TEXT_TOKENS


def test_region_masks_and_windows_change_the_result_and_keep_the_shape(pack, qwen, reference):
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    ref_mask = torch.zeros(1, 64, 64)
    ref_mask[:, :, 32:] = 1.0
    masked_ref = capture(qwen, tq.latent(seed=21, height=8, width=8), tq.null_conditioning(), reference_mask=ref_mask)
    target = torch.ones(1, 8, 8)
    plain = optimize(qwen, masked_ref, torch.zeros(1, 16, 1, 8, 8), steps=2, seed=1)
    masked = optimize(qwen, masked_ref, torch.zeros(1, 16, 1, 8, 8), steps=2, seed=1, target_mask=target)
    assert masked.shape == plain.shape == (1, 16, 1, 8, 8) and not torch.allclose(masked, plain)
    (window,) = ADTextureWindows().windows(64, 64)  # 8x8 latent pixels
    large = torch.zeros(1, 16, 1, 16, 16)
    windowed = optimize(qwen, reference, large, steps=1, seed=2, windows=window)
    whole = optimize(qwen, reference, large, steps=1, seed=2)
    assert windowed.shape == whole.shape == large.shape and not torch.allclose(windowed, whole)


def test_cancel_mid_run_leaves_nothing_behind(pack, qwen, reference):
    import comfy.model_management as mm
    import comfy.sample

    def sample():
        noise = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            return comfy.sample.sample(qwen, noise, 2, 1.0, "euler", "simple", tq.null_conditioning(seed=5),
                                       tq.null_conditioning(seed=6), torch.zeros(1, 16, 1, 8, 8), seed=0, disable_pbar=True)

    before = sample()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            optimize(qwen, reference, torch.zeros(1, 16, 1, 8, 8), steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(), before)
    assert all(p.is_inference() for p in qwen.model.diffusion_model.parameters())


def test_errors_name_the_node(pack, qwen, reference):
    import tiny_flux as tf
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.nodes.tiling import ADSeamlessTiling
    from attention_distillation_pack.nodes.windows import ADTextureWindows

    with torch.inference_mode():
        flux = tf.build("dev")
    flux_reference = capture(flux, tf.latent(), tf.null_conditioning())
    with pytest.raises(ADNodeError, match=r"\[Latent AD Optimize\] the reference was captured with another kind of model \(Flux\)"):
        optimize(qwen, flux_reference, torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(ADNodeError, match=r"\[AD Loss Guidance\] the reference was captured with another kind of model \(Qwen-Image\)"):
        ADLossGuidance().patch(flux, reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=r"\[AD Seamless Tiling\] Qwen-Image cannot be made to tile seamlessly"):
        ADSeamlessTiling().apply(qwen, None, "both")
    with pytest.raises(ADNodeError, match=r"\[Capture Reference Attention\] .*out of range.*9 blocks, 0-8"):
        capture(qwen, tq.latent(), tq.null_conditioning(), layers="3-12")
    (odd,) = ADTextureWindows().windows(72, 24)
    with pytest.raises(ADNodeError, match=r"Latent AD Optimize.*multiples of 16 pixels"):
        optimize(qwen, reference, torch.zeros(1, 16, 1, 32, 32), steps=1, windows=odd)
    with pytest.raises(ADNodeError, match=r"Latent AD Optimize.*even height and width"):
        optimize(qwen, reference, tq.latent(height=7, width=8), steps=1)
