"""AD nodes together with each other and with other model patches; repeated and re-queued runs."""

from __future__ import annotations

import gc
import math

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, optimize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

POS, NEG = tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)


@pytest.fixture(scope="module")
def model(pack):
    with torch.inference_mode():
        return tm.build("sd15", scale=0.1)


@pytest.fixture(scope="module")
def reference(model):
    return capture(model, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 5, tm.conditioning())


def guide(model, reference, lr=0.015, iterations=2, adain=True, start=0.0, end=1.0, seed=0, **optional):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    with torch.inference_mode():
        return ADLossGuidance().patch(model, reference, lr, iterations, adain, start, end, seed, **optional)[0]


def sample(model, seed=0, steps=3, latent=None, denoise=1.0):
    import comfy.sample

    with torch.inference_mode():
        latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", POS, NEG, latent, denoise=denoise,
                                   seed=seed, disable_pbar=True)


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, 0.015, 0.05, 1.0, 1.5, -0.1]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=NUMBERS, iterations=st.integers(-2, 30), start=NUMBERS, end=NUMBERS,
       seed=st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**66), -1), st.integers(2**64, 2**66)),
       weight=NUMBERS)
def test_guidance_inputs_through_their_range_and_beyond(model, reference, lr, iterations, start, end, seed, weight):
    """A patched model, or an ADNodeError naming the node: never another exception."""
    from attention_distillation_pack.nodes.errors import ADNodeError

    try:
        patched = guide(model, reference, lr, iterations, True, start, end, seed, content_weight=weight)
    except ADNodeError as error:
        assert str(error).startswith("[AD Loss Guidance]")
        return
    assert math.isfinite(lr) and lr >= 0 and 0 <= seed < 2**64 and 0 <= start <= 1 and 0 <= end <= 1
    assert patched is not model
    added = len(patched.model_options.get("sampler_post_cfg_function", [])) - len(
        model.model_options.get("sampler_post_cfg_function", []))
    assert added == (0 if iterations == 0 else 1), "a no-op node adds no hook"


def test_optimize_then_guided_img2img_in_one_graph(model, reference):
    other = capture(model, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 5, tm.conditioning())
    start = optimize(model, reference, torch.zeros(1, 4, 8, 8), steps=3, seed=1)
    plain = sample(model, latent=start, denoise=0.6)
    guided = sample(guide(model, other), latent=start, denoise=0.6)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
    assert torch.equal(plain, sample(model, latent=start, denoise=0.6)), "the input model changed"


def test_cross_attention_patch_and_guidance_both_take_effect(model, reference):
    """An attn2 replace patch (as IPAdapter-style packs register) stays active beside the guidance."""
    calls = []

    def attn2_patch(q, k, v, extra_options):
        calls.append(extra_options["block"])
        heads = extra_options["n_heads"]
        b, n, c = q.shape
        split = [t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split)
        return 0.5 * out.transpose(1, 2).reshape(b, n, c)

    patched = model.clone()
    patched.set_model_attn2_replace(attn2_patch, "output", 1)
    guided = guide(patched, reference)
    both = sample(guided)
    assert calls, "the attn2 patch was not called"
    assert "attn2" in guided.model_options["transformer_options"]["patches_replace"]
    assert not torch.equal(both, sample(patched)), "the guidance had no effect"
    assert not torch.equal(both, sample(guide(model, reference))), "the attn2 patch had no effect"


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_twenty_guided_runs_do_not_grow(model, reference):
    guided = guide(model, reference)
    counts = []
    for run in range(20):
        sample(guided, seed=run, steps=2)
        counts.append(_live_tensors())
    assert counts[-1] == counts[1], counts


def test_requeue_with_only_the_sampler_seed_changed(model):
    """Reference features are reused, and the result equals a fresh capture's."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 5
    ref = capture(model, latent, tm.conditioning())
    guided = guide(model, ref)
    sample(guided, seed=0)
    misses = ref.cache.misses
    again = sample(guided, seed=1)
    assert ref.cache.misses == misses and ref.cache.hits > 0
    fresh = sample(guide(model, capture(model, latent, tm.conditioning())), seed=1)
    assert torch.equal(again, fresh)
