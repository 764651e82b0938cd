"""Controlled texture synthesis: a label image lays out the texture, and every target region
draws only from the reference region with its label, at every distilled layer's own grid."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from ad_helpers import capture, pack_modules


@pytest.fixture(scope="module")
def mods(pack):
    return pack_modules(session="attention.session", autograd="guidance.autograd", optimize="guidance.optimize",
                        losses="guidance.losses")


def _layout() -> tuple[torch.Tensor, torch.Tensor]:
    """Reference labels: left half stone (0), right half moss (1). Target layout (16x24 latent):
    a moss disc in stone, drawn as MASK images like ImageToMask gives them."""
    reference = torch.zeros(1, 64, 64)
    reference[:, :, 32:] = 1.0
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(192.0), indexing="ij")
    target = (((ys - 64) ** 2 + (xs - 96) ** 2) < 48**2).float()[None]
    return reference, target


def test_each_target_region_draws_only_from_its_reference_region(mods):
    with torch.inference_mode():
        sd15 = tm.build("sd15", seed=0)
    ref_mask, target_mask = _layout()
    latent = 5.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = capture(sd15, latent, tm.conditioning("sd15", seed=9), reference_mask=ref_mask)
    target_labels = mods.losses.labels_from_mask(target_mask)
    session = mods.session.ADModelSession(sd15, reference)
    x = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), mods.autograd.autograd_through(sd15.model.diffusion_model), torch.no_grad():
        refs = session.reference_kv(500)
        records = session.features(x, 500)
        masks = mods.optimize.RegionMasks(reference.labels, target_labels).for_layers(refs, records)
        grids = set()
        for ref, rec, mask in zip(refs, records, masks, strict=True):
            grids.add(rec.hw)
            ref_tokens = mods.losses.labels_at(reference.labels, ref.hw)[0]
            tgt_tokens = mods.losses.labels_at(target_labels, rec.hw)[0]
            assert set(tgt_tokens.tolist()) == {0, 255} and set(ref_tokens.tolist()) == {0, 255}
            target = mods.losses.attention_target(rec.q, ref.k, ref.v, reference.attn_scale, mask)
            for label in (0, 255):
                # Replace every reference value outside this label: targets of this label's
                # tokens must not move, and the other label's tokens must.
                other = ref_tokens != label
                v = ref.v.clone()
                v[:, :, other] = torch.randn_like(v[:, :, other]) * 10
                moved = (mods.losses.attention_target(rec.q, ref.k, v, reference.attn_scale, mask) - target).abs()
                moved = moved.amax(dim=(0, 1, 3))
                assert float(moved[tgt_tokens == label].max()) == 0.0, (rec.hw, label)
                assert bool((moved[tgt_tokens != label] > 1e-3).all()), (rec.hw, label)
    assert len(grids) >= 2, "checked at more than one layer resolution"


def test_the_layout_shapes_the_texture(mods):
    """The same seed with and without the layout differs, and two layouts give two textures."""
    from ad_helpers import optimize

    with torch.inference_mode():
        sd15 = tm.build("sd15", seed=0)
    ref_mask, target_mask = _layout()
    latent = 5.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = tm.conditioning("sd15", seed=9)
    labelled = capture(sd15, latent, cond, reference_mask=ref_mask)
    empty = torch.zeros(1, 4, 16, 24)
    disc = optimize(sd15, labelled, empty, steps=2, target_mask=target_mask)
    flipped = optimize(sd15, labelled, empty, steps=2, target_mask=1.0 - target_mask)
    plain = optimize(sd15, capture(sd15, latent, cond), empty, steps=2)
    assert not torch.allclose(disc, flipped) and not torch.allclose(disc, plain)
