"""Gradient checkpointing changes memory, not results."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm


@pytest.mark.parametrize("kind, layers", [("sd15", "paper default"), ("sd15", "0,2,4"), ("sdxl", "2-5")])
def test_checkpointed_pass_gives_the_same_loss_and_gradient(pack, kind, layers):
    from attention_distillation_pack.attention.reference import ADReference
    from attention_distillation_pack.attention.session import ADModelSession
    from attention_distillation_pack.guidance.autograd import autograd_through
    from attention_distillation_pack.guidance.optimize import ad_objective

    with torch.inference_mode():
        patcher = tm.build(kind, dtype=torch.float64, scale=0.1)
    g = torch.Generator().manual_seed(2)
    reference = ADReference(torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), layers,
                            tm.conditioning(kind, dtype=torch.float64))
    x0 = torch.randn(2, 4, 8, 12, generator=g, dtype=torch.float64)
    content = torch.randn(1, 4, 8, 12, generator=g, dtype=torch.float64)
    results = []
    with torch.inference_mode():
        for checkpoint in (False, True):
            session = ADModelSession(patcher, reference, gradient_checkpointing=checkpoint)
            with autograd_through(patcher.model.diffusion_model):
                x = x0.clone().requires_grad_(True)
                refs = session.reference_kv(300)
                loss, _, _ = ad_objective(session, x, 300, refs, session.queries(content, 300), 0.5, None)
                loss.backward()
                results.append((loss.detach(), x.grad.clone()))
    (loss_plain, grad_plain), (loss_ckpt, grad_ckpt) = results
    assert grad_plain.abs().sum() > 0
    assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-12, atol=0)
    assert torch.allclose(grad_plain, grad_ckpt, rtol=1e-9, atol=1e-15)


def test_node_option_changes_memory_not_the_result(pack):
    from ad_helpers import capture, optimize

    with torch.inference_mode():
        patcher = tm.build("sd15", dtype=torch.float64, scale=0.1)
    ref = capture(patcher, torch.randn(1, 4, 8, 8, dtype=torch.float64), tm.conditioning(dtype=torch.float64))
    content = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    on = optimize(patcher, ref, content, steps=3, weight=0.2, gradient_checkpointing="on")
    off = optimize(patcher, ref, content, steps=3, weight=0.2, gradient_checkpointing="off")
    assert (on - off).abs().max() <= 1e-10 * off.abs().max()


def test_auto_rule(pack):
    from attention_distillation_pack.nodes.common import use_checkpointing

    with torch.inference_mode():
        sd15, sdxl = tm.build("sd15"), tm.build("sdxl")
    assert use_checkpointing("auto", sdxl, (1, 4, 128, 128))
    assert not use_checkpointing("auto", sdxl, (1, 4, 96, 96))
    assert not use_checkpointing("auto", sd15, (1, 4, 128, 128))
    assert use_checkpointing("on", sd15, (1, 4, 8, 8)) and not use_checkpointing("off", sdxl, (1, 4, 128, 128))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_early_exit_changes_nothing(pack, kind):
    """Stopping the forward after the last selected layer gives the same features and gradient."""
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.attention.unet_pass import UNetFeaturePass, conditioning_kwargs
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        patcher = tm.build(kind, dtype=torch.float64, scale=0.1)
    base = patcher.model
    layers = select_layers(base.diffusion_model, "1,3")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    with torch.inference_mode(), autograd_through(base.diffusion_model):
        cond = conditioning_kwargs(base, tm.conditioning(kind, dtype=torch.float64), x0, torch.device("cpu"))
        for stop_early in (True, False):
            x = x0.clone().requires_grad_(True)
            records = UNetFeaturePass(base, layers, stop_early=stop_early).run(x, 400, cond)
            loss = sum(r.out.abs().mean() + r.q.pow(2).mean() for r in records)
            loss.backward()
            results.append((loss.detach(), x.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-12, atol=0)
