"""Latent AD Optimize behaves as AD should, and leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, losses_at, optimize


@pytest.fixture(scope="module")
def setup(pack):
    with torch.inference_mode():
        patcher = tm.build("sd15", scale=0.1)
    g = torch.Generator().manual_seed(21)
    reference = torch.randn(1, 4, 8, 8, generator=g) * 4
    content = torch.randn(1, 4, 12, 12, generator=g) * 4
    ref = capture(patcher, reference, tm.conditioning("sd15"))
    return patcher, ref, reference, content


def test_ad_loss_falls_over_the_run(setup):
    patcher, ref, _, content = setup
    before, _ = losses_at(patcher, ref, content)
    after, _ = losses_at(patcher, ref, optimize(patcher, ref, content, steps=20, weight=0.0))
    assert after < 0.8 * before, (before, after)


def test_texture_synthesis_at_another_size(setup):
    patcher, ref, reference, _ = setup
    empty = torch.zeros(2, 4, 12, 20)
    out = optimize(patcher, ref, empty, steps=20, seed=3)
    assert out.shape == empty.shape and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1]), "batch items must start from different noise"
    import comfy.sample

    start = comfy.sample.prepare_noise(empty, 3) / 0.18215
    assert losses_at(patcher, ref, out)[0] < losses_at(patcher, ref, start)[0]


def test_same_seed_same_latent(setup):
    patcher, ref, _, _ = setup
    empty = torch.zeros(1, 4, 8, 8)
    a = optimize(patcher, ref, empty, steps=3, seed=7)
    b = optimize(patcher, ref, empty, steps=3, seed=7)
    c = optimize(patcher, ref, empty, steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_content_weight_lowers_content_loss(setup):
    patcher, ref, _, content = setup
    free = optimize(patcher, ref, content, steps=10, weight=0.0)
    kept = optimize(patcher, ref, content, steps=10, weight=5.0)
    _, content_free = losses_at(patcher, ref, free, content=content)
    _, content_kept = losses_at(patcher, ref, kept, content=content)
    assert content_kept < content_free, (content_kept, content_free)


def test_content_input_overrides_the_start_latent_as_target(setup):
    patcher, ref, _, content = setup
    other = torch.flip(content, dims=[-1])
    own = optimize(patcher, ref, content, steps=3, weight=1.0)
    with_other = optimize(patcher, ref, content, steps=3, weight=1.0, content={"samples": other})
    assert not torch.equal(own, with_other)


@pytest.mark.parametrize("lr, iterations", [(0.0, 1), (0.05, 0)])
def test_zero_lr_or_iterations_is_a_no_op(setup, lr, iterations):
    patcher, ref, _, content = setup
    assert torch.equal(optimize(patcher, ref, content, steps=3, lr=lr, iterations=iterations), content)


def _plain_sample(patcher):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(patcher, noise, 3, 5.0, "euler", "normal", tm.conditioning("sd15", 1),
                                   tm.conditioning("sd15", 2), latent, seed=0, disable_pbar=True)


def test_input_model_is_unchanged(pack):
    import comfy.sd

    with torch.inference_mode():
        base = tm.build("sd15", scale=0.1)
        patcher, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base), 1.0, 0.0)
    options_before = repr(patcher.model_options)
    before = _plain_sample(patcher)
    ref = capture(patcher, torch.randn(1, 4, 8, 8), tm.conditioning("sd15"))
    optimize(patcher, ref, torch.randn(1, 4, 8, 8), steps=3)
    after = _plain_sample(patcher)
    assert torch.equal(before, after)
    assert repr(patcher.model_options) == options_before
    params_after = list(patcher.model.diffusion_model.parameters())
    assert all(p.is_inference() and p.grad is None for p in params_after), "an alias or a gradient was left behind"


def test_reference_and_content_features_are_cached_across_runs(setup):
    patcher, _, reference, content = setup
    ref = capture(patcher, reference, tm.conditioning("sd15"))
    first = optimize(patcher, ref, content, steps=4, iterations=2, weight=0.5)
    assert (ref.cache.misses, ref.cache.hits) == (8, 0)  # reference and content, per timestep
    second = optimize(patcher, ref, content, steps=4, iterations=2, weight=0.5)
    assert (ref.cache.misses, ref.cache.hits) == (8, 8)
    assert torch.equal(first, second)
    optimize(patcher, ref, content * 1.5, steps=4, iterations=2, weight=0.5)
    assert (ref.cache.misses, ref.cache.hits) == (12, 12), "another content latent must not hit"


def test_cache_keeps_what_fits_and_makes_room_from_older_runs(pack):
    from attention_distillation_pack.attention.cache import FeatureCache

    cache = FeatureCache(budget_bytes=3 * 4 * 10)
    calls = []

    def run(keys):
        cache.begin_run()
        for key in keys:
            cache.get_or_compute(key, lambda key=key: calls.append(key) or [torch.zeros(10)])

    run(range(5))
    run(range(5))
    assert calls == [0, 1, 2, 3, 4, 3, 4], "a re-run hits the entries that fit; LRU would have kept none"
    assert (cache.hits, cache.misses, cache.not_stored, cache.stored_bytes) == (3, 7, 4, 120)
    calls.clear()
    run([0, "a", "b"])  # another run (another noise seed) replaces entries the current run has not used
    assert calls == ["a", "b"] and set(cache.entries) == {"a", "b", 0}


def test_progress_and_cancel(setup):
    """Progress reaches the UI per step; Cancel stops within one iteration and leaves nothing behind."""
    import comfy.model_management as mm
    import comfy.utils

    patcher, ref, _, content = setup
    seen = []

    def hook(value, total, preview=None, *args, **kwargs):
        seen.append((value, total))
        if len(seen) == 1:  # ComfyUI always sends a bar's first update (v0.33 throttles the ones after it)
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            optimize(patcher, ref, content, steps=6, iterations=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [(1, 6)], seen
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert all(p.is_inference() for p in patcher.model.diffusion_model.parameters())
    fresh = optimize(patcher, ref, content, steps=3)
    again = optimize(patcher, ref, content, steps=3)
    assert torch.equal(fresh, again)
