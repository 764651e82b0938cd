"""AD loss, content loss, masks, AdaIN and the DDIM schedule against their definitions."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def losses(pack):
    from attention_distillation_pack.guidance import losses

    return losses


def _softmax_attention(q, k, v, scale, allowed=None):
    """Literal attention: softmax((scale·q)·kᵀ/√d)·v, element by element of the formula."""
    d = q.shape[-1]
    logits = (scale * q) @ k.transpose(-1, -2) / math.sqrt(d)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def test_ad_loss_equals_formula(losses):
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    outs = [torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ks = [torch.randn(1, 3, 7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    vs = [torch.randn(1, 3, 7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for scale in (1.0, 1.7):
        expected = sum((o - _softmax_attention(q, k, v, scale)).abs().mean() for q, o, k, v in zip(qs, outs, ks, vs))
        got = losses.ad_loss(qs, outs, ks, vs, attn_scale=scale)
        assert torch.allclose(got.double(), expected, atol=1e-6)


def test_ad_target_has_no_gradient_but_out_does(losses):
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    out = torch.randn(1, 2, 5, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    losses.ad_loss([q], [out], [k], [v]).backward()
    assert q.grad is None
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_content_loss_equals_formula(losses):
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(3, 2, 6, 4, generator=g) for _ in range(3)]
    qcs = [torch.randn(1, 2, 6, 4, generator=g) for _ in range(3)]
    expected = sum((q - qc).abs().mean() for q, qc in zip(qs, qcs))
    assert torch.allclose(losses.content_loss(qs, qcs), expected, atol=1e-6)


def test_region_mask_restricts_attention(losses):
    """Each target token's target output uses only reference tokens with its label."""
    g = torch.Generator().manual_seed(2)
    ref_labels = torch.tensor([0, 0, 1, 1, 1, 2])
    tgt_labels = torch.tensor([[0, 1, 1, 2, 0]])
    mask = losses.region_attention_mask(tgt_labels, ref_labels)
    assert mask.shape == (1, 1, 5, 6)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    target = losses.attention_target(q, k, v, 1.0, mask)
    allowed = tgt_labels[0][:, None] == ref_labels[None, :]
    assert torch.allclose(target, _softmax_attention(q, k, v, 1.0, allowed), atol=1e-10)
    # Changing reference tokens of label 2 leaves every target token of other labels unchanged.
    v2 = v.clone()
    v2[..., 5, :] += 10
    changed = (losses.attention_target(q, k, v2, 1.0, mask) - target).abs().amax(dim=(0, 1, 3))
    assert torch.equal(changed > 1e-9, torch.tensor([False, False, False, True, False]))


def test_region_mask_orphan_label_attends_everywhere(losses):
    mask = losses.region_attention_mask(torch.tensor([[5, 0]]), torch.tensor([0, 1]))
    assert mask[0, 0, 0].all() and mask[0, 0, 1].tolist() == [True, False]


def test_labels_from_mask_and_resize(losses):
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    mask[:, 4:, :4] = 0.5
    labels = losses.labels_from_mask(mask)
    assert set(labels.unique().tolist()) == {0, 128, 255}
    small = losses.labels_at(labels, (2, 2))
    assert small.tolist() == [[0, 255, 128, 255]]


def test_adain_matches_reference_statistics(losses):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3 + 1
    ref = torch.randn(3, 4, 6, 6, generator=g) * 0.5 - 2
    y = losses.adain(x, ref)
    assert torch.allclose(y.mean(dim=(2, 3)), ref.mean(dim=(0, 2, 3)).expand(2, 4), atol=1e-5)
    assert torch.allclose(y.std(dim=(2, 3)), ref.std(dim=(0, 2, 3)).expand(2, 4), atol=1e-4)
    # reference-code formula, eps 1e-6
    expected = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-6) * ref.std(
        (0, 2, 3), keepdim=True) + ref.mean((0, 2, 3), keepdim=True)
    assert torch.allclose(y, expected)


def test_ddim_schedule(pack):
    from attention_distillation_pack.attention.sd_family import ddim_timesteps

    ts = ddim_timesteps(200)
    assert ts[:3] == [996, 991, 986] and ts[-1] == 1 and len(ts) == 200
    assert ddim_timesteps(50)[:2] == [981, 961] and ddim_timesteps(50)[-1] == 1
    assert ddim_timesteps(1) == [1]
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(bad)


def test_multi_reference_keys_are_concatenated_in_order(pack):
    """Two references give keys/values that are the per-reference ones side by side."""
    import tiny_models as tm
    from attention_distillation_pack.attention.reference import ADReference
    from attention_distillation_pack.attention.session import ADModelSession
    from attention_distillation_pack.guidance.autograd import autograd_through

    with torch.inference_mode():
        patcher = tm.build("sd15")
    g = torch.Generator().manual_seed(4)
    refs = torch.randn(2, 4, 8, 8, generator=g)
    cond = tm.conditioning("sd15")
    both = ADModelSession(patcher, ADReference(refs, "paper default", cond))
    first = ADModelSession(patcher, ADReference(refs[:1], "paper default", cond))
    second = ADModelSession(patcher, ADReference(refs[1:], "paper default", cond))
    with autograd_through(patcher.model.diffusion_model):
        kv_both, kv_1, kv_2 = (s.reference_kv(500) for s in (both, first, second))
    assert len(kv_both) == 6
    for b, a1, a2 in zip(kv_both, kv_1, kv_2):
        assert torch.allclose(b.k, torch.cat([a1.k, a2.k], dim=2), atol=1e-5)
        assert torch.allclose(b.v, torch.cat([a1.v, a2.v], dim=2), atol=1e-5)
        assert b.k.shape[0] == 1
