"""The loss_curve outputs: the plotted series are the losses the run computed, read back from the pixels;
the image has the declared size; a latent that does not move gives a flat curve."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, pack_modules
from test_decoder_tuning import small_vae, smooth_image
from test_progress import StandInServer, last_iterations, mods, recorded_steps, run, setup  # noqa: F401

WIDTH, HEIGHT = 512, 320


@pytest.fixture
def plot(pack):
    return pack_modules(p="nodes.loss_plot").p


@pytest.fixture
def plotted(mods, monkeypatch):  # noqa: F811
    """The series each node hands to the plot, recorded on the way."""
    calls = []
    for module in (mods.optimize, pack_modules(d="nodes.decoder").d):
        original = module.loss_curve_image

        def recording(series, *args, original=original, **kwargs):
            calls.append([(s.name, list(s.values)) for s in series])
            return original(series, *args, **kwargs)

        monkeypatch.setattr(module, "loss_curve_image", recording)
    return calls


def pixels(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 of an IMAGE batch of one."""
    assert image.dtype == torch.float32 and image.shape == (1, HEIGHT, WIDTH, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    return (image[0] * 255).round().to(torch.uint8)


def rows_of(picture: torch.Tensor, color: tuple[int, int, int], column: int, area) -> list[int]:
    """Rows of the plotting area where column `column` has exactly `color`."""
    match = (picture[area.top:area.bottom + 1, column] == torch.tensor(color, dtype=torch.uint8)).all(-1)
    return [area.top + int(r) for r in torch.nonzero(match).flatten()]


def assert_drawn(plot, image: torch.Tensor, series: list[list[float]], tolerance: int = 1) -> None:
    """Every point of every series is drawn in its colour where its axis puts it."""
    picture = pixels(image)
    count = max(len(values) for values in series)
    area = plot.plot_area(WIDTH, HEIGHT, count, right_axis=len(series) == 2)
    for index, values in enumerate(series):
        limits = plot.axis_range(values)
        for step, value in enumerate(values):
            if not math.isfinite(value):
                continue
            expected = area.y(value, *limits)
            rows = rows_of(picture, plot.COLORS[index], area.x(step), area)
            assert any(abs(r - expected) <= tolerance for r in rows), (index, step, value, expected, rows)


def test_optimize_curve_plots_the_recorded_losses(setup, recorded_steps, plotted, plot):  # noqa: F811
    patcher, ref, latent = setup
    _, curve = run(patcher, ref, latent, steps=6, iterations=2, weight=0.5)
    steps = last_iterations(recorded_steps, 2)
    ad, content = [r.ad for r in steps], [r.content for r in steps]
    assert plotted == [[("AD loss", ad), ("content loss", content)]]
    assert len(set(ad)) > 1 and len(set(content)) > 1, "the run should move both losses"
    # The content curve is drawn last; where it crosses the AD curve's 5-pixel dots, their edge is left.
    assert_drawn(plot, curve, [ad, content], tolerance=2)


def test_swapped_series_would_not_match(setup, plot):  # noqa: F811
    """The pixel check above can fail: the same plot read with the series reversed does not match."""
    values = [0.5, 0.4, 0.35, 0.3, 0.28, 0.27]
    image = plot.loss_curve_image([plot.Series("AD loss", values)], "step", "t")
    assert_drawn(plot, image, [values])
    with pytest.raises(AssertionError):
        assert_drawn(plot, image, [values[::-1]])


def test_lr_zero_gives_a_flat_curve(pack, plot):
    """With the timestep embedding zeroed the features do not depend on the step's timestep, so the loss only
    changes when the latent moves: lr 0 gives a flat curve, drawn as one horizontal line; lr 0.05 falls."""
    m = pack_modules(session="attention.session", autograd="guidance.autograd", opt="guidance.optimize",
                     node="nodes.optimize")
    with torch.inference_mode():
        patcher = tm.build("sd15", scale=0.1)
        last = patcher.model.diffusion_model.time_embed[-1]
        last.weight.zero_()
        last.bias.zero_()
    g = torch.Generator().manual_seed(8)
    ref = capture(patcher, torch.randn(1, 4, 8, 8, generator=g) * 4, tm.conditioning("sd15"))
    latent = torch.randn(1, 4, 8, 8, generator=g) * 4
    curves = {}
    for lr in (0.0, 0.05):
        history = m.node.StepLosses(8, content=False)
        session = m.session.ADModelSession(patcher, ref)
        with torch.inference_mode(), m.autograd.autograd_through(patcher.model.diffusion_model):
            settings = m.opt.OptimizeSettings(steps=8, lr=lr, iterations=1, content_weight=0.0)
            m.opt.optimize_latent(session, session.to_model_space(latent), settings, on_iteration=history.record)
        curves[lr] = (history.ad, pixels(plot.loss_curve_image(history.series(), "step", "t")))
    flat, flat_picture = curves[0.0]
    assert max(flat) - min(flat) <= 1e-6 * abs(flat[0]), flat
    moving, moving_picture = curves[0.05]
    assert moving[-1] < moving[0] * 0.95, moving
    area = plot.plot_area(WIDTH, HEIGHT, 8, right_axis=False)

    def curve_rows(picture):
        return {r for x in range(area.left + 1, area.right) for r in rows_of(picture, plot.COLORS[0], x, area)}

    middle = area.y(flat[0], *plot.axis_range(flat))
    assert curve_rows(flat_picture) <= set(range(middle - plot.MARKER_RADIUS, middle + plot.MARKER_RADIUS + 1))
    assert max(curve_rows(moving_picture)) - min(curve_rows(moving_picture)) > 50


def test_zero_lr_node_returns_its_latent_and_an_empty_plot(setup, plot):  # noqa: F811
    patcher, ref, latent = setup
    out, curve = run(patcher, ref, latent, steps=3, lr=0.0)
    assert torch.equal(out, latent)
    picture = pixels(curve)
    area = plot.plot_area(WIDTH, HEIGHT, 3, right_axis=True)
    inside = picture[area.top:area.bottom, area.left:area.right]
    for color in plot.COLORS:
        assert not (inside == torch.tensor(color, dtype=torch.uint8)).all(-1).any(), "a curve was drawn"


def test_constant_and_non_finite_values_are_drawn_without_error(plot):
    series = [[0.0] * 4, [1.0, float("nan"), float("inf"), 2.0]]
    image = plot.loss_curve_image([plot.Series("AD loss", series[0]), plot.Series("content loss", series[1])],
                                  "step", "t")
    assert_drawn(plot, image, series)
    with pytest.raises(ValueError, match="two series"):
        plot.plot_losses([plot.Series(str(i), [1.0]) for i in range(3)])


# -- AD Fine-Tune VAE Decoder ----------------------------------------------------------------------------

def test_decoder_curve_plots_each_epochs_loss(pack, plotted, plot, monkeypatch):
    decoder = pack_modules(d="nodes.decoder").d
    histories = []
    original = decoder.finetune_decoder
    monkeypatch.setattr(decoder, "finetune_decoder",
                        lambda *a, **k: histories.append(original(*a, **k)) or histories[-1])
    server = StandInServer()
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=server)
    monkeypatch.setitem(sys.modules, "server", module)
    node = decoder.ADFineTuneVAEDecoder()
    with torch.inference_mode():
        _, curve = node.finetune(small_vae(), smooth_image(32, 32), 5, 1e-3, 512, 0)
    (history,) = histories
    assert plotted == [[("reconstruction L1", history)]]
    assert history[-1] < history[0]
    assert_drawn(plot, curve, [history])
    assert [t for t, _ in server.texts] == [f"epoch {e + 1}/5\nreconstruction L1 {v:.4g}" for e, v in enumerate(history)]


def test_decoder_with_zero_epochs_returns_its_vae_and_an_empty_plot(pack):
    node = pack_modules(d="nodes.decoder").d.ADFineTuneVAEDecoder()
    vae = small_vae()
    with torch.inference_mode():
        same, curve = node.finetune(vae, smooth_image(32, 32), 0, 1e-3, 512, 0)
    assert same is vae and pixels(curve).shape == (HEIGHT, WIDTH, 3)
