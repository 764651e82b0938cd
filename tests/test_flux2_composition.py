"""Flux.2 in ordinary graphs: a LoRA through ComfyUI's loader composes (one guided step equals §2.10 on the
merged weights), the input MODEL samples bit-identically afterwards, Cancel leaves nothing behind, a FLUX.1
reference on a Flux.2 MODEL gets an error naming the node, several references pool their 512 + H·W tokens,
region masks, seeded texture synthesis lowers the AD loss, and Seamless Tiling is refused clearly."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf
import tiny_flux2 as t2
from ad_helpers import capture, losses_at, optimize
from test_flux2_guided import GUIDANCE, expected, guided, sample

pytestmark = t2.requires_flux2_host


def _with_lora(kind: str):
    import comfy.sd
    import tiny_models as tm

    with torch.inference_mode():
        patcher = t2.build(kind)
        lora = tm.lora_state_dict(patcher, match="blocks")
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert len(patched.patches) > 0
    return patched


def test_a_lora_composes_with_one_guided_step(pack):
    patcher = _with_lora("klein")
    null, positive = t2.null_conditioning(guidance=GUIDANCE), t2.null_conditioning(seed=5, guidance=GUIDANCE)
    model, reference = guided(patcher, null)
    literal = expected("klein", patcher, 4, 1, reference, positive, null)
    ours = sample(model, steps=4, last_step=1)
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5 * float(literal.abs().max()))


def test_input_model_untouched_and_cancel_leaves_nothing(pack):
    import comfy.model_management as mm

    with torch.inference_mode():
        patcher = t2.build("dev")
    before = sample(patcher, steps=2)
    model, _ = guided(patcher, t2.null_conditioning())
    sample(model, steps=2)
    assert torch.equal(sample(patcher, steps=2), before)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(model, steps=2)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(patcher, steps=2), before)
    assert "sampler_post_cfg_function" not in patcher.model_options
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())


def test_a_flux1_reference_on_flux2_names_the_node(pack):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    with torch.inference_mode():
        flux1, flux2 = tf.build("dev"), t2.build("dev")
    ref = capture(flux1, tf.latent(), tf.null_conditioning())
    with pytest.raises(Exception, match=r"AD Loss Guidance.*captured with another kind of model \(Flux\).*Flux\.2"):
        with torch.inference_mode():
            ADLossGuidance().patch(flux2, ref, 0.01, 2, True, 0.0, 1.0, 0)


def test_several_references_and_region_masks(pack):
    from attention_distillation_pack.guidance.ad_pass import ad_pass

    with torch.inference_mode():
        patcher = t2.build("klein")
    two = capture(patcher, torch.cat([t2.latent(seed=21), t2.latent(seed=22)]), t2.null_conditioning())
    with torch.inference_mode(), ad_pass(patcher, two) as session:
        kv = session.reference_kv(0.5)
    assert kv[0].k.shape[2] == 2 * (512 + 20) and kv[0].text_tokens == 512 and kv[0].hw == (5, 4)

    ref_mask = torch.zeros(1, 80, 64)
    ref_mask[:, :, 32:] = 1.0
    masked = capture(patcher, t2.latent(seed=21), t2.null_conditioning(), reference_mask=ref_mask)
    free = capture(patcher, t2.latent(seed=21), t2.null_conditioning())
    content = t2.latent(seed=31)
    target = torch.ones(1, 80, 64)
    kept = optimize(patcher, masked, content, steps=2, target_mask=target)
    assert not torch.allclose(kept, optimize(patcher, free, content, steps=2))


def test_texture_from_seeded_noise_lowers_the_ad_loss(pack):
    import comfy.sample

    with torch.inference_mode():
        patcher = t2.build("dev")
    reference = capture(patcher, t2.latent(seed=21, height=6, width=6), t2.null_conditioning())
    empty = torch.zeros(1, 128, 6, 6)
    result = optimize(patcher, reference, empty, steps=8, lr=0.05, seed=3)
    start = patcher.model.process_latent_out(comfy.sample.prepare_noise(empty, 3))
    before, _ = losses_at(patcher, reference, start, (0.9, 0.5, 0.1))
    after, _ = losses_at(patcher, reference, result, (0.9, 0.5, 0.1))
    assert after < 0.9 * before, (before, after)


def test_seamless_tiling_is_refused_clearly(pack):
    from attention_distillation_pack.nodes.tiling import ADSeamlessTiling

    with torch.inference_mode():
        patcher = t2.build("klein")
    with pytest.raises(Exception, match="RoPE positions"):
        ADSeamlessTiling().apply(patcher, None, "both")
