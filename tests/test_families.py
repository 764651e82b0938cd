"""The model-family seam (docs/DESIGN.md §3): a family is one module behind `ModelFamily`, and guidance/
runs on any family without knowing it.

A toy family (a one-layer joint attention over text tokens and image tokens, flow-matching times and
AdaIN on packed 2x2 patches: the shape of what Flux needs) is registered for the test only; Latent AD Optimize's loop and one guided
step run on it through the pack and equal a literal implementation written here from direct calls.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from ad_helpers import pack_modules

PACK = Path(__file__).resolve().parent.parent
CHANNELS, HEADS, WIDTH, TEXT = 4, 2, 8, 2
TIMES = (0.9, 0.6, 0.3)


@pytest.fixture(scope="module")
def mods(pack):
    return pack_modules(tiling_node="nodes.tiling", errors="nodes.errors", family="attention.family", families="attention.families", sd="attention.sd_family",
                        recorder="attention.recorder", reference="attention.reference", session="attention.session",
                        ad_pass="guidance.ad_pass", optimize="guidance.optimize", update="guidance.guided_update")


class ToyNetwork(torch.nn.Module):
    """TEXT fixed text tokens, then one token per latent pixel; one joint self-attention layer whose
    input depends on the time."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.embed = torch.nn.Parameter(torch.randn(CHANNELS, WIDTH, generator=generator) * 0.5)
        self.time = torch.nn.Parameter(torch.randn(WIDTH, generator=generator))
        self.qkv = torch.nn.Parameter(torch.randn(WIDTH, 3 * WIDTH, generator=generator) * 0.4)
        self.text = torch.nn.Parameter(torch.randn(TEXT, WIDTH, generator=generator))

    def features(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
        image = x.flatten(2).transpose(1, 2) @ self.embed
        tokens = torch.cat([self.text.expand(x.shape[0], -1, -1), image], dim=1) + t * self.time
        q, k, v = (part.unflatten(-1, (HEADS, WIDTH // HEADS)).transpose(1, 2) for part in (tokens @ self.qkv).chunk(3, -1))
        return q, k, v, F.scaled_dot_product_attention(q, k, v)


def toy_family(mods):
    """A complete family in a few lines: what a new model family module provides."""
    family, recorder = mods.family, mods.recorder

    class ToyLayer(SimpleNamespace):
        patch_key = ("toy", 0)

    class ToyPass:
        def __init__(self, network: ToyNetwork) -> None:
            self.network = network

        def run(self, model_input, time, cond):
            q, k, v, out = self.network.features(model_input, float(time))
            return [recorder.LayerRecord(q=q, k=k, v=v, out=out, hw=tuple(model_input.shape[-2:]), text_tokens=TEXT)]

    class ToyFamily(family.ModelFamily):
        name, supported = "toy", "a toy network"
        adain_dims = (2, 4)
        seamless_tiling_error = "the toy network's token positions cannot wrap around the edges"

        def accepts(self, diffusion_model):
            return isinstance(diffusion_model, ToyNetwork)

        def check(self, base_model):
            return None

        def attention_layers(self, diffusion_model):
            return [ToyLayer(ad_index=0)]

        def feature_pass(self, patcher, layers, stop_early=True, checkpoint=False):
            return ToyPass(patcher.model.diffusion_model)

        def needs_inplace_guard(self, diffusion_model):
            return False

        def auto_checkpointing(self, base_model, latent_shape):
            return False

        def conditioning(self, base_model, conditioning, latent, device, image_hw=None):
            return None

        def conditioning_identity(self, cond):
            return ()

        def conditioning_mismatch(self, base_model, conditioning):
            return None

        def optimize_times(self, base_model, steps):
            return list(TIMES[:steps])

        def feature_time(self, model_sampling, sigma):
            return float(sigma), float(sigma)

        def to_model_input(self, x, sigma):
            return x

        def from_model_input(self, z, sigma):
            return z

        def noised(self, clean, noise, sigma):
            return sigma * noise.to(clean) + (1.0 - sigma) * clean


        def adain_view(self, latent):
            b, c, h, w = latent.shape
            return latent.reshape(b, c, h // 2, 2, w // 2, 2)

    return ToyFamily()


@pytest.fixture
def toy(mods, monkeypatch):
    """A MODEL of the toy family, and its reference, with the family registered for this test."""
    family = toy_family(mods)
    monkeypatch.setattr(mods.families, "FAMILIES", (*mods.families.FAMILIES, family))
    base = SimpleNamespace(diffusion_model=ToyNetwork(), model_sampling=None, latent_format=SimpleNamespace(latent_channels=CHANNELS),
                           process_latent_in=lambda x: x * 0.5, process_latent_out=lambda x: x * 2.0)
    patcher = SimpleNamespace(model=base, load_device=torch.device("cpu"), patches_uuid=None)
    reference = torch.randn(1, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(1))
    return family, patcher, mods.reference.ADReference(latents=reference, layer_spec="paper default", conditioning=[])


def literal_ad_loss(network, x, t, k_ref, v_ref):
    q, _, _, out = network.features(x, t)
    return (out - F.scaled_dot_product_attention(q, k_ref, v_ref).detach()).abs().mean()


def test_the_toy_family_is_found_and_unknown_models_are_refused(mods, toy):
    family, patcher, _ = toy
    assert mods.families.family_of(patcher.model) is family
    with torch.inference_mode():
        assert mods.families.family_of(tm.build("sd15").model) is mods.sd.SD_UNET
    stranger = SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))
    with pytest.raises(mods.family.UnsupportedModelError, match=r"an SD1.x, SD2.x or SDXL UNet or a Flux \(FLUX.1-dev or -schnell\) model or a Flux\.2 "
                                                                 r"\(dev or Klein, ComfyUI v0\.33 or newer\) model or a Z-Image "
                                                                 r"\(Turbo or Base, ComfyUI v0.33.0 or newer\) model "
                       r"or a Qwen-Image or Qwen-Image-Edit model \(ComfyUI v0.33.0 or newer\) or a toy network"):
        mods.families.family_of(stranger)


def test_latent_ad_optimize_runs_on_a_new_family_as_the_literal_algorithm(mods, toy):
    _, patcher, reference = toy
    network = patcher.model.diffusion_model
    start = torch.randn(1, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(2))
    content = torch.randn(1, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(6))
    settings = mods.optimize.OptimizeSettings(steps=3, lr=0.05, iterations=2, content_weight=0.5)
    ours = mods.optimize.optimize_on_model(patcher, reference, start, settings, content=content)

    x = (start * 0.5).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for t in TIMES:
        with torch.no_grad():
            _, k_ref, v_ref, _ = network.features(reference.latents * 0.5, t)
            q_content = network.features(content * 0.5, t)[0][:, :, TEXT:]
        for _ in range(2):
            optimizer.zero_grad()
            content_term = (network.features(x, t)[0][:, :, TEXT:] - q_content).abs().mean()
            (literal_ad_loss(network, x, t, k_ref, v_ref) + 0.5 * content_term).backward()
            optimizer.step()
    expected = x.detach() * 2.0
    assert float((ours - start).abs().max()) > 1e-3, "the optimization moved the latent"
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_a_guided_step_uses_the_family_times_noising_and_packed_adain(mods, toy):
    family, patcher, reference = toy
    network = patcher.model.diffusion_model
    latent = torch.randn(2, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(3)) * 2.0 + 1.0
    noise = torch.randn(1, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(4))
    settings = mods.update.GuidanceSettings(lr=0.02, iterations=2, adain=True, content_weight=0.0)
    with mods.ad_pass.ad_pass(patcher, reference) as session:
        ours = mods.update.ad_guidance_update(session, latent, 0.4, noise, settings)

    target = 0.4 * noise + (1.0 - 0.4) * (reference.latents * 0.5)
    packed = latent.reshape(2, CHANNELS, 2, 2, 3, 2)
    packed_target = target.reshape(1, CHANNELS, 2, 2, 3, 2)
    z = ((packed - packed.mean((2, 4), keepdim=True)) / (packed.std((2, 4), keepdim=True) + 1e-6)
         * packed_target.std((0, 2, 4), keepdim=True) + packed_target.mean((0, 2, 4), keepdim=True)).reshape(latent.shape)
    with torch.no_grad():
        _, k_ref, v_ref, _ = network.features(target, 0.4)
    z = z.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.02)
    for _ in range(2):
        optimizer.zero_grad()
        literal_ad_loss(network, z, 0.4, k_ref, v_ref).backward()
        optimizer.step()
    torch.testing.assert_close(ours, z.detach(), rtol=1e-6, atol=1e-6)
    assert float((ours - latent).abs().max()) > 1e-2, "AdaIN and Adam moved the latent"


def test_nodes_ask_the_family_for_their_messages(mods, toy):
    _, patcher, _ = toy
    model = SimpleNamespace(model=patcher.model, clone=lambda: None, add_object_patch=lambda *a: None)
    vae = SimpleNamespace(patcher=SimpleNamespace(clone=lambda: None, add_object_patch=lambda *a: None),
                          first_stage_model=torch.nn.Conv2d(1, 1, 3, padding=1))
    with pytest.raises(mods.errors.ADNodeError, match=r"\[AD Seamless Tiling\] the toy network's token positions"):
        mods.tiling_node.ADSeamlessTiling().apply(model, vae, "both")


def test_capture_asks_the_family_whether_the_null_text_fits(mods, pack):
    from ad_helpers import capture

    with torch.inference_mode():
        model = tm.build("sd15")
    other_clip = [[torch.zeros(1, 77, 64), {}]]  # 64 wide; the tiny SD1.5 cross-attention takes 32
    with pytest.raises(mods.errors.ADNodeError, match=r"\[Capture Reference Attention\] 'null_conditioning' .*64 wide"):
        capture(model, torch.randn(1, 4, 8, 8), other_clip)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[-1])
            names.update(alias.name for alias in node.names)
    return names


def test_guidance_never_imports_a_family_module(pack):
    """guidance/ reaches model anatomy only through the family interface and its registry."""
    family_modules = {"sd_family", "sd_unet", "unet_pass", "checkpointing", "flux_family", "flux_model", "flux_pass",
                      "flux_blocks"}
    for path in sorted((PACK / "guidance").glob("*.py")):
        leaked = _imported_modules(path) & family_modules
        assert not leaked, f"{path.name} imports {sorted(leaked)}"
