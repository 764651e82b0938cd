"""AD Loss Guidance on Flux through ComfyUI's own sampler equals docs/DESIGN.md §2.7 written here from
direct model calls: the sampler's pass and Euler step, the reference noised to σ' with fresh noise
(clean at the last step), a reference pass with null text and guidance 1.0, AdaIN on packed channels,
a fresh Adam on x' itself and the landing of step 6. The literal side has its own attention recorder
(ComfyUI's attention override on a full forward), its own model built from the same weights outside
inference mode, and no code of the pack except the per-step noise it draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tiny_flux as tf
from comfy_env import differentiable_kernels
from ad_helpers import capture

pytestmark = tf.requires_flux_host
SEED, LR, ITERATIONS, GUIDANCE = 7, 0.01, 2, 3.5
SHAPE = (2, 16, 8, 6)


class _Recorder:
    """`optimized_attention_override` that records (q, k, v, out) of every attention call in order."""

    def __init__(self) -> None:
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        assert kwargs.get("skip_reshape")
        out = F.scaled_dot_product_attention(q, k, v)
        self.records.append((q, k, v, out))
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


@differentiable_kernels()
def _features(dm, x: torch.Tensor, tau: float, null: list) -> list[tuple[torch.Tensor, ...]]:
    """Features of the last 7 attention calls: null text, null pooled, guidance 1.0, time τ."""
    recorder = _Recorder()
    batch = x.shape[0]
    context, pooled = null[0][0], null[0][1]["pooled_output"]
    dm(x, torch.full((batch,), tau), context.expand(batch, -1, -1), y=pooled.expand(batch, -1),
       guidance=torch.ones(batch), transformer_options={"optimized_attention_override": recorder})
    return recorder.records[-7:]


def _pack(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


def _unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(shape)


def _adain(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    source, target = _pack(x), _pack(r)
    mean, std = source.mean(dim=1, keepdim=True), source.std(dim=1, keepdim=True)
    out = (source - mean) / (std + 1e-6) * target.std(dim=(0, 1), keepdim=True) + target.mean(dim=(0, 1), keepdim=True)
    return _unpack(out, x.shape)


@differentiable_kernels()
def literal_run(base, x: torch.Tensor, sigmas: list[float], positive: list, null: list, reference: torch.Tensor,
                adain: bool = True) -> torch.Tensor:
    """§2.7 steps 1-6 for every step of `sigmas`; `reference` is s (model space). Returns x_N."""
    from attention_distillation_pack.guidance.step_noise import STREAM_REFERENCE, noise_step_key, step_noise

    dm = base.diffusion_model
    context, pooled = positive[0][0], positive[0][1]["pooled_output"]
    batch = x.shape[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            denoised = base.apply_model(x, torch.full((batch,), sigma), c_crossattn=context.expand(batch, -1, -1),
                                        y=pooled.expand(batch, -1), guidance=torch.tensor([GUIDANCE]))
        x_next = denoised + (x - denoised) * (sigma_next / sigma)
        eps = step_noise(tuple(reference.shape), SEED, noise_step_key(sigma_next), STREAM_REFERENCE)
        r = sigma_next * eps + (1 - sigma_next) * reference if sigma_next > 0 else reference
        tau = sigma_next
        with torch.no_grad():
            refs = _features(dm, r, tau, null)
        if adain:
            x_next = _adain(x_next, r)
        z = x_next.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=LR)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):  # Flux adds in place
                records = _features(dm, z, tau, null)
                loss = sum((out - F.scaled_dot_product_attention(q, rk, rv).detach()).abs().mean()  # target: no grad
                           for (q, _, _, out), (_, rk, rv, _) in zip(records, refs, strict=True))
                loss.backward()
            optimizer.step()
        x_star = z.detach()
        landing = (sigma * x_star - sigma_next * x) / (sigma - sigma_next)  # step 6: D*
        x = x + (sigma_next - sigma) * (x - landing) / sigma  # the sampler's Euler step lands on x'*
    return x


def _literal_model(kind: str, patcher):
    """The same weights (LoRA merged where the pack's MODEL has one) in a plain, non-inference model."""
    with torch.inference_mode():
        patcher.patch_model(device_to=torch.device("cpu"))
        weights = {k: v.clone().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
        patcher.unpatch_model(device_to=torch.device("cpu"))
    weights = {k: v.clone() for k, v in weights.items()}  # normal tensors
    base = tf.build(kind, weights=weights).model
    for parameter in base.diffusion_model.parameters():
        parameter.requires_grad_(False)
    return base


def _pack_model(kind: str, lora: bool, stored: torch.dtype | None = None):
    """The MODEL the nodes get; `stored`: weights kept in bf16/fp8 and cast to float32 per call."""
    import comfy.sd
    import tiny_models as tm

    with torch.inference_mode():
        if stored is None:
            patcher = tf.build(kind)
        else:
            patcher = tf.build(kind, dtype=stored, manual_cast=torch.float32, weights=tf.random_weights(
                tf.build(kind).model.diffusion_model))
        if lora:
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, tm.lora_state_dict(patcher, match="blocks"), 1.0, 0.0)
    return patcher


def sample(patcher, steps: int, last_step: int | None = None, positive: list | None = None) -> torch.Tensor:
    import comfy.sample

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    positive = positive if positive is not None else tf.null_conditioning(seed=5, guidance=GUIDANCE)
    negative = tf.null_conditioning(seed=6, guidance=GUIDANCE)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, negative,
                                   torch.zeros(SHAPE), last_step=last_step, force_full_denoise=False,
                                   seed=0, disable_pbar=True)


def guided(patcher, adain: bool = True, **kwargs):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    reference = tf.latent(seed=21, height=6, width=8)
    ref = capture(patcher, reference, tf.null_conditioning(guidance=GUIDANCE))
    with torch.inference_mode():
        (model,) = ADLossGuidance().patch(patcher, ref, LR, ITERATIONS, adain, 0.0, 1.0, SEED, **kwargs)
    return model, reference


def expected(kind: str, patcher, steps: int, last_step: int | None, reference: torch.Tensor,
             perturb: float = 0.0, adain: bool = True) -> torch.Tensor:
    import comfy.samplers

    base = _literal_model(kind, patcher)
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps)]
    sigmas = sigmas[: (last_step + 1) if last_step is not None else None]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    latent_in = base.process_latent_in(torch.zeros(SHAPE))
    x = base.model_sampling.noise_scaling(torch.tensor(sigmas[0]), noise, latent_in) + perturb
    out = literal_run(base, x, sigmas, tf.null_conditioning(seed=5, guidance=GUIDANCE),
                      tf.null_conditioning(guidance=GUIDANCE), base.process_latent_in(reference), adain=adain)
    # what ComfyUI's sampler returns for a run stopped at σ_last: CONST divides by 1 − σ_last
    return base.process_latent_out(base.model_sampling.inverse_noise_scaling(torch.tensor(sigmas[-1]), out))


@pytest.mark.parametrize("kind,lora,stored", [("dev", False, None), ("schnell", False, None), ("dev", True, None),
                                               ("dev", False, torch.float8_e4m3fn)],
                         ids=["dev", "schnell", "dev-lora", "dev-fp8-weights"])
def test_one_guided_step_equals_the_literal_algorithm(pack, kind, lora, stored):
    """With fp8 weights the literal model holds the same rounded weights in float32."""
    patcher = _pack_model(kind, lora, stored)
    assert next(patcher.model.diffusion_model.parameters()).dtype == (stored or torch.float32)
    model, reference = guided(patcher)
    ours = sample(model, steps=4, last_step=1)
    literal = expected(kind, patcher, 4, 1, reference)
    plain = sample(patcher, steps=4, last_step=1)
    assert float((literal - plain).abs().max()) > 1e-2, "AdaIN and Adam moved the step"
    # the output of a run stopped at σ_1 is divided by 1 − σ_1 (≈ 0.1): float32 rounding scaled by 10
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5 * float(literal.abs().max()))


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_a_whole_run_is_the_literal_algorithm_within_float32_sensitivity(pack, kind):
    """Every step including the last (σ' = 0: the clean reference at time 0)."""
    patcher = _pack_model(kind, lora=False)
    model, reference = guided(patcher)
    ours = sample(model, steps=4)
    literal = expected(kind, patcher, 4, None, reference)
    sensitivity = float((expected(kind, patcher, 4, None, reference, perturb=1e-6) - literal).abs().max())
    difference = float((ours - literal).abs().max())
    assert float((literal - sample(patcher, steps=4)).abs().max()) > 1e-2
    assert difference <= max(10 * sensitivity, 1e-6 * float(literal.abs().max())), (difference, sensitivity)


def test_adain_off_and_checkpointing_off_give_the_same_algorithm(pack):
    patcher = _pack_model("dev", lora=False)
    model, reference = guided(patcher, adain=False, gradient_checkpointing="off")
    literal = expected("dev", patcher, 4, 1, reference, adain=False)
    torch.testing.assert_close(sample(model, steps=4, last_step=1), literal, rtol=1e-4,
                               atol=1e-5 * float(literal.abs().max()))


def test_input_model_untouched_and_kontext_reference_latents_do_not_break(pack):
    patcher = _pack_model("dev", lora=False)
    before = sample(patcher, steps=3)
    model, _ = guided(patcher)
    positive = tf.null_conditioning(seed=5, guidance=GUIDANCE)
    positive[0][1]["reference_latents"] = [tf.latent(seed=30, height=4, width=4)]  # Flux Kontext's input
    kontext = sample(model, steps=3, positive=positive)
    assert torch.isfinite(kontext).all()
    assert not torch.allclose(kontext, sample(model, steps=3))  # the sampler's pass saw the reference latent
    assert torch.equal(sample(patcher, steps=3), before)
    assert "sampler_post_cfg_function" not in patcher.model_options
    assert all(p.is_inference() for p in patcher.model.diffusion_model.parameters())


def test_cancel_mid_run_leaves_nothing_behind(pack):
    import comfy.model_management as mm

    patcher = _pack_model("dev", lora=False)
    before = sample(patcher, steps=3)
    model, _ = guided(patcher)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(model, steps=3)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(sample(patcher, steps=3), before)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert "patches_replace" not in patcher.model_options["transformer_options"]


def _flux_controlnet():
    """An XLabs-style Flux ControlNet (ComfyUI's ControlNetFlux, 2 double + 3 single blocks) on random weights."""
    import comfy.controlnet
    import comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux

    with torch.inference_mode():
        model = ControlNetFlux(operations=comfy.ops.disable_weight_init, device=torch.device("cpu"),
                               dtype=torch.float32, **tf.host_config(tf.TINY))
        model.load_state_dict(tf.random_weights(model, seed=40))
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), extra_conds=["y", "guidance"])


def test_a_flux_controlnet_steers_the_sampler_pass_only(pack):
    """ControlNet residuals reach the sampler's own pass (the image follows the hint) but never an AD pass:
    the ControlNet runs once per sampling step and nothing else changes on the input MODEL."""
    patcher = _pack_model("dev", lora=False)
    before = sample(patcher, steps=3)
    model, _ = guided(patcher)
    control = _flux_controlnet()
    calls = []
    handle = control.control_model.register_forward_hook(lambda *a: calls.append(1))
    hint = torch.rand(1, 3, SHAPE[2] * 8, SHAPE[3] * 8, generator=torch.Generator().manual_seed(41))
    positive = tf.null_conditioning(seed=5, guidance=GUIDANCE)
    positive[0][1]["control"] = control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    try:
        controlled = sample(model, steps=3, positive=positive)
    finally:
        handle.remove()
    assert len(calls) == 3
    assert torch.isfinite(controlled).all()
    assert float((controlled - sample(model, steps=3)).abs().max()) > 1e-3
    assert torch.equal(sample(patcher, steps=3), before)
