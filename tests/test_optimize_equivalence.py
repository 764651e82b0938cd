"""Latent AD Optimize equals the literal implementation of DESIGN §2.4 on the same weights."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm
from literal_ad import SD15_SCALE, ad_optimize


def _models(dtype):
    """The same random weights twice: as CheckpointLoaderSimple builds them (inference mode)
    for the node, and as a plain module for the literal implementation."""
    with torch.inference_mode():
        patcher = tm.build("sd15", dtype=dtype)
    plain = tm.build("sd15", dtype=dtype).model.diffusion_model.requires_grad_(False)
    return patcher, plain


def _run_node(patcher, reference, latent, cond, steps, lr, iterations, weight, ref_mask=None, tgt_mask=None):
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    with torch.inference_mode():
        (ref,) = CaptureReferenceAttention().capture(patcher, {"samples": reference}, cond, "2-6",
                                                     reference_mask=ref_mask)
        out, _ = LatentADOptimize().optimize(patcher, ref, {"samples": latent}, steps, lr, iterations, weight, 0,
                                              target_mask=tgt_mask)
    return out["samples"]


def _style_case(dtype):
    patcher, plain = _models(dtype)
    g = torch.Generator().manual_seed(11)
    reference = torch.randn(2, 4, 12, 12, generator=g).to(dtype) * 5
    content = torch.randn(1, 4, 16, 16, generator=g).to(dtype) * 5
    cond = tm.conditioning("sd15", dtype=dtype)
    from attention_distillation_pack.attention.layers import list_self_attention_layers

    keys = [la.patch_key for la in list_self_attention_layers(plain)[2:7]]

    def literal(steps, iterations, start=content):
        return ad_optimize(plain, reference * SD15_SCALE, start * SD15_SCALE, cond[0][0], keys, steps, 0.05,
                           iterations, content=content * SD15_SCALE, content_weight=0.25) / SD15_SCALE

    def node(steps, iterations):
        return _run_node(patcher, reference, content, cond, steps, 0.05, iterations, 0.25)

    return content, literal, node


def test_style_transfer_equals_literal_implementation_float64(pack):
    """A whole run in float64: equal to rounding."""
    content, literal, node = _style_case(torch.float64)
    expected = literal(8, 2)
    got = node(8, 2)
    assert (expected - content).abs().max() > 1.0, "the optimization did not move the latent"
    assert (got - expected).abs().max() <= 1e-10 * float(expected.abs().max())


@pytest.mark.parametrize("steps, iterations", [(1, 1), (2, 1), (1, 2)])
def test_style_transfer_equals_literal_implementation_float32(pack, steps, iterations):
    """One or two steps in float32: equal except where Adam's sign-like first steps on gradients
    near its eps (1e-8) amplify rounding; those stay within the algorithm's own sensitivity to a
    1e-6 change of the start latent (DESIGN §2.4)."""
    content, literal, node = _style_case(torch.float32)
    expected = literal(steps, iterations)
    got = node(steps, iterations)
    wiggle = torch.randn(content.shape, generator=torch.Generator().manual_seed(5)) * 1e-6
    perturbed = (literal(steps, iterations, content + wiggle) - expected).abs()
    sensitivity = perturbed.max()
    diff = (got - expected).abs()
    moved = (expected - content).abs()
    assert moved.median() > 0.1, "the optimization did not move the latent"
    assert diff.max() <= 2 * sensitivity + 1e-5, (float(diff.max()), float(sensitivity))
    assert diff.median() <= 2 * perturbed.median() + 1e-7, (float(diff.median()), float(perturbed.median()))


def test_texture_with_region_masks_equals_literal_implementation(pack):
    dtype = torch.float64
    patcher, plain = _models(dtype)
    g = torch.Generator().manual_seed(12)
    reference = torch.randn(1, 4, 8, 8, generator=g).to(dtype) * 5
    empty = torch.zeros(1, 4, 8, 16, dtype=dtype)
    ref_mask = torch.zeros(1, 64, 64)
    ref_mask[:, :, 32:] = 1.0
    tgt_mask = torch.zeros(1, 64, 128)
    tgt_mask[:, :32] = 1.0
    cond = tm.conditioning("sd15", dtype=dtype)
    got = _run_node(patcher, reference, empty, cond, 4, 0.05, 1, 0.0, ref_mask, tgt_mask)

    import comfy.sample
    from attention_distillation_pack.attention.layers import list_self_attention_layers

    init = comfy.sample.prepare_noise(empty, 0)
    keys = [la.patch_key for la in list_self_attention_layers(plain)[2:7]]
    expected = ad_optimize(plain, reference * SD15_SCALE, init, cond[0][0], keys, 4, 0.05, 1,
                           ref_labels=torch.round(ref_mask * 255), tgt_labels=torch.round(tgt_mask * 255)) / SD15_SCALE
    assert (got - expected).abs().max() <= 1e-9 * float(expected.abs().max())
    unmasked = ad_optimize(plain, reference * SD15_SCALE, init, cond[0][0], keys, 4, 0.05, 1) / SD15_SCALE
    assert (got - unmasked).abs().max() > 1e-4, "the masks made no difference"
