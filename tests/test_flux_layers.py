"""Flux layer walk and counting (the reference code's order: double blocks, then single
blocks), layer specs, and the clear error on a ComfyUI without Flux's attention override."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf


def selected(spec: str, diffusion_model) -> tuple[int, ...]:
    """The AD indices the pack's layer selection gives `spec` on this model."""
    from attention_distillation_pack.attention.layers import select_layers

    return tuple(layer.ad_index for layer in select_layers(diffusion_model, spec))


def _family():
    from attention_distillation_pack.attention import flux_family

    return flux_family


def test_old_core_refuses_flux_with_a_clear_message(pack):
    """On the 2024 core (no attention override) the check names the ComfyUI version needed;
    on v0.3.64 the same check passes."""
    ff = _family()
    from attention_distillation_pack.attention.unet_pass import UnsupportedModelError

    import comfy.ldm.modules.attention as attention

    if hasattr(attention, "wrap_attn"):
        assert ff.host_supports_flux()
        return
    assert not ff.host_supports_flux()
    with pytest.raises(UnsupportedModelError, match=r"Flux needs ComfyUI v0\.3\.64 or newer"):
        ff.check_flux_model(object())


@tf.requires_flux_host
@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_real_flux1_walk_counts_and_paper_default(pack, kind):
    ff = _family()
    config, meta = tf.flux1_meta(kind)
    assert type(config).__name__ == ("Flux" if kind == "dev" else "FluxSchnell")
    layers = ff.list_flux_attention_layers(meta)
    assert len(layers) == 57
    assert [layer.patch_key for layer in layers[:19]] == [("double_block", i) for i in range(19)]
    assert [layer.patch_key for layer in layers[19:]] == [("single_block", j) for j in range(38)]
    assert {(layer.heads, layer.dim_head) for layer in layers} == {(24, 128)}
    assert [layer.ad_index for layer in layers] == list(range(57))
    # the reference's Controller(self_layers=(50, 57)): calls 50..56 = single blocks 31..37
    from attention_distillation_pack.attention.layers import select_layers

    default = select_layers(meta, "paper default")
    assert [layer.ad_index for layer in default] == list(range(50, 57))
    assert [layer.patch_key for layer in default] == [("single_block", j) for j in range(31, 38)]


@tf.requires_flux_host
def test_explicit_specs_and_out_of_range_errors_name_the_valid_range(pack):
    ff = _family()
    from attention_distillation_pack.attention.layers import LayerSpecError

    _, meta = tf.flux1_meta()
    layers = ff.list_flux_attention_layers(meta)
    assert selected("0-18", meta) == tuple(range(19))
    assert [layers[i].patch_key for i in selected("18,19..20", meta)] == [
        ("double_block", 18), ("single_block", 0), ("single_block", 1)]
    with pytest.raises(LayerSpecError) as error:
        selected("50-57", meta)
    message = str(error.value)
    assert "0-56" in message and "double blocks 0-18" in message and "single blocks 19-56" in message
    with pytest.raises(LayerSpecError, match="cannot read"):
        selected("last seven", meta)


@tf.requires_flux_host
@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_tiny_models_walk_from_the_loaded_model(pack, kind):
    """Counts come from the model, not from FLUX.1's numbers: 2 double + 3 single blocks;
    with fewer than 7 layers the default is all of them."""
    ff = _family()
    with torch.inference_mode():
        patcher = tf.build(kind)
    model = patcher.model
    ff.check_flux_model(model)
    assert bool(model.diffusion_model.params.guidance_embed) is (kind == "dev")
    layers = ff.list_flux_attention_layers(model.diffusion_model)
    assert [layer.patch_key for layer in layers] == [
        ("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1), ("single_block", 2)]
    assert selected("paper default", model.diffusion_model) == (0, 1, 2, 3, 4)
    assert "5 attention layers: double blocks 0-1, single blocks 2-4" in ff.describe_layers(layers)


def test_paper_default_rule_on_other_depths(pack):
    """The rule, stated without a model: the last 7 layers, which are the last 7 single
    blocks wherever there are at least 7 (every released Flux)."""
    ff = _family()

    def layers(double: int, single: int):
        kinds = [("double_block", i) for i in range(double)] + [("single_block", j) for j in range(single)]
        return [ff.FluxAttentionLayer(n, kind, i, 4, 16) for n, (kind, i) in enumerate(kinds)]

    assert ff.FLUX.default_layers(layers(8, 38)) == tuple(range(39, 46))
    assert ff.FLUX.default_layers(layers(4, 3)) == tuple(range(7))
    assert ff.FLUX.default_layers(layers(1, 2)) == (0, 1, 2)


@tf.requires_flux_host
def test_sd_and_unsupported_flux_variants_get_clear_errors(pack):
    ff = _family()
    import tiny_models as tm
    from attention_distillation_pack.attention.unet_pass import UnsupportedModelError

    with torch.inference_mode():
        sd = tm.build("sd15")
    with pytest.raises(UnsupportedModelError, match="not a Flux model"):
        ff.check_flux_model(sd.model)
    import comfy.supported_models as sm

    config = sm.FluxInpaint(tf.host_config(dict(tf.TINY, in_channels=96)))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        fill = config.get_model({}, "", device=torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="takes 96 latent channels"):
        ff.check_flux_model(fill)


def test_old_core_refuses_a_flux_model_in_every_node_by_name(pack):
    """The 2024 core builds ComfyUI's Flux but cannot read its attention: each node says so."""
    ff = _family()
    if ff.host_supports_flux():
        pytest.skip("this ComfyUI has Flux's attention override; the refusal is for the November 2024 core")
    import tiny_models as tm
    from ad_helpers import capture
    from attention_distillation_pack.nodes.errors import ADNodeError
    from attention_distillation_pack.nodes.guidance import ADLossGuidance
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    with torch.inference_mode():
        flux, sd = tf.build("dev"), tm.build("sd15")
    sd_reference = capture(sd, torch.randn(1, 4, 8, 8), tm.conditioning("sd15"))
    needs = r"Flux needs ComfyUI v0\.3\.64 or newer"
    with pytest.raises(ADNodeError, match=rf"\[Capture Reference Attention\] {needs}"):
        capture(flux, tf.latent(), tf.null_conditioning())
    with pytest.raises(ADNodeError, match=rf"\[AD Loss Guidance\] {needs}"):
        ADLossGuidance().patch(flux, sd_reference, 0.01, 2, True, 0.0, 1.0, 0)
    with pytest.raises(ADNodeError, match=rf"\[Latent AD Optimize\] {needs}"):
        LatentADOptimize().optimize(flux, sd_reference, {"samples": torch.zeros(1, 16, 8, 8)}, 2, 0.05, 1, 0.0, 0)


@tf.requires_flux_host
def test_the_registry_finds_flux_and_the_nodes_selection_counts_as_the_reference(pack):
    """What Capture Reference Attention uses (attention/layers.py through the family registry) on FLUX.1."""
    from attention_distillation_pack.attention.families import family_for
    from attention_distillation_pack.attention.flux_family import FLUX
    from attention_distillation_pack.attention.layers import LayerSpecError, select_layers

    _, meta = tf.flux1_meta()
    assert family_for(meta) is FLUX
    default = select_layers(meta, "paper default")
    assert [layer.patch_key for layer in default] == [("single_block", j) for j in range(31, 38)]
    assert [layer.ad_index for layer in select_layers(meta, "17-19")] == [17, 18, 19]
    with pytest.raises(LayerSpecError, match=r"valid indices 0-56 .*double blocks 0-18, single blocks 19-56"):
        select_layers(meta, "57")
