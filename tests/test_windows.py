"""AD Texture Windows: textures larger than the reference in overlapping windows.

What must hold: the plan covers every latent pixel (wrapping on tiling axes); one whole window
is exactly the unwindowed algorithm; windows that do not overlap are exactly independent runs
on each window (Adam is per coordinate); overlapping guidance windows are averaged; and the
memory of a 4x larger latent stays that of one window.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from ad_helpers import capture, optimize, pack_modules
from memory_meter import peak_bytes

REF = 8  # reference latent side (the tiny UNet halves once, so sides are even)


@pytest.fixture(scope="module")
def mods(pack):
    return pack_modules(windows="guidance.windows", guided="guidance.guided", optimize="guidance.optimize",
                        autograd="guidance.autograd", session="attention.session", node="nodes.windows",
                        guidance_node="nodes.guidance", optimize_node="nodes.optimize", errors="nodes.errors")


@pytest.fixture(scope="module")
def sd15():
    with torch.inference_mode():
        return tm.build("sd15", seed=0)


@pytest.fixture(scope="module")
def reference(sd15):
    latent = 5.0 * torch.randn(1, 4, REF, REF, generator=torch.Generator().manual_seed(3))
    return capture(sd15, latent, tm.conditioning("sd15", seed=9))


def windows_node(mods, size_px: int, stride_px: int):
    with torch.inference_mode():
        return mods.node.ADTextureWindows().windows(size_px, stride_px)[0]


# -- the plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,size,stride,wrap", [(20, 8, 3, False), (20, 8, 8, False), (16, 8, 4, True),
                                                      (18, 8, 5, True), (6, 8, 2, False), (24, 8, 8, True)])
def test_plan_covers_every_pixel_and_stays_in_bounds(mods, length, size, stride, wrap):
    w = mods.windows
    starts, span = w.window_starts(length, size, stride, wrap)
    assert span == min(size, length)
    assert starts[0] == 0 and all(b - a <= stride for a, b in zip(starts, starts[1:]))
    if not wrap:
        assert starts[-1] + span == length, "the last window ends at the edge"
    plan = w.plan_windows(length, 4, w.WindowSettings(size, stride), wrap_y=wrap)
    count = w.coverage(plan, length, 4)
    assert bool((count >= 1).all())
    if wrap and size < length and length % stride == 0:
        assert bool((count == count[0, 0]).all()), "wrapping windows cover every pixel equally"


def test_crop_and_add_into_wrap_around_the_edge(mods):
    w = mods.windows
    latent = torch.arange(6 * 5, dtype=torch.float32).reshape(1, 1, 6, 5)
    window = w.Window(top=4, left=3, height=4, width=3, rows=6, cols=5)
    crop = window.crop(latent)
    expected = latent.roll(shifts=(-4, -3), dims=(-2, -1))[..., :4, :3]
    assert torch.equal(crop, expected)
    total = torch.zeros_like(latent)
    window.add_into(total, crop)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    for r in (4, 5, 0, 1):
        for c in (3, 4, 0):
            mask[r, c] = True
    assert torch.equal(total[0, 0][mask], latent[0, 0][mask]) and bool((total[0, 0][~mask] == 0).all())
    labels = torch.arange(12 * 10).reshape(1, 12, 10)  # labels at 2x the latent
    assert torch.equal(window.crop_labels(labels), labels.roll(shifts=(-8, -6), dims=(-2, -1))[..., :8, :6])


def test_node_converts_pixels_and_rejects_bad_plans(mods, sd15, reference):
    settings = windows_node(mods, 512, 64)
    assert (settings.size, settings.stride) == (64, 8)
    error = mods.errors.ADNodeError
    for size, stride, words in [(512, 1024, "larger than window_size"), (100, 64, "multiples of 8"),
                                (512, 12, "multiples of 8"), (0, 8, "between")]:
        with pytest.raises(error, match=words):
            windows_node(mods, size, stride)
    with pytest.raises(error, match=r"\[AD Loss Guidance\] 'windows' must come from AD Texture Windows"):
        with torch.inference_mode():
            mods.guidance_node.ADLossGuidance().patch(sd15, reference, 0.015, 2, True, 0.0, 1.0, 0, windows=(64, 8))
    with pytest.raises(error, match=r"\[Latent AD Optimize\] 'windows' must come from AD Texture Windows"):
        optimize(sd15, reference, torch.zeros(1, 4, REF, REF), windows={"size": 64})


# -- equivalences ----------------------------------------------------------------------------------


def test_one_whole_window_is_exactly_the_unwindowed_run(mods, sd15, reference):
    start = torch.randn(1, 4, REF, REF, generator=torch.Generator().manual_seed(5))
    plain = optimize(sd15, reference, start, steps=3, weight=0.3)
    whole = optimize(sd15, reference, start, steps=3, weight=0.3, windows=windows_node(mods, REF * 8, 8))
    assert torch.equal(plain, whole)


def test_disjoint_windows_are_independent_runs_on_each_window(mods, sd15, reference):
    """Adam updates each coordinate from its own gradients, so four windows that do not overlap
    give exactly the four results of optimizing each quarter alone."""
    start = torch.randn(1, 4, 2 * REF, 2 * REF, generator=torch.Generator().manual_seed(6))
    windowed = optimize(sd15, reference, start, steps=3, weight=0.3, windows=windows_node(mods, REF * 8, REF * 8))
    for top in (0, REF):
        for left in (0, REF):
            quarter = start[..., top : top + REF, left : left + REF].contiguous()
            alone = optimize(sd15, reference, quarter, steps=3, weight=0.3)
            torch.testing.assert_close(windowed[..., top : top + REF, left : left + REF], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(windowed, start), "the windows were optimized"


def _guidance_update(mods, sd15, reference, latent, windows, labels=None):
    g = mods.guided
    session = mods.session.ADModelSession(sd15, reference)
    noise = g.step_noise(tuple(session.reference_latent.shape), 0, 0, 0)
    settings = g.GuidanceSettings(lr=0.05, iterations=2, adain=True)
    with torch.inference_mode(), mods.autograd.autograd_through(sd15.model.diffusion_model):
        return g.ad_guidance_update(session, latent, 1.5, noise, settings, windows=windows, target_labels=labels)


def test_guidance_windows_are_averaged_where_they_overlap(mods, sd15, reference):
    """Each window gets the whole update on its own (AdaIN, fresh Adam), like the reference
    code's panorama mode; overlaps take the mean."""
    w = mods.windows
    latent = 2.0 * torch.randn(1, 4, REF, 2 * REF, generator=torch.Generator().manual_seed(7))
    plan = w.plan_windows(REF, 2 * REF, w.WindowSettings(size=REF, stride=REF // 2))
    assert len(plan) == 3
    combined = _guidance_update(mods, sd15, reference, latent, plan)
    total = torch.zeros_like(latent)
    for window in plan:
        window.add_into(total, _guidance_update(mods, sd15, reference, window.crop(latent).contiguous(), None))
    torch.testing.assert_close(combined, total / w.coverage(plan, REF, 2 * REF), rtol=1e-5, atol=1e-6)
    alone = _guidance_update(mods, sd15, reference, latent, None)
    assert not torch.allclose(combined, alone, atol=1e-3), "windowing changes what each window sees"


def test_windowed_texture_lowers_every_window_loss(mods, sd15, reference):
    """Texture synthesis at 2x the reference side: each window ends closer to the reference."""
    from ad_helpers import losses_at

    size = 2 * REF
    noise = torch.zeros(1, 4, size, size)
    plan_node = windows_node(mods, REF * 8, REF * 4)
    result = optimize(sd15, reference, noise, steps=4, lr=0.1, weight=0.0, seed=1, windows=plan_node)
    with torch.inference_mode():
        import comfy.sample

        start = comfy.sample.prepare_noise(noise, 1)
    w = mods.windows
    scale = sd15.model.latent_format.scale_factor
    for window in w.plan_windows(size, size, plan_node)[::2]:
        before, _ = losses_at(sd15, reference, window.crop(start).contiguous() / scale)
        after, _ = losses_at(sd15, reference, window.crop(result).contiguous())
        assert after < before, window


# -- memory -----------------------------------------------------------------------------------------


def test_a_4x_larger_latent_needs_the_memory_of_one_window(mods, sd15, reference):
    side = REF
    window = windows_node(mods, side * 8, side * 8)
    small = peak_bytes(lambda: optimize(sd15, reference, torch.zeros(1, 4, side, side), steps=1, weight=0.0))
    large = torch.zeros(1, 4, 4 * side, 4 * side)
    windowed = peak_bytes(lambda: optimize(sd15, reference, large, steps=1, weight=0.0, windows=window))
    whole = peak_bytes(lambda: optimize(sd15, reference, large, steps=1, weight=0.0))
    print(f"peak tensor memory: window-sized run {small / 2**20:.2f} MiB, 4x latent windowed "
          f"{windowed / 2**20:.2f} MiB ({windowed / small:.2f}x), unwindowed {whole / 2**20:.2f} MiB ({whole / small:.2f}x)")
    assert whole > 4 * small, "the meter sees activation memory grow with the latent"
    assert windowed <= 1.3 * small


def test_guidance_memory_is_bounded_by_the_window(mods, sd15, reference):
    w = mods.windows
    side = REF
    settings = w.WindowSettings(size=side, stride=side)
    large = 2.0 * torch.randn(1, 4, 4 * side, 4 * side, generator=torch.Generator().manual_seed(8))
    small = peak_bytes(lambda: _guidance_update(mods, sd15, reference, large[..., :side, :side].contiguous(), None))
    plan = w.plan_windows(4 * side, 4 * side, settings)
    windowed = peak_bytes(lambda: _guidance_update(mods, sd15, reference, large, plan))
    print(f"guidance peak: window {small / 2**20:.2f} MiB, 4x latent windowed {windowed / 2**20:.2f} MiB")
    assert windowed <= 1.3 * small


def test_cancel_is_checked_before_every_window(mods, sd15, reference, monkeypatch):
    """An iteration over many windows can take long: Cancel stops it between windows, leaves the
    model as it was, and the next run equals a fresh one."""
    import comfy.model_management as mm

    passes = []
    real = mods.optimize.ad_objective

    def counting(*args, **kwargs):
        passes.append(1)
        if len(passes) == 3:
            mm.interrupt_current_processing(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(mods.optimize, "ad_objective", counting)
    start = torch.randn(1, 4, 2 * REF, 2 * REF, generator=torch.Generator().manual_seed(9))
    plan = windows_node(mods, REF * 8, REF * 4)  # 3 x 3 windows per iteration
    try:
        with pytest.raises(mm.InterruptProcessingException):
            optimize(sd15, reference, start, steps=2, windows=plan)
    finally:
        mm.interrupt_current_processing(False)
    assert len(passes) == 3, "stopped before the fourth window of the first iteration"
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert all(p.is_inference() for p in sd15.model.diffusion_model.parameters())
    monkeypatch.setattr(mods.optimize, "ad_objective", real)
    assert torch.equal(optimize(sd15, reference, start, steps=1, windows=plan),
                       optimize(sd15, reference, start, steps=1, windows=plan))
