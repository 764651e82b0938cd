"""Z-Image layer walk and counting (the N main layers = ComfyUI's `block_index`; refiners not counted;
"paper default" the last ⌈7·N/57⌉), recognition by anatomy rather than width, and the clear errors on
models and hosts Z-Image AD cannot read (docs/DESIGN.md §2.8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import tiny_zimage as tz


def _anatomy():
    from attention_distillation_pack.attention.zimage import anatomy

    return anatomy


@tz.requires_zimage_host
def test_real_zimage_walk_counts_and_paper_default(pack):
    """Z-Image(-Turbo) as ComfyUI detects it: 30 main layers of 30 heads × 128; 4 refiner blocks outside
    the count; "paper default" = 26-29 (4 = ⌈7·30/57⌉, flux_ad's share of FLUX.1)."""
    from attention_distillation_pack.attention.families import family_for
    from attention_distillation_pack.attention.layers import LayerSpecError, select_layers
    from attention_distillation_pack.attention.zimage import ZIMAGE

    config, meta = tz.real_meta()
    assert type(config).__name__ == "ZImage"
    assert len(meta.noise_refiner) == 2 and len(meta.context_refiner) == 2
    assert family_for(meta) is ZIMAGE
    layers = ZIMAGE.attention_layers(meta)
    assert [layer.ad_index for layer in layers] == list(range(30))
    assert [layer.patch_key for layer in layers] == [("layers", i) for i in range(30)]
    assert {(layer.heads, layer.dim_head) for layer in layers} == {(30, 128)}
    assert [layer.ad_index for layer in select_layers(meta, "paper default")] == [26, 27, 28, 29]
    assert [layer.ad_index for layer in select_layers(meta, "3,5-6")] == [3, 5, 6]
    with pytest.raises(LayerSpecError, match=r"valid indices 0-29 \(this Z-Image model has 30 main layers, 0-29; "
                                             r"its refiner layers are not AD layers\)"):
        select_layers(meta, "30")


def test_paper_default_share_matches_the_design_table(pack):
    """§2.8's table: the last ⌈7/57·N⌉ AD layers (FLUX.1 57 → 7, Qwen-Image 60 → 8, Flux.2 dev 56 → 7,
    Klein 25 / 32 → 4, Z-Image 30 → 4); at least one layer on a tiny model."""
    count = _anatomy().paper_default_count
    assert [count(n) for n in (57, 60, 56, 25, 32, 30, 3, 1)] == [7, 8, 7, 4, 4, 4, 1, 1]


@tz.requires_zimage_host
def test_a_narrow_zimage_is_zimage_and_the_registry_serves_it(pack):
    """Recognised by anatomy and config class, never by ComfyUI's detection width (3840)."""
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.layers import select_layers

    with torch.inference_mode():
        patcher = tz.build()
    assert patcher.model.diffusion_model.dim == 256
    family = family_of(patcher.model)
    assert family.name == "Z-Image"
    assert [layer.ad_index for layer in select_layers(patcher.model.diffusion_model, "paper default")] == [2]
    assert family.latent_channels(patcher.model) == 16


def _lumina2_patcher():
    """A tiny plain Lumina 2 (Lumina-Image 2.0 anatomy: no pad tokens, time scale 1) through ComfyUI's classes."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.Lumina2(dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32, n_layers=2,
                             qk_norm=True, n_heads=4, n_kv_heads=2, axes_dims=[4, 6, 6], axes_lens=[300, 512, 512]))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = config.get_model({}, "", device=torch.device("cpu"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@tz.requires_zimage_host
def test_plain_lumina2_is_refused_by_name(pack):
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.family import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="this Lumina 2 model is not Z-Image"):
        family_of(_lumina2_patcher().model)


def test_hosts_without_zimage_refuse_it_naming_the_comfyui_needed(pack):
    """v0.3.64 builds Lumina 2 but has no Z-Image: every node says which ComfyUI Z-Image needs. The 2024 core
    has no Lumina at all: the registry's refusal names Z-Image's ComfyUI among what AD reads."""
    anatomy = _anatomy()
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.family import UnsupportedModelError

    if anatomy.host_supports_zimage():
        assert tz.HOST_REASON is None, "the tests of this host must run: it has Z-Image"
        return
    with pytest.raises(UnsupportedModelError, match=r"or a Z-Image \(Turbo or Base, ComfyUI v0\.33\.0 or newer\)"):
        family_of(SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    if anatomy._lumina() is None:
        return  # the 2024 core: no Lumina 2 / Z-Image class to build
    import tiny_models as tm
    from ad_helpers import capture
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    lumina = _lumina2_patcher()
    with torch.inference_mode():
        sd = tm.build("sd15")
    sd_reference = capture(sd, torch.randn(1, 4, 8, 8), tm.conditioning("sd15"))
    needs = r"Z-Image needs ComfyUI v0\.33\.0 or newer"
    with pytest.raises(ADNodeError, match=rf"\[Capture Reference Attention\] {needs}"):
        capture(lumina, tz.latent(), tz.null_conditioning())
    with pytest.raises(ADNodeError, match=rf"\[AD Loss Guidance\] {needs}"):
        ADLossGuidance().patch(lumina, sd_reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=rf"\[Latent AD Optimize\] {needs}"):
        LatentADOptimize().optimize(lumina, sd_reference, {"samples": torch.zeros(1, 16, 8, 8)}, 2, 0.05, 1, 0.0, 0)


@tz.requires_zimage_host
def test_token_layout_follows_comfyui_padding(pack):
    """Caption and image tokens are each padded to 32; the latent to whole 2×2 patches."""
    layout = _anatomy().token_layout
    with torch.inference_mode():
        dm = tz.build().model.diffusion_model
    empty = layout(dm, 8, 128, 128)  # 1024²: 4096 image tokens, no image pads
    assert (empty.text, empty.text_padded, empty.grid, empty.image_padded) == (8, 32, (64, 64), 4096)
    assert empty.keys_around_grid == (32, 0)
    portrait = layout(dm, 8, 152, 104)  # 832x1216: 3952 image tokens + 16 pads
    assert (portrait.image, portrait.image_padded, portrait.keys_around_grid) == (3952, 3968, (32, 16))
    odd = layout(dm, 40, 7, 5)
    assert (odd.text_padded, odd.grid, odd.image_padded, odd.sequence) == (64, (4, 3), 32, 96)
    feature = torch.arange(96.0).reshape(1, 1, 96, 1)
    assert odd.query_rows(feature).flatten().tolist() == list(range(40)) + list(range(64, 76))
