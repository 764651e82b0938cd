"""Qwen-Image's AD layers as docs/DESIGN.md §2.8 counts them: one joint attention per block, AD index =
block index, "paper default" = the last ⌈7·N/57⌉ blocks (52-59 of the real model's 60, found by walking a
meta-device model of the real architecture that ComfyUI's detection configures), indices out of range
named; models AD cannot read refused with a message; and the family's null text, latent and AdaIN checks."""

from __future__ import annotations

import pytest
import torch
import tiny_qwen_image as tq

pytestmark = tq.requires_qwen_host


@pytest.mark.parametrize("edit", [None, "2511"])
def test_real_architecture_has_60_layers_and_paper_default_52_to_59(pack, edit):
    from attention_distillation_pack.attention.layers import list_self_attention_layers, select_layers

    config, meta = tq.real_meta(edit)
    assert type(config).__name__ == "QwenImage" and config.unet_config["num_layers"] == 60
    layers = list_self_attention_layers(meta)
    assert [layer.ad_index for layer in layers] == list(range(60))
    assert {(layer.heads, layer.dim_head) for layer in layers} == {(24, 128)}
    assert [layer.patch_key for layer in layers[:2]] == [("double_block", 0), ("double_block", 1)]
    assert [layer.ad_index for layer in select_layers(meta, "paper default")] == list(range(52, 60))
    assert [layer.ad_index for layer in select_layers(meta, "3,5-7")] == [3, 5, 6, 7]


def test_paper_default_rounds_up_and_out_of_range_names_the_blocks(pack):
    from attention_distillation_pack.attention.layer_spec import LayerSpecError
    from attention_distillation_pack.attention.layers import select_layers

    with torch.inference_mode():
        dm = tq.build().model.diffusion_model
    assert [layer.ad_index for layer in select_layers(dm, "paper default")] == [7, 8]  # ⌈63/57⌉ = 2, not round: 1
    with pytest.raises(LayerSpecError, match="9 blocks, 0-8"):
        select_layers(dm, "9")


def test_family_and_checks(pack):
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.family import UnsupportedModelError

    with torch.inference_mode():
        patcher = tq.build()
    family = family_of(patcher.model)
    assert family.name == "Qwen-Image" and family.latent_ndim == 5
    base = patcher.model
    assert family.conditioning_mismatch(base, tq.null_conditioning()) is None
    wrong = [[torch.zeros(1, 5, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    assert "Qwen-Image's text encoder" in family.conditioning_mismatch(base, wrong)
    view = family.adain_view(tq.latent(height=4, width=6))
    assert view.shape == (1, 16, 1, 2, 2, 3, 2) and family.adain_dims == (2, 3, 5)
    with pytest.raises(ValueError, match="even height and width"):
        family.adain_view(tq.latent(height=5, width=6))
    with torch.inference_mode():
        other = tq.build()
        other.model.diffusion_model.img_in = torch.nn.Linear(128, 48)
    with pytest.raises(UnsupportedModelError, match="64"):
        family_of(other.model)


def test_host_without_qwen_override_says_which_comfyui(pack, monkeypatch):
    """v0.3.64's Qwen-Image flattens the heads before the attention override: the message names v0.33.0."""
    import comfy.ldm.qwen_image.model as qwen_model
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.family import UnsupportedModelError

    with torch.inference_mode():
        patcher = tq.build()
    monkeypatch.delattr(qwen_model, "apply_rope1")
    with pytest.raises(UnsupportedModelError, match="Qwen-Image needs ComfyUI v0.33.0 or newer"):
        family_of(patcher.model)

