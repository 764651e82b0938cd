"""Node schema, display names and clear errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, optimize


def test_mappings_and_display_names(pack):
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert names["CaptureReferenceAttention"] == "Capture Reference Attention"
    assert names["LatentADOptimize"] == "Latent AD Optimize"
    assert set(names) == set(pack.NODE_CLASS_MAPPINGS)


def test_every_input_has_a_tooltip_and_every_node_a_description(pack):
    categories = set()
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, name
        categories.add(cls.CATEGORY)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, definition in spec.get(section, {}).items():
                assert len(definition) == 2 and definition[1].get("tooltip"), f"{name}.{input_name}"
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert categories == {"Attention Distillation"}


@pytest.fixture(scope="module")
def sd15(pack):
    with torch.inference_mode():
        patcher = tm.build("sd15")
    return patcher, capture(patcher, torch.randn(1, 4, 8, 8), tm.conditioning("sd15"))


def _error(pack):
    from attention_distillation_pack.nodes.errors import ADNodeError

    return ADNodeError


def test_non_unet_model_is_refused(pack):
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention

    flux_like = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2),
                                                      latent_format=SimpleNamespace(latent_channels=16)))
    with pytest.raises(_error(pack), match=r"\[Capture Reference Attention\].*SD1.x, SD2.x or SDXL"):
        CaptureReferenceAttention().capture(flux_like, {"samples": torch.zeros(1, 16, 8, 8)}, tm.conditioning(), "paper default")


def test_latent_channel_mismatch(pack, sd15):
    patcher, ref = sd15
    with pytest.raises(_error(pack), match=r"\[Latent AD Optimize\] 'latent' has 16 channels .* 4"):
        optimize(patcher, ref, torch.zeros(1, 16, 8, 8))
    with pytest.raises(_error(pack), match=r"\[Capture Reference Attention\] 'reference' has 16 channels"):
        capture(patcher, torch.zeros(1, 16, 8, 8), tm.conditioning())


def test_empty_reference_batch(pack, sd15):
    patcher, _ = sd15
    with pytest.raises(_error(pack), match="batch of zero"):
        capture(patcher, torch.zeros(0, 4, 8, 8), tm.conditioning())


@pytest.mark.parametrize("spec", ["", "99", "1-x", "5-2"])
def test_bad_layers_name_the_valid_range(pack, sd15, spec):
    patcher, _ = sd15
    with pytest.raises(_error(pack), match=r"\[Capture Reference Attention\]") as info:
        capture(patcher, torch.zeros(1, 4, 8, 8), tm.conditioning(), spec)
    assert "0-6" in str(info.value)


def test_mask_rules(pack, sd15):
    patcher, ref = sd15
    with pytest.raises(_error(pack), match="reference_mask on Capture Reference Attention"):
        optimize(patcher, ref, torch.zeros(1, 4, 8, 8), target_mask=torch.zeros(1, 64, 64))
    with pytest.raises(_error(pack), match="3 masks for 2 latents"):
        masked = capture(patcher, torch.zeros(2, 4, 8, 8), tm.conditioning(), reference_mask=torch.zeros(1, 64, 64))
        optimize(patcher, masked, torch.zeros(2, 4, 8, 8), target_mask=torch.zeros(3, 64, 64))
    with pytest.raises(_error(pack), match="reference_mask"):
        capture(patcher, torch.zeros(2, 4, 8, 8), tm.conditioning(), reference_mask=torch.zeros(3, 64, 64))



@pytest.mark.parametrize("references, masks, message", [
    (1, 2, "'reference_mask' has 2 masks for 1 latent; give 1 mask"),
    (2, 3, "'reference_mask' has 3 masks for 2 latents; give 1 or 2 masks"),
    (3, 2, "'reference_mask' has 2 masks for 3 latents; give 1 or 3 masks"),
])
def test_batch_messages_read_naturally_for_every_count(pack, sd15, references, masks, message):
    patcher, _ = sd15
    with pytest.raises(_error(pack)) as info:
        capture(patcher, torch.zeros(references, 4, 8, 8), tm.conditioning(), reference_mask=torch.zeros(masks, 64, 64))
    assert str(info.value) == f"[Capture Reference Attention] {message}"


def test_error_types_read_as_the_pack_in_the_ui(pack):
    """ComfyUI's error dialog names a type `<module>.<class>` (execution.full_type_name); a pack loaded
    by path would otherwise show its folder's path there."""
    from attention_distillation_pack.attention.layers import LayerSpecError
    from attention_distillation_pack.attention.tiling import TilingError
    from attention_distillation_pack.attention.unet_pass import UnsupportedModelError
    from attention_distillation_pack.guidance.guided import GuidanceInputError

    for error in (_error(pack), GuidanceInputError, LayerSpecError, TilingError, UnsupportedModelError):
        assert f"{error.__module__}.{error.__qualname__}" == f"attention_distillation.{error.__name__}"
        assert issubclass(error, ValueError)

def test_one_pixel_masks_work(pack, sd15):
    patcher, _ = sd15
    ref = capture(patcher, torch.randn(1, 4, 8, 8), tm.conditioning(), reference_mask=torch.ones(1, 1, 1))
    out = optimize(patcher, ref, torch.randn(1, 4, 8, 8), steps=2, target_mask=torch.zeros(1, 1, 1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("field, value, message", [
    ("lr", math.nan, "'lr' must be a finite number"),
    ("lr", -0.1, "'lr' must be at least 0"),
    ("steps", 0, "'steps' must be between 1 and 1000"),
    ("iterations", -1, "'iterations' must be between 0"),
    ("weight", math.inf, "'content_weight' must be a finite number"),
])
def test_numbers_outside_their_meaning(pack, sd15, field, value, message):
    patcher, ref = sd15
    kwargs = {"steps": 2, "lr": 0.05, "iterations": 1, "weight": 0.0, field: value}
    with pytest.raises(_error(pack), match=message):
        optimize(patcher, ref, torch.zeros(1, 4, 8, 8), **kwargs)


def test_reference_from_elsewhere_is_refused(pack, sd15):
    patcher, _ = sd15
    with pytest.raises(_error(pack), match="must come from Capture Reference Attention"):
        optimize(patcher, {"samples": torch.zeros(1, 4, 8, 8)}, torch.zeros(1, 4, 8, 8))


def test_sdxl_model_with_pooled_and_size_conditioning(pack):
    with torch.inference_mode():
        patcher = tm.build("sdxl", scale=0.1)
    ref = capture(patcher, torch.randn(1, 4, 8, 8) * 4, tm.conditioning("sdxl"))
    from ad_helpers import losses_at

    content = torch.randn(1, 4, 8, 12) * 4
    out = optimize(patcher, ref, content, steps=10)
    assert losses_at(patcher, ref, out)[0] < losses_at(patcher, ref, content)[0]
    with pytest.raises(_error(pack), match="null_conditioning"):
        capture(patcher, torch.randn(1, 4, 8, 8), [])
