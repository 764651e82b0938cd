"""Gradients with respect to the latent through ComfyUI's Qwen-Image inside inference mode (inference-tensor
weights), plain and block-checkpointed, under the pack's training switch (comfy-kitchen's fused RoPE has no
backward without it): equal to central finite differences in float64, and checkpointing changes nothing."""

from __future__ import annotations

import pytest
import torch
import tiny_qwen_image as tq

pytestmark = tq.requires_qwen_host
SIGMA = 0.55
SPEC = "1,4,6"


def _objective(patcher, checkpoint: bool):
    """The AD loss of the latent with attention targets fixed at the reference's keys/values over a fixed
    latent's queries, plus L1 terms on the image queries and on all keys, so every feature carries gradient."""
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.guidance.losses import attention_target, content_loss

    family = family_of(patcher.model)
    layers = select_layers(patcher.model.diffusion_model, SPEC)
    differentiated = family.feature_pass(patcher, layers, checkpoint=checkpoint)
    fixed_pass = family.feature_pass(patcher, layers)
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(1, 16, 1, 6, 8, generator=generator).double()
    content = torch.randn(1, 16, 1, 8, 6, generator=generator).double()
    time, _ = family.feature_time(patcher.model.model_sampling, SIGMA)
    null = tq.null_conditioning(dtype=torch.float64)
    device = torch.device("cpu")
    with torch.no_grad():
        refs = fixed_pass.run(reference, time, family.conditioning(patcher.model, null, reference, device))
        fixed = fixed_pass.run(content, time, family.conditioning(patcher.model, null, content, device))
        targets = [attention_target(c.q, r.k, r.v) for c, r in zip(fixed, refs)]

    def loss(x: torch.Tensor) -> torch.Tensor:
        records = differentiated.run(x, time, family.conditioning(patcher.model, null, x, device))
        ad = sum((r.out - t).abs().mean() for r, t in zip(records, targets))
        content_q = content_loss([r.image_part(r.q) for r in records], [c.image_part(c.q) for c in fixed])
        return ad + 0.3 * content_q + 0.1 * content_loss([r.k for r in records], [c.k for c in fixed])

    return loss


def _gradient(patcher, x0: torch.Tensor, checkpoint: bool, directions=()):
    from attention_distillation_pack.guidance.autograd import autograd_through

    dm = patcher.model.diffusion_model
    with torch.inference_mode():  # the executor's context: the node runs inside it
        loss = _objective(patcher, checkpoint)
        with autograd_through(dm):
            x = x0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x), [x])
            eps = 1e-6
            pairs = []
            for direction in directions:
                with torch.no_grad():
                    fd = (loss(x0 + eps * direction) - loss(x0 - eps * direction)) / (2 * eps)
                pairs.append((float(fd), float((grad * direction).sum())))
    assert all(p.is_inference() for p in dm.parameters()), "weights were not restored"
    return grad, pairs


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_gradient_matches_finite_differences(pack, checkpoint):
    with torch.inference_mode():
        patcher = tq.build(dtype=torch.float64)
    x0 = tq.latent(seed=7, batch=2, dtype=torch.float64)
    random = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grad, _ = _gradient(patcher, x0, checkpoint)
    grad, pairs = _gradient(patcher, x0, checkpoint, [grad / grad.norm(), random / random.norm()])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for fd, analytic in pairs:
        assert abs(fd - analytic) <= 1e-6 * float(grad.norm()), pairs


def test_checkpointing_gives_the_same_gradient(pack):
    with torch.inference_mode():
        patcher = tq.build(dtype=torch.float64)
    x0 = tq.latent(seed=7, dtype=torch.float64)
    plain, _ = _gradient(patcher, x0, checkpoint=False)
    checkpointed, _ = _gradient(patcher, x0, checkpoint=True)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-14)
