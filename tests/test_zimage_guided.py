"""AD Loss Guidance on Z-Image through ComfyUI's own sampler equals docs/DESIGN.md §2.8 written here from
direct model calls (tests/zimage_literal.py): the sampler's pass (Turbo: cfg 1, the negative unused; Base:
CFG) and Euler step, the reference noised to σ' with fresh noise (clean at the last step), a reference pass
with the null caption at `timestep(σ')` = σ', AdaIN on Z-Image's 64 packed channels, a fresh Adam on x'
itself and the landing D* = (σ·x'* − σ'·x)/(σ − σ'). No code of the pack on the literal side except the
per-step noise it draws."""

from __future__ import annotations

import pytest
import torch
import tiny_zimage as tz
import zimage_literal as zl
from comfy_env import differentiable_kernels
from ad_helpers import capture

pytestmark = tz.requires_zimage_host
SEED, LR, ITERATIONS = 7, 0.01, 2
SHAPE = (2, 16, 8, 6)
SPEC = "1-2"


@differentiable_kernels()
def literal_run(base, x: torch.Tensor, sigmas: list[float], positive: list, negative: list, cfg: float, null: list,
                reference: torch.Tensor, adain: bool = True) -> torch.Tensor:
    """§2.8 guided steps for every step of `sigmas`; `reference` is s (model space). Returns x_N."""
    from attention_distillation_pack.guidance.step_noise import STREAM_REFERENCE, noise_step_key, step_noise

    dm = base.diffusion_model
    batch = x.shape[0]
    layers = (1, 2)

    def denoised(cond: list, sigma: float) -> torch.Tensor:
        context = cond[0][0].expand(batch, -1, -1)
        return base.apply_model(x, torch.full((batch,), sigma), c_crossattn=context, num_tokens=context.shape[1])

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            d = denoised(positive, sigma)
            if cfg != 1.0:
                uncond = denoised(negative, sigma)
                d = uncond + cfg * (d - uncond)
        x_next = d + (x - d) * (sigma_next / sigma)
        eps = step_noise(tuple(reference.shape), SEED, noise_step_key(sigma_next), STREAM_REFERENCE)
        r = sigma_next * eps + (1 - sigma_next) * reference if sigma_next > 0 else reference
        with torch.no_grad():
            refs = zl.reference_kv(zl.features(dm, r, sigma_next, null[0][0], layers))
        if adain:
            x_next = zl.adain(x_next, r)
        z = x_next.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=LR)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            zl.ad_loss(zl.features(dm, z, sigma_next, null[0][0], layers), refs).backward()
            optimizer.step()
        x_star = z.detach()
        landing = (sigma * x_star - sigma_next * x) / (sigma - sigma_next)
        x = x + (sigma_next - sigma) * (x - landing) / sigma  # the sampler's Euler step lands on x'*
    return x


def sample(patcher, steps: int, cfg: float = 1.0, last_step: int | None = None) -> torch.Tensor:
    import comfy.sample

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", tz.null_conditioning(seed=5),
                                   tz.null_conditioning(seed=6), torch.zeros(SHAPE), last_step=last_step,
                                   force_full_denoise=False, seed=0, disable_pbar=True)


def guided(patcher, adain: bool = True, **kwargs):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    reference = tz.latent(seed=21, height=6, width=8)
    ref = capture(patcher, reference, tz.null_conditioning(), layers=SPEC)
    with torch.inference_mode():
        (model,) = ADLossGuidance().patch(patcher, ref, LR, ITERATIONS, adain, 0.0, 1.0, SEED, **kwargs)
    return model, reference


def expected(patcher, steps: int, last_step: int | None, reference: torch.Tensor, cfg: float = 1.0,
             perturb: float = 0.0, adain: bool = True) -> torch.Tensor:
    import comfy.samplers

    base = zl.literal_model(patcher)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps)]
    sigmas = sigmas[: (last_step + 1) if last_step is not None else None]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    latent_in = base.process_latent_in(torch.zeros(SHAPE))
    x = base.model_sampling.noise_scaling(torch.tensor(sigmas[0]), noise, latent_in) + perturb
    out = literal_run(base, x, sigmas, tz.null_conditioning(seed=5), tz.null_conditioning(seed=6), cfg,
                      tz.null_conditioning(), base.process_latent_in(reference), adain=adain)
    # what ComfyUI's sampler returns for a run stopped at σ_last: CONST divides by 1 − σ_last
    return base.process_latent_out(base.model_sampling.inverse_noise_scaling(torch.tensor(sigmas[-1]), out))


@pytest.mark.parametrize("cfg,lora,stored", [(1.0, False, None), (4.0, False, None), (1.0, True, None),
                                              (1.0, False, torch.float8_e4m3fn)],
                         ids=["turbo-cfg1", "base-cfg4", "lora", "fp8-weights"])
def test_one_guided_step_equals_the_literal_algorithm(pack, cfg, lora, stored):
    """With fp8 weights the literal model holds the same rounded weights in float32."""
    patcher = zl.pack_model(lora=lora, stored=stored)
    model, reference = guided(patcher)
    ours = sample(model, steps=4, cfg=cfg, last_step=1)
    literal = expected(patcher, 4, 1, reference, cfg=cfg)
    plain = sample(patcher, steps=4, cfg=cfg, last_step=1)
    assert float((literal - plain).abs().max()) > 1e-2, "AdaIN and Adam moved the step"
    # the output of a run stopped at σ_1 is divided by 1 − σ_1: float32 rounding scaled up
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5 * float(literal.abs().max()))


def test_a_whole_run_is_the_literal_algorithm_within_float32_sensitivity(pack):
    """Every step including the last (σ' = 0: the clean reference at time 0)."""
    patcher = zl.pack_model()
    model, reference = guided(patcher)
    ours = sample(model, steps=4)
    literal = expected(patcher, 4, None, reference)
    sensitivity = float((expected(patcher, 4, None, reference, perturb=1e-6) - literal).abs().max())
    difference = float((ours - literal).abs().max())
    assert float((literal - sample(patcher, steps=4)).abs().max()) > 1e-2
    assert difference <= max(10 * sensitivity, 1e-6 * float(literal.abs().max())), (difference, sensitivity)


def test_adain_off_and_checkpointing_off_give_the_same_algorithm(pack):
    """Without AdaIN this step is chaotic in float32 on a few elements (Adam's second iteration on L1
    kinks, docs/DESIGN.md §2.4): a 1e-7 change of the start moves a few percent of the literal's elements by up
    to lr. Those may differ by as much; every other element agrees as tightly as with AdaIN."""
    patcher = zl.pack_model()
    model, reference = guided(patcher, adain=False, gradient_checkpointing="off")
    literal = expected(patcher, 4, 1, reference, adain=False)
    moved = (expected(patcher, 4, 1, reference, adain=False, perturb=1e-7) - literal).abs()
    ours = sample(model, steps=4, last_step=1)
    scale = float(literal.abs().max())
    stable = moved <= 1e-5 * scale
    assert float(stable.float().mean()) > 0.9
    torch.testing.assert_close(ours[stable], literal[stable], rtol=1e-4, atol=1e-5 * scale)
    assert float((ours - literal).abs().max()) <= 2 * float(moved.max()) + 1e-5 * scale


def test_input_model_untouched_and_cancel_leaves_nothing_behind(pack):
    import comfy.model_management as mm

    patcher = zl.pack_model()
    before = sample(patcher, steps=3)
    model, _ = guided(patcher)
    guided_result = sample(model, steps=3)
    assert torch.isfinite(guided_result).all() and not torch.allclose(guided_result, before)
    assert torch.equal(sample(patcher, steps=3), before)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(model, steps=3)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(patcher, steps=3), before)
    assert "sampler_post_cfg_function" not in patcher.model_options
    assert all(p.is_inference() for p in patcher.model.diffusion_model.parameters())
    assert getattr(mm, "in_training", False) is False


def test_a_zimage_controlnet_patch_steers_the_sampler_pass_only(pack):
    """Z-Image's ControlNets are model patches (`double_block`, `noise_refiner`, as ComfyUI's Z-Image Fun
    ControlNet sets them): they run in the sampler's own pass, once per step and layer, and never in an AD
    pass; the input MODEL is unchanged."""
    patcher = zl.pack_model()
    before = sample(patcher, steps=3)
    model, _ = guided(patcher)
    calls = {"double_block": 0, "noise_refiner": 0}

    def patch(kind: str):
        def apply(args: dict) -> dict:
            calls[kind] += 1
            return {"img": args["img"] + 0.05}
        return apply

    controlled = model.clone()
    controlled.set_model_double_block_patch(patch("double_block"))
    controlled.set_model_noise_refiner_patch(patch("noise_refiner"))
    steered = sample(controlled, steps=3)
    assert calls == {"double_block": 3 * 3, "noise_refiner": 3 * 2}  # 3 sampler passes × 3 main / 2 refiner layers
    assert torch.isfinite(steered).all()
    assert float((steered - sample(model, steps=3)).abs().max()) > 1e-3
    assert torch.equal(sample(patcher, steps=3), before)
