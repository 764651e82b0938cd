"""What a running node shows: live previews through the host's latent_preview, the losses as text on the
node, a console bar and a log line; nothing breaks where the host has none of it.

Previews use ComfyUI's own `latent_preview` where the host has it (COMFYUI_PATH); the 2024 core ships
none, and there a stand-in with the same interface (get_previewer(device, latent_format) returning an
object with decode_latent_to_preview_image) checks what the pack hands the host.
"""

from __future__ import annotations

import logging
import re
import sys
import types

import pytest
import torch
import tiny_models as tm
from ad_helpers import capture, pack_modules
from PIL import Image


@pytest.fixture(scope="module")
def setup(pack):
    with torch.inference_mode():
        patcher = tm.build("sd15", scale=0.1)
    g = torch.Generator().manual_seed(4)
    ref = capture(patcher, torch.randn(1, 4, 8, 8, generator=g) * 4, tm.conditioning("sd15"))
    return patcher, ref, torch.randn(1, 4, 8, 8, generator=g) * 4


@pytest.fixture
def mods(pack):
    return pack_modules(optimize="nodes.optimize", progress="nodes.progress", windows="nodes.windows",
                        guidance="nodes.guidance")


def run(patcher, ref, latent, steps=5, lr=0.05, iterations=1, weight=0.25, **kwargs):
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    with torch.inference_mode():
        out, curve = LatentADOptimize().optimize(patcher, ref, {"samples": latent}, steps, lr, iterations, weight, 0,
                                                 **kwargs)
    return out["samples"], curve


class HookCalls:
    """ComfyUI's global progress-bar hook, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, object]] = []

    def __call__(self, value, total, preview=None, **_: object) -> None:
        self.calls.append((value, total, preview))

    @property
    def previews(self) -> list:
        return [p for _, _, p in self.calls if p is not None]


@pytest.fixture
def hook(monkeypatch):
    import comfy.utils

    calls = HookCalls()
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", calls)
    # v0.33's ProgressBar drops updates without a preview within 100 ms / 0.5 % of the last one sent; these
    # tests count what the pack reports per step, so the host's throttle is off for them
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_PERCENT", 0.0, raising=False)
    return calls


class StandInPreviewer:
    """latent2rgb with the latent format's factors, the shape of what ComfyUI's previewer returns."""

    def __init__(self, factors: list[list[float]]) -> None:
        self.factors = torch.tensor(factors)
        self.decoded = 0

    def decode_latent_to_preview_image(self, preview_format: str, x0: torch.Tensor):
        self.decoded += 1
        rgb = torch.einsum("chw,cr->hwr", x0[0].float().cpu(), self.factors)
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
        return preview_format, Image.fromarray(pixels), 512


class Previews:
    """Set the user's preview method on the host: ComfyUI's own latent_preview where there is one."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch
        self.decoded = 0
        self.requests: list[tuple] = []
        try:
            import latent_preview
        except ImportError:
            latent_preview = None
        self.real = latent_preview is not None
        if self.real:
            self._count_real_decodes(latent_preview)
        self.module = latent_preview

    def _count_real_decodes(self, latent_preview) -> None:
        for cls in (latent_preview.Latent2RGBPreviewer, latent_preview.TAESDPreviewerImpl):
            original = cls.decode_latent_to_preview

            def counted(previewer, x0, original=original):
                self.decoded += 1
                return original(previewer, x0)

            self.monkeypatch.setattr(cls, "decode_latent_to_preview", counted)

    def set_method(self, name: str) -> None:
        """'latent2rgb' or 'none', as --preview-method sets it."""
        if self.real:
            from comfy.cli_args import LatentPreviewMethod

            method = LatentPreviewMethod.Latent2RGB if name == "latent2rgb" else LatentPreviewMethod.NoPreviews
            self.monkeypatch.setattr(self.module.args, "preview_method", method)
            return
        stand_in = types.ModuleType("latent_preview")

        def get_previewer(device, latent_format):
            self.requests.append((device, latent_format))
            if name == "none":
                return None
            previewer = StandInPreviewer(latent_format.latent_rgb_factors)
            self.previewers.append(previewer)
            return previewer

        self.previewers: list[StandInPreviewer] = []
        stand_in.get_previewer = get_previewer
        self.monkeypatch.setitem(sys.modules, "latent_preview", stand_in)

    @property
    def decode_calls(self) -> int:
        return self.decoded if self.real else sum(p.decoded for p in self.previewers)


@pytest.fixture
def previews(monkeypatch):
    return Previews(monkeypatch)


# -- live previews ------------------------------------------------------------------------------------------

def test_previews_reach_the_progress_hook_at_the_latent_size(setup, hook, previews):
    patcher, ref, latent = setup
    previews.set_method("latent2rgb")
    run(patcher, ref, latent, steps=5)
    assert [value for value, _, _ in hook.calls] == [1, 2, 3, 4, 5]
    assert hook.previews, "no preview reached the progress hook"
    assert previews.decode_calls == len(hook.previews)
    for image_format, image, _max_size in hook.previews:
        assert image_format == "JPEG" and isinstance(image, Image.Image)
        assert image.size == (latent.shape[-1], latent.shape[-2])  # latent2rgb: one pixel per latent cell
    if not previews.real:
        assert previews.requests == [(patcher.load_device, patcher.model.latent_format)]


def test_a_windowed_run_previews_the_whole_latent(setup, hook, previews, mods):
    patcher, ref, _ = setup
    previews.set_method("latent2rgb")
    wide = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(9)) * 4
    (windows,) = mods.windows.ADTextureWindows().windows(64, 32)  # 8-cell windows: three across
    run(patcher, ref, wide, steps=2, windows=windows)
    assert hook.previews
    assert {image.size for _, image, _ in hook.previews} == {(16, 8)}


def test_without_a_preview_method_no_preview_is_computed(setup, hook, previews):
    patcher, ref, latent = setup
    previews.set_method("none")
    run(patcher, ref, latent, steps=5)
    assert len(hook.calls) == 5 and hook.previews == []
    assert previews.decode_calls == 0


def test_previews_keep_to_their_time_budget(mods):
    """A preview is due while previews have taken at most the budget's share of the elapsed time."""
    # started at 0; each preview reads the clock three times: is it due, its start, its end
    clock = iter([0.0, 1.0, 1.0, 1.5, 2.0, 4.0, 5.0, 5.0, 6.0, 10.0, 15.0, 15.0, 15.1])
    previewer = types.SimpleNamespace(decode_latent_to_preview_image=lambda fmt, x: (fmt, x, None))
    preview = mods.progress.LivePreview(previewer, budget=0.1, clock=lambda: next(clock))
    latent = torch.zeros(1, 4, 2, 2)
    assert preview.image(latent) is not None  # t=1: nothing spent yet; it takes 0.5 s
    assert preview.image(latent) is None  # t=2: 0.5 s > 10% of 2 s
    assert preview.image(latent) is None  # t=4
    assert preview.image(latent) is not None  # t=5: 0.5 s <= 10% of 5 s; it takes 1 s
    assert preview.image(latent) is None  # t=10: 1.5 s > 1 s
    assert preview.image(latent) is not None  # t=15: 1.5 s <= 1.5 s
    assert preview.spent == pytest.approx(1.6) and preview.sent == 3


# -- the losses on the node ---------------------------------------------------------------------------------

class StandInServer:
    """What the pack uses of ComfyUI's PromptServer.instance: send_progress_text and last_node_id."""

    def __init__(self) -> None:
        self.last_node_id = "7"
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.texts.append((text, node_id))


@pytest.fixture
def server(monkeypatch):
    instance = StandInServer()
    module = types.ModuleType("server")
    module.PromptServer = types.SimpleNamespace(instance=instance)
    monkeypatch.setitem(sys.modules, "server", module)
    return instance


@pytest.fixture
def recorded_steps(mods, monkeypatch):
    """Every IterationReport of the node's optimize_on_model run, recorded beside the node's own callback."""
    reports = []
    original = mods.optimize.optimize_on_model

    def recording(*args, on_iteration=None, **kwargs):
        def both(report):
            reports.append(report)
            on_iteration(report)

        return original(*args, on_iteration=both, **kwargs)

    monkeypatch.setattr(mods.optimize, "optimize_on_model", recording)
    return reports


def last_iterations(reports, iterations: int) -> list:
    return [r for r in reports if r.iteration == iterations - 1]


def test_progress_text_shows_step_ad_and_content_loss(setup, server, recorded_steps):
    patcher, ref, latent = setup
    run(patcher, ref, latent, steps=4, iterations=2, weight=0.5)
    steps = last_iterations(recorded_steps, 2)
    assert [node for _, node in server.texts] == ["7"] * 4
    for (text, _), report in zip(server.texts, steps, strict=True):
        assert text == f"step {report.step + 1}/4\nAD loss {report.ad:.4g}\ncontent loss {report.content:.4g}"


def test_progress_text_without_content_has_no_content_loss(setup, server):
    patcher, ref, _ = setup
    run(patcher, ref, torch.zeros(1, 4, 8, 8), steps=2, weight=0.0)
    assert len(server.texts) == 2 and all("content" not in text for text, _ in server.texts)


def test_without_a_server_the_run_goes_on(setup, mods, monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert mods.progress.send_progress_text("x", "1") is False
    patcher, ref, latent = setup
    out, curve = run(patcher, ref, latent, steps=2)
    assert torch.isfinite(out).all() and curve.shape == (1, 320, 512, 3)


def test_log_line_and_console_bar_at_the_end(setup, recorded_steps, caplog, capsys):
    patcher, ref, latent = setup
    with caplog.at_level(logging.INFO):
        run(patcher, ref, latent, steps=3)
    first, last = recorded_steps[0].ad, recorded_steps[-1].ad
    assert f"AD loss {first:.4g} at the first step, {last:.4g} at the last (3 steps)" in caplog.text
    console = capsys.readouterr().err
    assert re.search(r"Latent AD Optimize: 100%.*3/3", console), console[-500:]


def test_guidance_shows_each_sampling_steps_ad_loss(setup, server, pack, monkeypatch):
    import comfy.sample

    patcher, ref, _ = setup
    reports = []
    guidance_progress = pack_modules(g="nodes.guidance").g.GuidanceProgress
    original_call = guidance_progress.__call__
    monkeypatch.setattr(guidance_progress, "__call__", lambda self, r: (reports.append(r), original_call(self, r))[1])
    node = pack.NODE_CLASS_MAPPINGS["ADLossGuidance"]()
    with torch.inference_mode():
        (guided,) = node.patch(patcher, ref, 0.05, 2, False, 0.0, 1.0, 0)
        latent = torch.zeros(1, 4, 8, 8)
        comfy.sample.sample(guided, comfy.sample.prepare_noise(latent, 0), 3, 1.0, "euler", "normal",
                            tm.conditioning("sd15", 1), tm.conditioning("sd15", 2), latent, seed=0, disable_pbar=True)
    last = [r for r in reports if r.iteration == 1]
    assert len(last) >= 2, "the guidance ran on too few steps to check"
    assert [text for text, _ in server.texts] == [f"AD guidance, step {r.step + 1}\nAD loss {r.ad:.4g}" for r in last]
    assert {node_id for _, node_id in server.texts} == {"7"}
