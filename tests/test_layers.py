"""Layer tables and layer selection."""

from __future__ import annotations

import pytest
import torch
from real_configs import SD15_UNET, SDXL_UNET, meta_unet

# comfyui-host-notes.md §2.1: (block, block_index, transformer_index, heads, dim_head) per AD index.
SD15_TABLE = [
    (("input", 1), 0, 0, 8, 40), (("input", 2), 0, 1, 8, 40), (("input", 4), 0, 2, 8, 80),
    (("input", 5), 0, 3, 8, 80), (("input", 7), 0, 4, 8, 160), (("input", 8), 0, 5, 8, 160),
    (("middle", 0), 0, 6, 8, 160), (("output", 3), 0, 7, 8, 160), (("output", 4), 0, 8, 8, 160),
    (("output", 5), 0, 9, 8, 160), (("output", 6), 0, 10, 8, 80), (("output", 7), 0, 11, 8, 80),
    (("output", 8), 0, 12, 8, 80), (("output", 9), 0, 13, 8, 40), (("output", 10), 0, 14, 8, 40),
    (("output", 11), 0, 15, 8, 40),
]


def _sdxl_table() -> list:
    """§2.2 of the host notes, expanded: (block, depth, heads) per SpatialTransformer in order."""
    groups = [
        (("input", 4), 2, 10), (("input", 5), 2, 10), (("input", 7), 10, 20), (("input", 8), 10, 20),
        (("middle", 0), 10, 20), (("output", 0), 10, 20), (("output", 1), 10, 20), (("output", 2), 10, 20),
        (("output", 3), 2, 10), (("output", 4), 2, 10), (("output", 5), 2, 10),
    ]
    rows = []
    for transformer_index, (block, depth, heads) in enumerate(groups):
        rows += [(block, i, transformer_index, heads, 64) for i in range(depth)]
    return rows


def _table(pack, config) -> list:
    from attention_distillation_pack.attention.layers import list_self_attention_layers

    layers = list_self_attention_layers(meta_unet(config))
    assert [layer.ad_index for layer in layers] == list(range(len(layers)))
    return [(la.block, la.block_index, la.transformer_index, la.heads, la.dim_head) for la in layers]


def test_sd15_table_matches_host_notes(pack):
    assert _table(pack, SD15_UNET) == SD15_TABLE


def test_sdxl_table_matches_host_notes(pack):
    table = _table(pack, SDXL_UNET)
    assert len(table) == 70
    assert table == _sdxl_table()


def test_paper_default_layers(pack):
    from attention_distillation_pack.attention.layers import select_layers

    sd15 = select_layers(meta_unet(SD15_UNET), "paper default")
    assert [la.ad_index for la in sd15] == list(range(10, 16))
    assert [la.patch_key for la in sd15] == [("output", i, 0) for i in range(6, 12)]
    sdxl = select_layers(meta_unet(SDXL_UNET), "paper default")
    assert [la.ad_index for la in sdxl] == list(range(64, 70))
    assert [la.patch_key for la in sdxl] == [("output", b, i) for b in (3, 4, 5) for i in (0, 1)]


@pytest.mark.parametrize(
    "spec, expected",
    [("10-15", (10, 11, 12, 13, 14, 15)), ("3,5,7", (3, 5, 7)), ("3, 5-6 ,15", (3, 5, 6, 15)),
     ("64..65", None), ("0", (0,)), (" Paper Default ", (10, 11, 12, 13, 14, 15)), ("5,5,4", (4, 5))],
)
def test_parse_layer_spec(pack, spec, expected):
    from attention_distillation_pack.attention.layers import LayerSpecError, parse_layer_spec

    if expected is None:
        with pytest.raises(LayerSpecError, match="valid indices 0-15"):
            parse_layer_spec(spec, 16)
    else:
        assert parse_layer_spec(spec, 16) == expected


@pytest.mark.parametrize("spec", ["", "   ", "abc", "10-", "3;4", "16", "-1", "7-3", "1.5", ","])
def test_bad_layer_specs_name_the_valid_range(pack, spec):
    from attention_distillation_pack.attention.layers import LayerSpecError, parse_layer_spec

    with pytest.raises(LayerSpecError) as info:
        parse_layer_spec(spec, 16)
    assert "0-15" in str(info.value)


def test_token_grid_inverts_downsampling(pack):
    from attention_distillation_pack.attention.recorder import token_grid

    assert token_grid([2, 4, 16, 24], 384) == (16, 24)
    assert token_grid([2, 4, 16, 24], 96) == (8, 12)
    assert token_grid([1, 4, 15, 9], 5 * 8) == (8, 5)
    with pytest.raises(ValueError):
        token_grid([1, 4, 16, 16], 7)


def test_runtime_order_equals_static_walk(pack):
    """The order the UNet calls attn1 replace patches is the static walk's order."""
    import tiny_models as tm
    from attention_distillation_pack.attention.layers import list_self_attention_layers

    for kind in ("sd15", "sdxl"):
        with torch.inference_mode():
            patcher = tm.build(kind)
        model = patcher.model
        layers = list_self_attention_layers(model.diffusion_model)
        seen = []

        def record(q, k, v, extra, seen=seen):
            seen.append((extra["block"][0], extra["block"][1], extra["block_index"], extra["transformer_index"]))
            return torch.nn.functional.scaled_dot_product_attention(
                *(t.view(t.shape[0], t.shape[1], extra["n_heads"], -1).transpose(1, 2) for t in (q, k, v))
            ).transpose(1, 2).reshape(q.shape)

        options = {"patches_replace": {"attn1": {la.patch_key: record for la in layers}}}
        cond = tm.conditioning(kind)[0]
        extra = {}
        if kind == "sdxl":
            extra["y"] = torch.zeros(1, 2816)
        with torch.no_grad():
            model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), context=cond[0],
                                  transformer_options=options, **extra)
        assert seen == [(*la.patch_key, la.transformer_index) for la in layers]


def test_pack_is_imported_once_by_path(pack):
    """pytest must not import the repository root as a package of its folder's name. ComfyUI's own
    loader (the executor tests) imports it again under its folder's path, which is a path, not a name."""
    import os
    import sys

    names = {m.rsplit(".", 2)[0] for m in sys.modules if m.endswith(".guidance.losses")}
    assert {name for name in names if os.sep not in name} == {pack.__name__}
