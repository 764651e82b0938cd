"""Flux.2 is its own family: the layer walk and counting on the real architectures (double, then single
blocks, as FLUX.1), "paper default" = the last ⌈7·N/57⌉ layers (docs/DESIGN.md §2.10), LongCat-Image
refused by name, and clear errors on ComfyUI without Flux.2 or with another text encoder's conditioning."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf
import tiny_flux2 as t2
from ad_helpers import capture

# (N, paper default as AD indices) from the definition's table
PAPER_DEFAULT = {"dev": (56, range(49, 56)), "klein-4b": (25, range(21, 25)), "klein-9b": (32, range(28, 32))}


def _modules():
    from ad_helpers import pack_modules

    return pack_modules(families="attention.families", layers="attention.layers", flux2="attention.flux2_family",
                        flux="attention.flux_model", family="attention.family")


@t2.requires_flux2_host
@pytest.mark.parametrize("variant", list(t2.REAL))
def test_real_architectures_walk_count_and_paper_default(pack, variant):
    m = _modules()
    config, meta = t2.real_meta(variant)
    assert type(config).__name__ == "Flux2"
    double, single, heads, _, _ = t2.REAL[variant]
    assert m.families.family_for(meta) is m.flux2.FLUX2
    layers = m.layers.list_self_attention_layers(meta)
    assert [layer.patch_key for layer in layers] == (
        [("double_block", i) for i in range(double)] + [("single_block", j) for j in range(single)])
    assert [layer.ad_index for layer in layers] == list(range(double + single))
    assert {(layer.heads, layer.dim_head) for layer in layers} == {(heads, 128)}
    count, default = PAPER_DEFAULT[variant]
    assert len(layers) == count
    chosen = m.layers.select_layers(meta, "paper default")
    assert [layer.ad_index for layer in chosen] == list(default)
    assert all(layer.kind == "single_block" for layer in chosen)  # the last single blocks, no double block


@t2.requires_flux2_host
def test_paper_default_share_and_layer_errors(pack):
    m = _modules()
    assert [m.flux2.paper_default_count(n) for n in (57, 56, 25, 32, 5)] == [7, 7, 4, 4, 1]
    _, meta = t2.real_meta("klein-4b")
    with pytest.raises(m.layers.LayerSpecError) as error:
        m.layers.select_layers(meta, "20-25")
    message = str(error.value)
    assert "Flux.2" in message and "double blocks 0-4" in message and "single blocks 5-24" in message


@t2.requires_flux2_host
@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_tiny_models_are_flux2_and_flux1_stays_flux(pack, kind):
    m = _modules()
    with torch.inference_mode():
        flux2, flux1 = t2.build(kind), tf.build("dev")
    assert m.families.family_of(flux2.model).name == "Flux.2"
    assert m.families.family_of(flux1.model).name == "Flux"
    layers = m.layers.select_layers(flux2.model.diffusion_model, "paper default")
    assert [layer.patch_key for layer in layers] == [("single_block", 2)]  # ⌈7·5/57⌉ = 1


def _longcat():
    """A tiny LongCat-Image MODEL through ComfyUI's own `supported_models.LongCatImage`."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.LongCatImage(tf.host_config(dict(tf.TINY, vec_in_dim=None, guidance_embed=False, txt_ids_dims=[1, 2])))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@t2.requires_flux2_host
def test_longcat_image_is_refused_by_name(pack):
    m = _modules()
    with torch.inference_mode():
        patcher = _longcat()
    with pytest.raises(m.family.UnsupportedModelError, match="LongCat-Image is not supported"):
        m.families.family_of(patcher.model)
    with pytest.raises(Exception, match="Capture Reference Attention.*LongCat-Image is not supported"):
        capture(patcher, tf.latent(), [[torch.zeros(1, 4, 32), {}]])


@t2.requires_flux2_host
def test_flux2_null_text_is_accepted_and_another_encoder_named(pack):
    """Flux.2's text encoders have no pooled output: no CLIP-L message; a FLUX.1 (T5) conditioning
    is refused for its width, naming the node."""
    with torch.inference_mode():
        patcher = t2.build("klein")
    reference = capture(patcher, t2.latent(), t2.null_conditioning(guidance=None))
    assert reference.family == "Flux.2"
    with pytest.raises(Exception, match=r"Capture Reference Attention.*4096-wide text features.*takes 32") as error:
        capture(patcher, t2.latent(), [[torch.zeros(1, 6, 4096), {"pooled_output": torch.zeros(1, 768)}]])
    assert "pooled" not in str(error.value)


def test_hosts_without_flux2_say_which_comfyui_it_needs(pack):
    """On ComfyUI older than v0.33 (no Flux.2 models) the check names the version; everywhere the
    unsupported-model message lists Flux.2 with the ComfyUI it needs."""
    m = _modules()
    import comfy.model_base

    if hasattr(comfy.model_base, "Flux2") and m.flux.host_supports_flux():
        assert m.flux2.host_supports_flux2()
    else:
        assert not m.flux2.host_supports_flux2()
        with pytest.raises(m.family.UnsupportedModelError, match=r"Flux\.2 needs ComfyUI v0\.33 or newer"):
            m.flux2.FLUX2.check(object())

    class NotAModel:
        diffusion_model = torch.nn.Linear(2, 2)

    with pytest.raises(m.family.UnsupportedModelError, match=r"Flux\.2 \(dev or Klein, ComfyUI v0\.33 or newer\)"):
        m.families.family_of(NotAModel())
