"""Every node input driven through its declared range and beyond: a result or a clear error."""

from __future__ import annotations

import math

import pytest
import torch
import tiny_models as tm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-12, 0.05, 1.0, 10.0, 11.0, -1.0]),
)


@pytest.fixture(scope="module")
def model(pack):
    with torch.inference_mode():
        return tm.build("sd15")


def _error(pack):
    from attention_distillation_pack.nodes.errors import ADNodeError

    return ADNodeError


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.one_of(st.integers(-3, 4), st.sampled_from([1000, 1001, 10**6])),
    lr=NUMBERS,
    iterations=st.one_of(st.integers(-2, 3), st.just(1001)),
    weight=NUMBERS,
    seed=st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**70), -1), st.integers(2**64, 2**70)),
    batch=st.integers(1, 2),
    with_content=st.booleans(),
)
def test_optimize_inputs(pack, model, steps, lr, iterations, weight, seed, batch, with_content):
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    valid = (1 <= steps <= 1000 and math.isfinite(lr) and lr >= 0 and 0 <= iterations <= 1000
             and math.isfinite(weight) and weight >= 0 and 0 <= seed < 2**64)
    assume(not valid or iterations == 0 or lr == 0 or steps * iterations <= 8)
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    content = {"samples": torch.randn(1, 4, 8, 8)} if with_content else None
    with torch.inference_mode():
        (ref,) = CaptureReferenceAttention().capture(model, {"samples": torch.randn(1, 4, 8, 8)}, tm.conditioning(),
                                                     "paper default")
        if not valid:
            with pytest.raises(_error(pack)):
                LatentADOptimize().optimize(model, ref, latent, steps, lr, iterations, weight, seed, content=content)
            return
        out, _ = LatentADOptimize().optimize(model, ref, latent, steps, lr, iterations, weight, seed, content=content)
    assert out["samples"].shape == latent["samples"].shape
    assert torch.isfinite(out["samples"]).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.one_of(st.text(max_size=12), st.sampled_from(["paper default", "0-6", "6", "7", "-1", "3,4"])),
       attn_scale=NUMBERS)
def test_capture_inputs(pack, model, layers, attn_scale):
    from attention_distillation_pack.attention.layers import parse_layer_spec
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention

    try:
        parse_layer_spec(layers, 7)
        layers_ok = True
    except ValueError:
        layers_ok = False
    valid = layers_ok and math.isfinite(attn_scale) and attn_scale >= 0
    with torch.inference_mode():
        call = lambda: CaptureReferenceAttention().capture(  # noqa: E731
            model, {"samples": torch.randn(1, 4, 8, 8)}, tm.conditioning(), layers, attn_scale=attn_scale)
        if valid:
            (ref,) = call()
            assert ref.attn_scale == attn_scale
        else:
            with pytest.raises(_error(pack)):
                call()
