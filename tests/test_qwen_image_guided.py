"""AD Loss Guidance and Latent AD Optimize on Qwen-Image equal docs/DESIGN.md §2.8 written here from direct
model calls (tests/qwen_literal.py): the sampler's true-CFG pass and Euler step, the reference noised to σ'
with fresh noise (clean at the last step), a reference pass with the null text at τ = timestep(σ'), AdaIN
per packed channel, a fresh Adam on x' itself and the landing of step 6; the optimize mode at the model's own
sigmas with one Adam and the content loss. Edit models: the conditioning's reference latents reach the
sampler's passes only; the literal leaves them out of its AD passes, so any leak fails the comparison."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import qwen_literal as ql
import tiny_qwen_image as tq
from ad_helpers import capture, optimize

pytestmark = tq.requires_qwen_host
SEED, LR, ITERATIONS, CFG = 7, 0.01, 2, 2.5
SHAPE = (2, 16, 1, 8, 6)
LAST = 2  # paper default on the tiny model's 9 blocks: blocks 7, 8


def _literal_model(patcher, edit: str | None):
    """The same weights (LoRA merged where the pack's MODEL has one) in a plain, non-inference model."""
    with torch.inference_mode():
        patcher.patch_model(device_to=torch.device("cpu"))
        weights = {k: v.clone().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
        patcher.unpatch_model(device_to=torch.device("cpu"))
    weights = {k: v.clone() for k, v in weights.items()}
    base = tq.build(edit, weights=weights).model
    for parameter in base.diffusion_model.parameters():
        parameter.requires_grad_(False)
    return base


def _edit_cond(cond: list, edit_latent: torch.Tensor | None) -> list:
    if edit_latent is None:
        return cond
    return [[cond[0][0], dict(cond[0][1], reference_latents=[edit_latent])]]


def _conds(edit_latent):
    return (_edit_cond(tq.null_conditioning(seed=5, tokens=7), edit_latent),
            _edit_cond(tq.null_conditioning(seed=6, tokens=6), edit_latent),
            _edit_cond(tq.null_conditioning(), edit_latent))  # positive, negative, null (Edit: all carry refs)


def _ad_loss(records, refs):
    return sum((out - F.scaled_dot_product_attention(q, rk, rv).detach()).abs().mean()
               for (q, _, _, out), (_, rk, rv, _) in zip(records, refs, strict=True))


def literal_run(base, x, sigmas, positive, negative, null, reference, edit_latent):
    """§2.8 §9 steps 1-6 for every step of `sigmas`; `reference` is s (model space). Returns x_N."""
    from attention_distillation_pack.guidance.step_noise import STREAM_REFERENCE, noise_step_key, step_noise

    dm, batch = base.diffusion_model, x.shape[0]
    # the sampler repeats a conditioning's reference latents to the batch (comfy.conds.CONDList)
    refs_in = ({"ref_latents": [base.process_latent_in(edit_latent).expand(batch, -1, -1, -1, -1)]}
               if edit_latent is not None else {})
    context = null[0][0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            d_pos, d_neg = (base.apply_model(x, torch.full((batch,), sigma), c_crossattn=c[0][0].expand(batch, -1, -1),
                                             **refs_in) for c in (positive, negative))
        denoised = d_neg + CFG * (d_pos - d_neg)
        x_next = denoised + (x - denoised) * (sigma_next / sigma)
        eps = step_noise(tuple(reference.shape), SEED, noise_step_key(sigma_next), STREAM_REFERENCE)
        r = sigma_next * eps + (1 - sigma_next) * reference if sigma_next > 0 else reference
        tau = float(base.model_sampling.timestep(torch.tensor(sigma_next)))
        with torch.no_grad():
            refs = ql.features(dm, r, tau, context, LAST)
        z = ql.adain(x_next, r).detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=LR)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            _ad_loss(ql.features(dm, z, tau, context, LAST), refs).backward()
            optimizer.step()
        landing = (sigma * z.detach() - sigma_next * x) / (sigma - sigma_next)
        x = x + (sigma_next - sigma) * (x - landing) / sigma
    return x


def sample(patcher, steps, last_step, positive, negative):
    import comfy.sample

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, CFG, "euler", "simple", positive, negative,
                                   torch.zeros(SHAPE), last_step=last_step, force_full_denoise=False,
                                   seed=0, disable_pbar=True)


def expected(patcher, edit, steps, last_step, reference, edit_latent):
    import comfy.samplers

    base = _literal_model(patcher, edit)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps)]
    sigmas = sigmas[: (last_step + 1) if last_step is not None else None]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    x = base.model_sampling.noise_scaling(torch.tensor(sigmas[0]), noise, base.process_latent_in(torch.zeros(SHAPE)))
    positive, negative, null = _conds(edit_latent)
    out = literal_run(base, x, sigmas, positive, negative, null, base.process_latent_in(reference), edit_latent)
    return base.process_latent_out(base.model_sampling.inverse_noise_scaling(torch.tensor(sigmas[-1]), out))


def _pack_model(edit: str | None, lora: bool):
    import comfy.sd
    import tiny_models as tm

    with torch.inference_mode():
        patcher = tq.build(edit)
        if lora:
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, tm.lora_state_dict(patcher, match="blocks"), 1.0, 0.0)
            assert len(patcher.patches) > 0
    return patcher


@pytest.mark.parametrize("edit,lora", [(None, False), ("2511", False), (None, True)], ids=["t2i", "edit-2511", "t2i-lora"])
def test_one_guided_step_equals_the_literal_algorithm(pack, edit, lora):
    """The guided MODEL is a clone: the input MODEL samples bit-identically afterwards."""
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    patcher = _pack_model(edit, lora)
    edit_latent = tq.latent(seed=41, height=6, width=6) if edit else None
    positive, negative, null = _conds(edit_latent)
    reference = tq.latent(seed=21, height=6, width=8)
    ref = capture(patcher, reference, null)
    with torch.inference_mode():
        (model,) = ADLossGuidance().patch(patcher, ref, LR, ITERATIONS, True, 0.0, 1.0, SEED)
    plain_before = sample(patcher, 4, 1, positive, negative)
    ours = sample(model, 4, 1, positive, negative)
    literal = expected(patcher, edit, 4, 1, reference, edit_latent)
    plain = sample(patcher, 4, 1, positive, negative)
    assert torch.equal(plain, plain_before)
    assert ours.shape == SHAPE
    assert float((literal - plain).abs().max()) > 1e-2, "AdaIN and Adam moved the step"
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5 * float(literal.abs().max()))
    if edit:  # the edit latent is in the sampler's passes: without it the run differs
        without = sample(model, 4, 1, *_conds(None)[:2])
        assert float((without - ours).abs().max()) > 1e-3


def test_edit_reference_latents_stay_out_of_the_captured_features(pack):
    """The null conditioning's reference latents change nothing of the AD reference's keys and values."""
    from attention_distillation_pack.guidance.ad_pass import ad_pass

    with torch.inference_mode():
        patcher = tq.build("2511")
    reference = tq.latent(seed=21, height=6, width=8)
    kvs = []
    for edit_latent in (None, tq.latent(seed=41, height=6, width=6)):
        ref = capture(patcher, reference, _edit_cond(tq.null_conditioning(), edit_latent))
        with torch.inference_mode(), ad_pass(patcher, ref) as session:
            kvs.append(session.reference_kv(0.5))
    for a, b in zip(*kvs, strict=True):
        assert a.k.shape[2] == tq.TEXT_TOKENS + 12 and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_optimize_is_the_literal_algorithm(pack):
    import comfy.samplers

    with torch.inference_mode():
        patcher = tq.build()
    null = tq.null_conditioning()
    ref = capture(patcher, tq.latent(seed=21, height=8, width=8), null)
    content = tq.latent(seed=31, height=8, width=6)
    ours = optimize(patcher, ref, content, steps=3, lr=0.05, iterations=2, weight=0.5)

    base = _literal_model(patcher, None)
    dm, context = base.diffusion_model, null[0][0]
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", 3)][:-1]
    s, c = base.process_latent_in(ref.latents), base.process_latent_in(content)
    x = c.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for sigma in sigmas:
        tau = float(base.model_sampling.timestep(torch.tensor(sigma)))
        with torch.no_grad():
            refs = ql.features(dm, s, tau, context, LAST)
            content_q = [q[:, :, tq.TEXT_TOKENS:] for q, *_ in ql.features(dm, c, tau, context, LAST)]
        for _ in range(2):
            optimizer.zero_grad()
            records = ql.features(dm, x, tau, context, LAST)
            content_term = sum((q[:, :, tq.TEXT_TOKENS:] - cq).abs().mean()
                               for (q, *_), cq in zip(records, content_q, strict=True))
            (_ad_loss(records, refs) + 0.5 * content_term).backward()
            optimizer.step()
    literal = base.process_latent_out(x.detach())
    assert ours.shape == content.shape
    assert float((literal - content).abs().max()) > 1e-2
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)


def test_empty_4d_latent_gives_a_5d_texture_and_errors_name_the_node(pack):
    from attention_distillation_pack.nodes.errors import ADNodeError

    with torch.inference_mode():
        patcher = tq.build()
    ref = capture(patcher, tq.latent(seed=21, height=8, width=8), tq.null_conditioning())
    out = optimize(patcher, ref, torch.zeros(1, 16, 8, 8), steps=2, lr=0.05, seed=3)
    assert out.shape == (1, 16, 1, 8, 8) and float(out.abs().max()) > 0
    with pytest.raises(ADNodeError, match="Capture Reference Attention.*Qwen-Image's text encoder"):
        capture(patcher, tq.latent(), [[torch.zeros(1, 5, 4096), {"pooled_output": torch.zeros(1, 768)}]])
    with pytest.raises(ADNodeError, match=r"\(B, C, 1, H, W\)"):
        capture(patcher, torch.zeros(1, 16, 2, 8, 8), tq.null_conditioning())
