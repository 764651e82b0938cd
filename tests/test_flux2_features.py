"""Flux.2 features and gradients: what the pack records in an AD pass equals a direct forward with the
null text left-padded with zeros to 512 tokens, guidance 1.0 where embedded and nothing of the null
CONDITIONING's extras (mask, guidance, reference latents); gradients with respect to the latent through
ComfyUI v0.33's Flux.2 inside inference mode (plain and block-checkpointed) equal central finite
differences in float64 (docs/DESIGN.md §2.10)."""

from __future__ import annotations

import pytest
import torch
import tiny_flux2 as t2
from test_flux_gradients import float64_options
from test_flux2_guided import _features, _with_reference_latents

pytestmark = t2.requires_flux2_host
SPEC = "0,3-4"
SIGMA = 0.55


def _session_features(patcher, null: list, x: torch.Tensor, checkpoint: bool = False):
    from attention_distillation_pack.guidance.ad_pass import ad_pass
    from ad_helpers import capture

    reference = capture(patcher, t2.latent(seed=21, height=4, width=5), null, layers=SPEC)
    with torch.inference_mode(), ad_pass(patcher, reference) as session, torch.no_grad():
        return session, session.features(x, SIGMA)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_recorded_features_equal_a_direct_forward(pack, kind):
    with torch.inference_mode():
        patcher = t2.build(kind)
    null = _with_reference_latents(t2.null_conditioning(guidance=4.0), seed=41)  # extras an edit graph adds
    x = t2.latent(seed=3, batch=2)
    session, records = _session_features(patcher, null, x)
    assert session.family.name == "Flux.2"
    with torch.inference_mode():
        weights = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    direct = _features(t2.build(kind, weights=weights).model.diffusion_model, x, SIGMA, [[null[0][0], {}]])
    for record, (q, k, v, out) in zip(records, direct, strict=True):
        assert record.text_tokens == 512 and record.hw == (5, 4)
        assert record.q.shape == (2, 4, 512 + 20, 16)
        for ours, theirs in ((record.q, q), (record.k, k), (record.v, v), (record.out, out)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert torch.equal(record.image_part(record.q), record.q[:, :, 512:])


def _loss(patcher, checkpoint: bool):
    """AD loss against fixed targets plus L1 terms on the image queries and all keys, as a function of
    the latent, through the pack's Flux.2 pass in float64."""
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.guidance.losses import attention_target, content_loss

    base = patcher.model
    family = family_of(base)
    layers = select_layers(base.diffusion_model, SPEC)
    pass_ = family.feature_pass(patcher, layers, checkpoint=checkpoint)
    fixed_pass = family.feature_pass(patcher, layers)
    pass_.transformer_options = fixed_pass.transformer_options = float64_options()
    null = t2.null_conditioning(dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(1, 128, 4, 5, generator=generator, dtype=torch.float64)
    content = torch.randn(1, 128, 5, 4, generator=generator, dtype=torch.float64)
    cond = family.conditioning(base, null, content, torch.device("cpu"))
    time, _ = family.feature_time(base.model_sampling, SIGMA)
    with torch.no_grad():
        refs, fixed = fixed_pass.run(reference, time, cond), fixed_pass.run(content, time, cond)
        targets = [attention_target(c.q, r.k, r.v) for c, r in zip(fixed, refs)]

    def loss(x: torch.Tensor) -> torch.Tensor:
        records = pass_.run(x, time, family.conditioning(base, null, x, torch.device("cpu")))
        ad = sum((r.out - t).abs().mean() for r, t in zip(records, targets))
        return (ad + 0.3 * content_loss([r.image_part(r.q) for r in records], [c.image_part(c.q) for c in fixed])
                + 0.1 * content_loss([r.k for r in records], [c.k for c in fixed]))

    return loss


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_gradient_matches_central_differences(pack, kind, checkpoint):
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        patcher = t2.build(kind, dtype=torch.float64)
    dm = patcher.model.diffusion_model
    assert next(dm.parameters()).is_inference()
    x0 = t2.latent(seed=7, batch=2, dtype=torch.float64)
    random = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.inference_mode():
        loss = _loss(patcher, checkpoint)
        with autograd_through(dm):
            x = x0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x), [x])
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
            eps = 1e-6
            for direction in (grad / grad.norm(), random / random.norm()):
                with torch.no_grad():
                    fd = float((loss(x0 + eps * direction) - loss(x0 - eps * direction)) / (2 * eps))
                analytic = float((grad * direction).sum())
                assert abs(fd - analytic) <= 1e-6 * float(grad.norm()), (fd, analytic)
    assert all(p.is_inference() for p in dm.parameters()), "weights were not restored"
