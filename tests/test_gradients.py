"""Gradients with respect to the latent through ComfyUI's UNet inside inference mode
(weights are inference tensors), LoRA-patched, normal and lowvram loading, against central
finite differences in float64."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm


def _loss_fn(pack, patcher, x_shape, seed=0):
    from attention_distillation_pack.attention.reference import ADReference
    from attention_distillation_pack.attention.session import ADModelSession
    from attention_distillation_pack.guidance.optimize import ad_objective

    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    content = torch.randn(1, *x_shape[1:], generator=g, dtype=torch.float64)
    session = ADModelSession(patcher, ADReference(ref, "1,3-6", tm.conditioning("sd15", dtype=torch.float64)))

    def loss(x: torch.Tensor, timestep: float = 400.0) -> torch.Tensor:
        refs = session.reference_kv(timestep)
        content_q = session.queries(content, timestep)
        total, _, _ = ad_objective(session, x, timestep, refs, content_q, 0.3, None)
        return total

    return loss


def _check_fd(pack, patcher, lowvram: bool):
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        if lowvram:
            patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
        else:
            patcher.patch_model(device_to=torch.device("cpu"))
    try:
        dm = patcher.model.diffusion_model
        assert next(dm.parameters()).is_inference()
        x0 = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        with torch.inference_mode():  # the executor's context: the node runs inside it
            loss = _loss_fn(pack, patcher, x0.shape)
            with autograd_through(dm):
                x = x0.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss(x), [x])
                eps = 1e-6
                checks = []
                for direction in (grad / grad.norm(), torch.randn(x0.shape, generator=torch.Generator().manual_seed(9),
                                                                  dtype=torch.float64)):
                    direction = direction / direction.norm()
                    with torch.no_grad():
                        fd = (loss(x0 + eps * direction) - loss(x0 - eps * direction)) / (2 * eps)
                    checks.append((float(fd), float((grad * direction).sum())))
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
        for fd, analytic in checks:
            assert abs(fd - analytic) <= 1e-4 * float(grad.norm()), checks
        assert all(p.is_inference() for p in dm.parameters()), "weights were not restored"
    finally:
        with torch.inference_mode():
            patcher.unpatch_model(device_to=torch.device("cpu"))


@pytest.mark.parametrize("lowvram", [False, True], ids=["normal", "lowvram"])
def test_gradient_matches_finite_differences_with_lora(pack, lowvram):
    import comfy.sd

    with torch.inference_mode():
        base = tm.build("sd15", dtype=torch.float64)
        patched, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base), 1.0, 0.0)
    assert len(patched.patches) > 0
    _check_fd(pack, patched, lowvram)


def test_lora_changes_the_gradient(pack):
    """The AD pass sees the LoRA-patched weights, not the base ones."""
    import comfy.sd
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        base = tm.build("sd15", dtype=torch.float64)
        patched, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base, scale=0.5), 1.0, 0.0)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for patcher in (base, patched):
        with torch.inference_mode():
            patcher.patch_model(device_to=torch.device("cpu"))
            loss = _loss_fn(pack, patcher, x0.shape)
            with autograd_through(patcher.model.diffusion_model):
                x = x0.clone().requires_grad_(True)
                grads.append(torch.autograd.grad(loss(x), [x])[0])
            patcher.unpatch_model(device_to=torch.device("cpu"))
    assert (grads[0] - grads[1]).abs().max() > 1e-6 * grads[0].abs().max()


def test_weights_restored_after_an_exception(pack):
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        patcher = tm.build("sd15")
    dm = patcher.model.diffusion_model
    before = {name: p for name, p in dm.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        with torch.inference_mode(), autograd_through(dm):
            assert not next(dm.parameters()).is_inference()
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            raise KeyboardInterrupt
    after = dict(dm.named_parameters())
    assert all(after[name] is p for name, p in before.items())
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
