"""AD Loss Guidance and Latent AD Optimize on Flux.2 (dev-like and Klein-like tiny models through ComfyUI
v0.33's own classes) equal docs/DESIGN.md §2.10 written here from direct model calls: the sampler's pass
(prompt left-padded to 512 tokens, its guidance, its reference latents) and Euler step, the reference
noised to σ' with fresh noise, AD passes with the null text left-padded with zeros to 512 tokens, guidance
1.0 where embedded and no reference latents, AdaIN with one statistic per latent channel, a fresh Adam on
x' and step 6's landing. The literal side records attention with its own override on a full forward of
its own model built from the same weights outside inference mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tiny_flux2 as t2
from comfy_env import differentiable_kernels
from ad_helpers import capture, optimize
from test_flux_guided import _Recorder

pytestmark = t2.requires_flux2_host
SEED, LR, ITERATIONS, GUIDANCE = 7, 0.01, 2, 3.5
SHAPE = (2, 128, 5, 4)
LAYERS = "0,3-4"  # a double block and two single blocks
CALLS = (0, 3, 4)


def _padded(context: torch.Tensor, batch: int) -> torch.Tensor:
    """§2.10's null text: left-padded with zeros to 512 tokens."""
    zeros = torch.zeros(1, 512 - context.shape[1], context.shape[2], dtype=context.dtype)
    return torch.cat([zeros, context], dim=1).expand(batch, -1, -1)


@differentiable_kernels()
def _features(dm, x: torch.Tensor, tau: float, null: list) -> list[tuple[torch.Tensor, ...]]:
    recorder = _Recorder()
    batch = x.shape[0]
    guidance = torch.ones(batch) if dm.params.guidance_embed else None
    dm(x, torch.full((batch,), tau), _padded(null[0][0], batch), guidance=guidance,
       transformer_options={"optimized_attention_override": recorder})
    assert len(recorder.records) == 5
    return [recorder.records[i] for i in CALLS]


def _adain(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One statistic per latent channel: per sample over (H, W); the target over (B, H, W)."""
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6) * r.std(dim=(0, 2, 3), keepdim=True) + r.mean(dim=(0, 2, 3), keepdim=True)


def _ad_loss(records, refs) -> torch.Tensor:
    return sum((out - F.scaled_dot_product_attention(q, rk, rv).detach()).abs().mean()
               for (q, _, _, out), (_, rk, rv, _) in zip(records, refs, strict=True))


@differentiable_kernels()
def literal_run(base, x: torch.Tensor, sigmas: list[float], positive: list, null: list,
                reference: torch.Tensor) -> torch.Tensor:
    from attention_distillation_pack.guidance.step_noise import STREAM_REFERENCE, noise_step_key, step_noise

    dm = base.diffusion_model
    batch = x.shape[0]
    refs_in = positive[0][1].get("reference_latents")
    refs_in = [lat.expand(batch, -1, -1, -1) for lat in refs_in] if refs_in else None  # per sample, as conds are
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            denoised = base.apply_model(x, torch.full((batch,), sigma), c_crossattn=_padded(positive[0][0], batch),
                                        guidance=torch.tensor([GUIDANCE]), ref_latents=refs_in)
        x_next = denoised + (x - denoised) * (sigma_next / sigma)
        eps = step_noise(tuple(reference.shape), SEED, noise_step_key(sigma_next), STREAM_REFERENCE)
        r = sigma_next * eps + (1 - sigma_next) * reference if sigma_next > 0 else reference
        with torch.no_grad():
            refs = _features(dm, r, sigma_next, null)
        z = _adain(x_next, r).detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=LR)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):  # in-place residuals
                _ad_loss(_features(dm, z, sigma_next, null), refs).backward()
            optimizer.step()
        landing = (sigma * z.detach() - sigma_next * x) / (sigma - sigma_next)
        x = x + (sigma_next - sigma) * (x - landing) / sigma
    return x


def _literal_model(kind: str, patcher):
    """The same weights (a LoRA merged where the MODEL has one) in a plain, non-inference model."""
    with torch.inference_mode():
        patcher.patch_model(device_to=torch.device("cpu"))
        weights = {k: v.clone().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
        patcher.unpatch_model(device_to=torch.device("cpu"))
    base = t2.build(kind, weights={k: v.clone() for k, v in weights.items()}).model
    for parameter in base.diffusion_model.parameters():
        parameter.requires_grad_(False)
    return base


def _with_reference_latents(conditioning: list, seed: int) -> list:
    """An edit graph's conditioning: ReferenceLatent appended a latent to it."""
    return [[conditioning[0][0], dict(conditioning[0][1], reference_latents=[t2.latent(seed=seed, height=3, width=3)])]]


def sample(patcher, steps: int, last_step: int | None = None, positive: list | None = None) -> torch.Tensor:
    import comfy.sample

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    positive = positive if positive is not None else t2.null_conditioning(seed=5, guidance=GUIDANCE)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive,
                                   t2.null_conditioning(seed=6), torch.zeros(SHAPE), last_step=last_step,
                                   force_full_denoise=False, seed=0, disable_pbar=True)


def guided(patcher, null: list):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    reference = t2.latent(seed=21, height=4, width=5)
    ref = capture(patcher, reference, null, layers=LAYERS)
    with torch.inference_mode():
        (model,) = ADLossGuidance().patch(patcher, ref, LR, ITERATIONS, True, 0.0, 1.0, SEED)
    return model, reference


def expected(kind: str, patcher, steps: int, last_step: int | None, reference: torch.Tensor,
             positive: list, null: list) -> torch.Tensor:
    import comfy.samplers

    base = _literal_model(kind, patcher)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps)]
    sigmas = sigmas[: (last_step + 1) if last_step is not None else None]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    x = base.model_sampling.noise_scaling(torch.tensor(sigmas[0]), noise, base.process_latent_in(torch.zeros(SHAPE)))
    null = [[null[0][0], {}]]  # the literal AD passes never see the null conditioning's extras
    out = literal_run(base, x, sigmas, positive, null, base.process_latent_in(reference))
    return base.process_latent_out(base.model_sampling.inverse_noise_scaling(torch.tensor(sigmas[-1]), out))


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "reference-latents"])
@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_one_guided_step_equals_the_literal_algorithm(pack, kind, edit):
    """With `edit`, the prompt and the null CONDITIONING both carry reference latents: the sampler's pass
    uses the prompt's, the AD passes neither (the literal side has none in them)."""
    with torch.inference_mode():
        patcher = t2.build(kind)
    positive = t2.null_conditioning(seed=5, guidance=GUIDANCE)
    null = t2.null_conditioning(guidance=GUIDANCE)
    if edit:
        positive, null = _with_reference_latents(positive, 40), _with_reference_latents(null, 41)
    model, reference = guided(patcher, null)
    ours = sample(model, steps=4, last_step=1, positive=positive)
    literal = expected(kind, patcher, 4, 1, reference, positive, null)
    plain = sample(patcher, steps=4, last_step=1, positive=positive)
    assert float((literal - plain).abs().max()) > 1e-2, "AdaIN and Adam moved the step"
    if edit:
        assert float((plain - sample(patcher, steps=4, last_step=1)).abs().max()) > 1e-3  # the sampler saw them
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5 * float(literal.abs().max()))


def test_a_whole_run_is_the_literal_algorithm(pack):
    """Every step including the last (σ' = 0: the clean reference at time 0), within float32 rounding."""
    with torch.inference_mode():
        patcher = t2.build("dev")
    positive, null = t2.null_conditioning(seed=5, guidance=GUIDANCE), t2.null_conditioning(guidance=GUIDANCE)
    model, reference = guided(patcher, null)
    literal = expected("dev", patcher, 3, None, reference, positive, null)
    torch.testing.assert_close(sample(model, steps=3), literal, rtol=1e-4, atol=1e-4 * float(literal.abs().max()))


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_one_optimize_run_equals_the_literal_algorithm(pack, kind):
    """Latent AD Optimize: the clean latent at the MODEL's own `simple` sigmas, one Adam, AD plus the
    content loss on the image tokens' queries (text rows 0..511 out)."""
    import comfy.samplers

    with torch.inference_mode():
        patcher = t2.build(kind)
    null = t2.null_conditioning(guidance=GUIDANCE)
    reference = capture(patcher, t2.latent(seed=21, height=4, width=5), null, layers=LAYERS)
    content = t2.latent(seed=31)
    ours = optimize(patcher, reference, content, steps=2, lr=0.05, iterations=2, weight=0.5)

    base = _literal_model(kind, patcher)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", 2)][:-1]
    s, c = base.process_latent_in(reference.latents), base.process_latent_in(content)
    x = c.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for sigma in sigmas:
        with torch.no_grad():
            refs = _features(base.diffusion_model, s, sigma, null)
            content_q = [q[:, :, 512:] for q, *_ in _features(base.diffusion_model, c, sigma, null)]
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                records = _features(base.diffusion_model, x, sigma, null)
                content_term = sum((q[:, :, 512:] - cq).abs().mean() for (q, *_), cq in zip(records, content_q, strict=True))
                (_ad_loss(records, refs) + 0.5 * content_term).backward()
            optimizer.step()
    literal = base.process_latent_out(x.detach())
    assert float((literal - content).abs().max()) > 1e-2
    torch.testing.assert_close(ours, literal, rtol=1e-5, atol=1e-5)
