"""AD Loss Guidance (DESIGN §2.5): the per-step update, the post-CFG hook and the node, on tiny
random-weight models inside ComfyUI's own samplers (run under inference mode, as in a prompt)."""

from __future__ import annotations

import math

import pytest
import torch
import tiny_models as tm
from literal_ad import extract as literal_features
from literal_ad import softmax_attention

SD15_SCALE = 0.18215
H, W = 8, 12  # latent size: non-square so that height/width mix-ups show


# -- helpers -------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mods(pack):
    """The pack's modules under test, loaded the way ComfyUI loads the pack."""
    import importlib

    names = {
        "guided": "attention_distillation_pack.guidance.guided",
        "autograd": "attention_distillation_pack.guidance.autograd",
        "optimize": "attention_distillation_pack.guidance.optimize",
        "session": "attention_distillation_pack.attention.session",
        "sd_family": "attention_distillation_pack.attention.sd_family",
        "capture": "attention_distillation_pack.nodes.capture",
        "node": "attention_distillation_pack.nodes.guidance",
        "errors": "attention_distillation_pack.nodes.errors",
    }
    return type("Mods", (), {k: importlib.import_module(v) for k, v in names.items()})


@pytest.fixture(scope="module")
def sd15():
    """Tiny SD1.5 built inside inference mode, like CheckpointLoaderSimple builds models."""
    with torch.inference_mode():
        return tm.build("sd15", seed=0)


@pytest.fixture(scope="module")
def ref_latent():
    """A raw (VAE-space) reference latent with the spread of real SD latents (model space ~1)."""
    return 5.0 * torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def null_cond():
    return tm.conditioning("sd15", seed=9)


@pytest.fixture(scope="module")
def reference(mods, sd15, ref_latent, null_cond):
    with torch.inference_mode():
        (ref,) = mods.capture.CaptureReferenceAttention().capture(
            sd15, {"samples": ref_latent}, null_cond, "paper default"
        )
    return ref


def guide(mods, model, reference, lr=0.015, iterations=2, adain=True, start=0.0, end=1.0, seed=0, **optional):
    with torch.inference_mode():
        (patched,) = mods.node.ADLossGuidance().patch(
            model, reference, lr, iterations, adain, start, end, seed, **optional
        )
    return patched


def hook_of(model, index=-1):
    return model.model_options["sampler_post_cfg_function"][index]


POS = tm.conditioning("sd15", seed=1)
NEG = tm.conditioning("sd15", seed=2)


def sample(
    model,
    steps=3,
    sampler="ddim",
    scheduler="ddim_uniform",
    cfg=5.0,
    batch=1,
    seed=0,
    latent=None,
    pos=None,
    neg=None,
    **kwargs,
):
    import comfy.sample

    with torch.inference_mode():
        if latent is None:
            latent = torch.zeros(batch, 4, H, W)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler,
            scheduler,
            pos or POS,
            neg or NEG,
            latent,
            seed=seed,
            disable_pbar=True,
            **kwargs,
        )


def attn1_keys(diffusion_model):
    """(block, id, index) of every attn1 in execution order: the test's own walk."""
    keys = []
    groups = [("input", i, b) for i, b in enumerate(diffusion_model.input_blocks)]
    groups += [("middle", 0, diffusion_model.middle_block)]
    groups += [("output", i, b) for i, b in enumerate(diffusion_model.output_blocks)]
    for name, number, block in groups:
        for module in block:
            for index, _ in enumerate(getattr(module, "transformer_blocks", [])):
                keys.append((name, number, index))
    return keys


@pytest.fixture
def recorded(mods, monkeypatch):
    """Records every call of the per-step update made by the hook: (kwargs, result)."""
    calls = []
    original = mods.guided.ad_guidance_update

    def wrapper(session, latent, sigma, reference_noise, settings, **kwargs):
        result = original(session, latent, sigma, reference_noise, settings, **kwargs)
        calls.append(
            dict(
                latent=latent.detach().clone(),
                sigma=sigma,
                step=kwargs.get("step"),
                result=result.detach().clone(),
                session=session,
                reference_noise=reference_noise,
                adain_noise=kwargs.get("adain_noise"),
            )
        )
        return result

    monkeypatch.setattr(mods.guided, "ad_guidance_update", wrapper)
    return calls


# -- a literal implementation of DESIGN §2.5 (shares no code with the pack) ---------------------


def literal_eps(unet, latent, t, context):
    return unet(latent, torch.full((latent.shape[0],), float(t)), context=context.expand(latent.shape[0], -1, -1))


def literal_adain(x, target, eps=1e-6):
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = target.mean(dim=(0, 2, 3), keepdim=True), target.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + eps) * t_std + t_mean


def alphas_cumprod():
    """SD's scaled-linear schedule, computed independently in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def literal_guided_ddim(
    unet, x_init, timesteps, next_timesteps, cfg, pos, neg, reference, null, keys, lr, iterations, use_adain, noise_for
):
    """The reference code's guided sampling in its own VP form: DDIM (η = 0) step with CFG on ε,
    AdaIN to the noised reference, reference features with fresh noise, a fresh Adam on the
    VP latent. `next_timesteps[i]` None means the schedule ends at σ = 0 (ᾱ' = 1, features at
    t' = 0). Inputs and result are k-diffusion latents in model space."""
    ab = alphas_cumprod()
    z = x_init * math.sqrt(float(ab[timesteps[0]]))
    a_next = 1.0
    clone_guard = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t)
    for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
        a_t = float(ab[t])
        a_next = float(ab[t_next]) if t_next is not None else 1.0
        with torch.no_grad():
            eps_u, eps_c = literal_eps(unet, z, t, neg), literal_eps(unet, z, t, pos)
            eps = eps_u + cfg * (eps_c - eps_u)
            x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            z = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        t_feat = t_next if t_next is not None else 0
        a_feat = float(ab[t_feat])
        eps_ref, eps_adain = noise_for(t_feat)
        if use_adain:
            z = literal_adain(z, math.sqrt(a_feat) * reference + math.sqrt(1 - a_feat) * eps_adain)
        with torch.no_grad():
            ref_feats = literal_features(
                unet, math.sqrt(a_feat) * reference + math.sqrt(1 - a_feat) * eps_ref, t_feat, null, keys
            )
        z = z.detach().requires_grad_(True)
        adam = torch.optim.Adam([z], lr=lr)
        with clone_guard:
            for _ in range(iterations):
                adam.zero_grad()
                loss = 0.0
                for (q, _, _, out), (_, k_ref, v_ref, _) in zip(
                    literal_features(unet, z, t_feat, null, keys), ref_feats
                ):
                    with torch.no_grad():
                        target = softmax_attention(q, k_ref, v_ref)
                    loss = loss + (out - target).abs().mean()
                loss.backward()
                adam.step()
        z = z.detach()
    return z / math.sqrt(a_next)


@pytest.fixture(scope="module")
def literal_setup(sd15, ref_latent, null_cond):
    """The same tiny model built outside inference mode (identical weights) for the literal run."""
    plain = tm.build("sd15", seed=0)
    unet = plain.model.diffusion_model
    unet.requires_grad_(False)
    for a, b in zip(unet.state_dict().values(), sd15.model.diffusion_model.state_dict().values()):
        assert torch.equal(a, b)
    keys = attn1_keys(unet)[-6:]
    return unet, keys, ref_latent * SD15_SCALE, null_cond[0][0]


def _literal_run(mods, literal_setup, steps, last, lr, iterations, use_adain, seed, init_scale=1.0):
    import comfy.sample

    unet, keys, reference, null = literal_setup
    timesteps = [1 + (1000 // steps) * (steps - 1 - i) for i in range(steps)]
    nxt = timesteps[1:] + [None]
    timesteps, nxt = timesteps[:last], nxt[:last]
    ab = alphas_cumprod()
    sigma0 = math.sqrt((1 - float(ab[timesteps[0]])) / float(ab[timesteps[0]]))
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, H, W), 0)
    x_init = noise * torch.tensor(sigma0, dtype=torch.float32) * init_scale  # the sampler's start: noise·σ₀

    def noise_for(t_next):
        """The pack's documented noise: drawn for (seed, the step's target timestep, stream)."""
        shape, key = tuple(reference.shape), 1000 * t_next
        return (
            mods.guided.step_noise(shape, seed, key, mods.guided.STREAM_REFERENCE),
            mods.guided.step_noise(shape, seed, key, mods.guided.STREAM_ADAIN),
        )

    result = literal_guided_ddim(
        unet,
        x_init,
        timesteps,
        nxt,
        5.0,
        POS[0][0],
        NEG[0][0],
        reference,
        null,
        keys,
        lr,
        iterations,
        use_adain,
        noise_for,
    )
    return result / SD15_SCALE


# -- equivalence with the definition ---------------------------------------------------------------


def test_one_guided_ddim_step_equals_literal_reference_algorithm(mods, sd15, reference, literal_setup):
    """ddim + ddim_uniform, one step of 5 (t 801 → 601): the hook's result equals the literal
    VP-form implementation to float tolerance, with AdaIN and without."""
    for use_adain in (True, False):
        guided = guide(mods, sd15, reference, lr=0.05, iterations=3, adain=use_adain, seed=7)
        ours = sample(guided, steps=5, last_step=1)
        literal = _literal_run(mods, literal_setup, steps=5, last=1, lr=0.05, iterations=3, use_adain=use_adain, seed=7)
        plain = sample(sd15, steps=5, last_step=1)
        moved = float((literal - plain).abs().max())
        assert moved > 1e-2, "the guidance must move the latent for the comparison to mean anything"
        assert torch.allclose(ours, literal, rtol=0, atol=2e-6 * float(literal.abs().max())), (
            f"adain={use_adain}: max diff {float((ours - literal).abs().max())} vs guidance move {moved}"
        )


def test_whole_guided_ddim_run_matches_literal_within_float32_sensitivity(mods, sd15, reference, literal_setup):
    """A whole 10-step run with the SD1.5 text-to-image settings (lr 0.015, 3 iterations, AdaIN),
    down to σ = 0 (features at t' = 0). Compared against the literal algorithm's own reaction to a
    1e-6 relative change of its start latent (DESIGN §2.4: the optimization amplifies float32
    rounding); measured: difference ~2× that sensitivity, ~4e-6 of the guidance's effect."""
    settings = dict(lr=0.015, iterations=3, use_adain=True, seed=3)
    guided = guide(mods, sd15, reference, lr=0.015, iterations=3, adain=True, seed=3)
    ours = sample(guided, steps=10)
    literal = _literal_run(mods, literal_setup, steps=10, last=10, **settings)
    nudged = _literal_run(mods, literal_setup, steps=10, last=10, init_scale=1 + 1e-6, **settings)
    plain = sample(sd15, steps=10)
    sensitivity = float((nudged - literal).abs().max())
    difference = float((ours - literal).abs().max())
    effect = float((literal - plain).abs().max())
    assert effect > 1.0
    assert difference <= 10 * max(sensitivity, 1e-6 * float(literal.abs().max())), (difference, sensitivity, effect)
    assert difference < 1e-4 * effect


# -- the hook's algebra and the host's schedule -----------------------------------------------------


def test_euler_lands_exactly_on_the_optimized_latent(mods, sd15, reference, recorded):
    import comfy.sample

    guided = guide(mods, sd15, reference, lr=0.05, iterations=2)
    states = []
    with torch.inference_mode():
        latent = torch.zeros(1, 4, H, W)
        out = comfy.sample.sample(
            guided,
            comfy.sample.prepare_noise(latent, 0),
            3,
            5.0,
            "euler",
            "normal",
            POS,
            NEG,
            latent,
            seed=0,
            disable_pbar=True,
            callback=lambda i, den, x, total: states.append(x.clone()),
        )
    assert [c["step"] for c in recorded] == [0, 1, 2]
    assert recorded[-1]["sigma"] == 0.0
    for call, landed in zip(recorded[:-1], states[1:]):
        assert torch.allclose(landed, call["result"], rtol=1e-5, atol=1e-5)
        assert float((call["result"] - call["latent"]).abs().max()) > 1e-3  # the update did something
    final = out * SD15_SCALE  # process_latent_in of the LATENT the sampler returned
    assert torch.allclose(final, recorded[-1]["result"], rtol=1e-5, atol=1e-5)


def test_landing_algebra_and_schedule_lookup(mods):
    g = mods.guided
    x, d = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    target = torch.randn(2, 4, 3, 3)
    for sigma, nxt in ((14.6, 3.2), (0.5, 0.0)):
        star = g.landing_denoised(x, target, sigma, nxt)
        assert torch.allclose(g.deterministic_step(x, star, sigma, nxt), target, atol=1e-5)
    assert torch.allclose(g.deterministic_step(x, d, 2.0, 0.0), d)

    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert g.schedule_step(sigmas, 14.6) == (0, pytest.approx(7.0))
    assert g.schedule_step(sigmas, 3.0) == (2, pytest.approx(1.0))
    assert g.schedule_step(sigmas, 1.0) == (3, 0.0)  # last step: σ' = 0
    assert g.schedule_step(sigmas, 5.0) == (1, pytest.approx(3.0))  # a midpoint call (dpm_2, SDE)
    assert g.schedule_step(sigmas, 20.0) == (0, pytest.approx(7.0))
    assert g.schedule_step(torch.tensor([3.0, 1.0]), 1.0) is None  # truncated run: nothing below

    # Current ComfyUI hands the schedule over in transformer_options; it wins over the stack walk.
    model = type("M", (), {"current_patcher": "patcher"})()
    args = {"model": model, "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}
    found, patcher = g.sampling_context(args)
    assert found is sigmas and patcher == "patcher"
    assert g.sampling_context({"model": object(), "model_options": {}}) == (None, None)


def test_host_schedule_found_inside_the_2024_sampler(mods, sd15, reference, monkeypatch):
    """On the November 2024 core (no sample_sigmas) the stack walk finds the running schedule
    and the patcher that samples, including a patcher cloned after the guidance node."""
    import comfy.samplers

    seen = []
    original = mods.guided.sampling_context

    def spy(args):
        result = original(args)
        seen.append(result)
        return result

    monkeypatch.setattr(mods.guided, "sampling_context", spy)
    later = guide(mods, sd15, reference).clone()  # e.g. a LoRA loader after AD Loss Guidance
    sample(later, steps=3, sampler="euler", scheduler="karras")
    expected = comfy.samplers.calculate_sigmas(sd15.model.model_sampling, "karras", 3)
    assert len(seen) == 3
    for sigmas, patcher in seen:
        assert torch.allclose(sigmas.cpu(), expected)
        assert patcher is later


def test_last_step_features_at_timestep_zero(mods, sd15):
    ms = sd15.model.model_sampling
    t, s = mods.sd_family.feature_timestep(ms, 0.0)
    assert t == 0.0 and s == pytest.approx(float(ms.sigmas[0]))
    t, s = mods.sd_family.feature_timestep(ms, float(ms.sigmas[601]))
    assert t == 601.0 and s == pytest.approx(float(ms.sigmas[601]), rel=1e-6)


def test_step_noise_is_reproducible_and_distinct(mods):
    g = mods.guided
    a = g.step_noise((1, 4, 8, 8), 5, 3, g.STREAM_REFERENCE)
    assert torch.equal(a, g.step_noise((1, 4, 8, 8), 5, 3, g.STREAM_REFERENCE))
    others = [
        g.step_noise((1, 4, 8, 8), 5, 4, 0),
        g.step_noise((1, 4, 8, 8), 6, 3, 0),
        g.step_noise((1, 4, 8, 8), 5, 3, 1),
    ]
    for other in others:
        assert not torch.allclose(a, other)


# -- the optimization itself -------------------------------------------------------------------------


def test_ad_loss_falls_within_each_step_and_over_the_run(mods, sd15, reference):
    guided = guide(mods, sd15, reference, lr=0.015, iterations=3, adain=True)
    reports = []
    hook_of(guided).on_iteration = reports.append
    final_guided = sample(guided, steps=4)
    final_plain = sample(sd15, steps=4)
    steps = sorted({r.step for r in reports})
    assert steps == [0, 1, 2, 3]
    for step in steps:
        losses = [r.ad for r in reports if r.step == step]
        assert len(losses) == 3 and losses[0] > losses[1] > losses[2], (step, losses)

    # AD loss of the finished latents against the clean reference, features at timestep 0.
    session = mods.session.ADModelSession(sd15, reference)
    with mods.autograd.autograd_through(sd15.model.diffusion_model):
        refs = session.reference_kv(0)

        def final_loss(latent):
            with torch.no_grad():
                x = session.to_model_space(latent)
                return float(mods.optimize.ad_objective(session, x, 0, refs, None, 0.0, None)[1])

        guided_loss, plain_loss = final_loss(final_guided), final_loss(final_plain)
    assert guided_loss < 0.8 * plain_loss, (guided_loss, plain_loss)


def test_update_function_directly(mods, sd15, reference):
    """The per-step function on its own: VP scaling, noised reference, content loss, masks."""
    g = mods.guided
    session = mods.session.ADModelSession(sd15, reference)
    latent = 3.0 * torch.randn(2, 4, H, W, generator=torch.Generator().manual_seed(1))
    noise = g.step_noise(tuple(session.reference_latent.shape), 0, 0, 0)
    content = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(2))
    reports = []
    with mods.autograd.autograd_through(sd15.model.diffusion_model):
        settings = g.GuidanceSettings(lr=0.02, iterations=2, adain=False, content_weight=0.5)
        out = g.ad_guidance_update(
            session,
            latent,
            2.5,
            noise,
            settings,
            content=content,
            content_noise=torch.randn(1, 4, H, W),
            on_iteration=reports.append,
        )
        again = g.ad_guidance_update(
            session, latent, 2.5, noise, settings, content=content, content_noise=torch.randn(1, 4, H, W)
        )
        off = g.ad_guidance_update(session, latent, 2.5, noise, g.GuidanceSettings(lr=0.0, iterations=2, adain=False))
    assert out.shape == latent.shape and not out.requires_grad
    assert torch.equal(off, latent)  # nothing to do: the latent comes back unchanged
    assert all(r.content > 0 for r in reports) and len(reports) == 2
    # Adam on z = x/c moves each element by at most ~lr per iteration, i.e. c·lr in x (DESIGN §2.5).
    c = math.sqrt(2.5**2 + 1)
    step = float((out - latent).abs().max())
    assert 0.2 * c * 0.02 < step <= 2 * c * 0.02 * 1.01
    assert not torch.equal(out, again)  # different content noise, different result


# -- reproducibility, isolation, cancel ------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_guidance(mods, sd15, reference, recorded):
    off = sample(guide(mods, sd15, reference, lr=0.05, gradient_checkpointing="off"), steps=2)
    assert not recorded[0]["session"].unet_pass.checkpoint
    recorded.clear()
    on = sample(guide(mods, sd15, reference, lr=0.05, gradient_checkpointing="on"), steps=2)
    assert recorded[0]["session"].unet_pass.checkpoint
    assert torch.allclose(on, off, rtol=1e-5, atol=1e-5 * float(off.abs().max()))


def test_same_seeds_same_image_and_input_model_untouched(mods, sd15, reference):
    params_before = {k: (id(p), p.clone()) for k, p in sd15.model.diffusion_model.named_parameters()}
    options_before = repr(sd15.model_options)
    plain_before = sample(sd15, steps=2)
    guided = guide(mods, sd15, reference)
    assert guided is not sd15 and guided.model is sd15.model
    assert "sampler_post_cfg_function" not in sd15.model_options and repr(sd15.model_options) == options_before
    hits = reference.cache.hits
    first = sample(guided, steps=2)
    second = sample(guided, steps=2)
    assert torch.equal(first, second)
    assert reference.cache.hits >= hits + 2  # the rerun reused the noised reference features
    assert not torch.equal(first, plain_before)
    assert torch.equal(sample(sd15, steps=2), plain_before)
    for k, p in sd15.model.diffusion_model.named_parameters():
        assert id(p) == params_before[k][0] and torch.equal(p, params_before[k][1])
    other_seed = sample(guide(mods, sd15, reference, seed=1), steps=2)
    assert not torch.equal(other_seed, first)


def test_cancel_mid_run_leaves_nothing_patched(mods, sd15, reference, monkeypatch):
    import comfy.model_management as mm

    guided = guide(mods, sd15, reference, iterations=2)
    expected = sample(guided, steps=3)
    plain = sample(sd15, steps=3)
    params = {k: id(p) for k, p in sd15.model.diffusion_model.named_parameters()}
    calls = []
    original = mods.guided.ad_guidance_update

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 1
        return original(*args, **kwargs)

    monkeypatch.setattr(mods.guided, "ad_guidance_update", interrupting)
    with pytest.raises(mm.InterruptProcessingException):
        sample(guided, steps=3)
    monkeypatch.setattr(mods.guided, "ad_guidance_update", original)
    assert len(calls) == 2 and not mm.processing_interrupted()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert {k: id(p) for k, p in sd15.model.diffusion_model.named_parameters()} == params
    assert all(p.is_inference() for p in sd15.model.diffusion_model.parameters())
    assert torch.equal(sample(sd15, steps=3), plain)
    assert torch.equal(sample(guided, steps=3), expected)


def test_out_of_memory_in_the_ad_pass_says_what_to_do(mods, sd15, reference, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mods.guided, "ad_guidance_update", exhausted)
    with pytest.raises(torch.OutOfMemoryError, match="gradient_checkpointing"):
        sample(guide(mods, sd15, reference), steps=1)


# -- samplers, sampler nodes, batches, img2img, inpainting -----------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [
        "euler_ancestral",
        "heun",
        "dpm_2",
        "lms",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "ddpm",
        "lcm",
        "uni_pc",
    ],
)
def test_every_kind_of_k_diffusion_sampler(mods, sd15, reference, recorded, sampler):
    guided = guide(mods, sd15, reference, lr=0.05, iterations=1)
    plain = sample(sd15, steps=2, sampler=sampler, scheduler="normal")
    out = sample(guided, steps=2, sampler=sampler, scheduler="normal")
    assert torch.isfinite(out).all()
    assert float((out - plain).abs().max()) > 1e-2
    assert len(recorded) >= 2 and all(c["sigma"] >= 0 for c in recorded)


def test_ksampler_advanced_sampler_custom_and_custom_advanced(mods, sd15, reference, recorded):
    import comfy.sample
    import comfy.samplers

    guided = guide(mods, sd15, reference, lr=0.05, iterations=1)
    # KSamplerAdvanced: steps 1..3 of 4 with the noise already in the latent, then the rest.
    with torch.inference_mode():
        latent = torch.zeros(1, 4, H, W)
        noise = comfy.sample.prepare_noise(latent, 0)
        first = comfy.sample.sample(
            guided,
            noise,
            4,
            5.0,
            "euler",
            "normal",
            POS,
            NEG,
            latent,
            start_step=0,
            last_step=2,
            force_full_denoise=False,
            seed=0,
            disable_pbar=True,
        )
        rest = comfy.sample.sample(
            guided,
            torch.zeros_like(noise),
            4,
            5.0,
            "euler",
            "normal",
            POS,
            NEG,
            first,
            disable_noise=True,
            start_step=2,
            last_step=10000,
            force_full_denoise=True,
            seed=0,
            disable_pbar=True,
        )
    assert [c["step"] for c in recorded] == [0, 1, 0, 1]
    assert recorded[1]["sigma"] > 0 and recorded[3]["sigma"] == 0.0
    whole = sample(guided, steps=4, sampler="euler", scheduler="normal")
    # The per-step noise is drawn for the step's target timestep, not its index in the running
    # schedule, so the split run is the whole run (up to the LATENT round trip in between).
    assert torch.allclose(rest, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))

    sigmas = comfy.samplers.calculate_sigmas(sd15.model.model_sampling, "karras", 3)
    recorded.clear()
    def sample_custom(model):
        sampler = comfy.samplers.sampler_object("dpmpp_2m")
        with torch.inference_mode():
            return comfy.sample.sample_custom(
                model, noise, 5.0, sampler, sigmas, POS, NEG, latent, seed=0, disable_pbar=True
            )

    custom = sample_custom(guided)
    plain = sample_custom(sd15)
    assert [c["step"] for c in recorded] == [0, 1, 2] and not torch.equal(custom, plain)

    recorded.clear()
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(guided)
        guider.set_conds(POS, NEG)
        guider.set_cfg(5.0)
        advanced = guider.sample(
            noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True
        )
    assert [c["step"] for c in recorded] == [0, 1, 2] and torch.isfinite(advanced).all()


def test_batch_cfg1_img2img_and_inpainting(mods, sd15, reference, recorded):
    guided = guide(mods, sd15, reference, lr=0.05, iterations=2)
    # Batch of two at cfg 1 (no uncond pass): each item is guided like a batch of one.
    batch = sample(guided, steps=2, cfg=1.0, batch=2)
    single = sample(guided, steps=2, cfg=1.0, batch=1)
    unguided = sample(sd15, steps=2, cfg=1.0, batch=1)
    assert batch.shape[0] == 2 and all(c["latent"].shape[0] == 2 for c in recorded[:2])
    # The loss is the mean over the batch, as in the reference code; Adam normalizes the 1/B
    # away up to its eps, so items agree closely but not bit for bit.
    assert float((batch[:1] - single).abs().max()) < 0.05 * float((single - unguided).abs().max())
    assert not torch.allclose(batch[0], batch[1])

    # img2img: denoise 0.5 starts from the latent at a mid-schedule sigma.
    start = 5.0 * torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(4))
    recorded.clear()
    img2img = sample(guided, steps=2, sampler="euler", scheduler="normal", latent=start, denoise=0.5)
    plain = sample(sd15, steps=2, sampler="euler", scheduler="normal", latent=start, denoise=0.5)
    assert len(recorded) == 2 and recorded[0]["sigma"] < 3.0
    assert float((img2img - plain).abs().max()) > 1e-2

    # Inpainting: only the masked half changes, the rest stays the input latent.
    mask = torch.zeros(1, 1, H, W)
    mask[..., W // 2 :] = 1.0
    inpainted = sample(guided, steps=2, sampler="euler", scheduler="normal", latent=start, noise_mask=mask)
    assert torch.allclose(inpainted[..., : W // 2], start[..., : W // 2], atol=1e-4)
    plain = sample(sd15, steps=2, sampler="euler", scheduler="normal", latent=start, noise_mask=mask)
    assert float((inpainted - plain)[..., W // 2 :].abs().max()) > 1e-2


def test_active_range(mods, sd15, reference, recorded):
    """start/end are fractions of the schedule mapped to sigmas like ComfyUI's ControlNet and
    guidance nodes do; a step is guided when its starting σ lies in the range."""
    import comfy.samplers

    ms = sd15.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 4)
    for start, end in ((0.5, 1.0), (0.0, 0.3)):
        recorded.clear()
        sample(
            guide(mods, sd15, reference, start=start, end=end, iterations=1),
            steps=4,
            sampler="euler",
            scheduler="normal",
        )
        high, low = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
        expected = [i for i in range(4) if low <= float(sigmas[i]) <= high]
        assert 0 < len(expected) < 4
        assert [c["step"] for c in recorded] == expected


# -- composition -------------------------------------------------------------------------------------


def test_two_stacked_guidance_nodes_apply_in_order(mods, sd15, reference, ref_latent, null_cond, recorded):
    with torch.inference_mode():
        (other,) = mods.capture.CaptureReferenceAttention().capture(
            sd15, {"samples": -ref_latent.flip(-1)}, null_cond, "paper default"
        )
    first = guide(mods, sd15, reference, lr=0.05, iterations=2)
    both = guide(mods, first, other, lr=0.05, iterations=2)
    assert len(both.model_options["sampler_post_cfg_function"]) == 2
    assert len(first.model_options["sampler_post_cfg_function"]) == 1
    out_both = sample(both, steps=3, sampler="euler", scheduler="normal")
    assert len(recorded) == 6
    for one, two in zip(recorded[0::2], recorded[1::2]):
        assert one["session"].reference is reference and two["session"].reference is other
        # the second node starts from where the first one's update landed
        assert torch.allclose(two["latent"], one["result"], rtol=1e-5, atol=1e-5)
    recorded.clear()
    out_first = sample(first, steps=3, sampler="euler", scheduler="normal")
    assert float((out_both - out_first).abs().max()) > 1e-2


def test_pag_and_sag_compose_with_guidance(mods, sd15, reference, recorded):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    def apply(node, *args):
        """V1 nodes (Nov-2024 core) have `patch`; current ComfyUI's V3 nodes a classmethod `execute`."""
        with torch.inference_mode():
            if hasattr(node, "patch"):
                return node().patch(*args)[0]
            return node.execute(*args).args[0]

    guided = guide(mods, sd15, reference, lr=0.05, iterations=1)
    pag_only, guided_pag = apply(PerturbedAttentionGuidance, sd15, 3.0), apply(PerturbedAttentionGuidance, guided, 3.0)
    sag_only, guided_sag = apply(SelfAttentionGuidance, sd15, 0.8, 2.0), apply(SelfAttentionGuidance, guided, 0.8, 2.0)
    outs = {
        name: sample(m, steps=2, sampler="euler", scheduler="normal")
        for name, m in dict(
            guided=guided, pag=pag_only, guided_pag=guided_pag, sag=sag_only, guided_sag=guided_sag
        ).items()
    }
    assert len(guided_pag.model_options["sampler_post_cfg_function"]) == 2
    assert len(guided_sag.model_options["sampler_post_cfg_function"]) == 2
    assert ("middle", 0, 0) in guided_sag.model_options["transformer_options"]["patches_replace"]["attn1"]
    for combined, single in (
        ("guided_pag", "pag"),
        ("guided_pag", "guided"),
        ("guided_sag", "sag"),
        ("guided_sag", "guided"),
    ):
        assert float((outs[combined] - outs[single]).abs().max()) > 1e-3, (combined, single)
    assert len(recorded) == 2 * 3  # the guidance ran in every guided model's run


def test_guidance_sees_the_lora_patched_weights(mods, sd15, reference, recorded):
    """The update inside a LoRA model's run equals the update recomputed on LoRA-patched weights,
    and not the one on the base weights."""
    import comfy.model_management as mm
    import comfy.sd

    with torch.inference_mode():
        lora_model, _ = comfy.sd.load_lora_for_models(
            sd15, None, tm.lora_state_dict(sd15, match="attn1", scale=0.3), 1.0, 0.0
        )
    guided = guide(mods, lora_model, reference, lr=0.05, iterations=2)
    sample(guided, steps=1, sampler="euler", scheduler="normal")
    call = recorded[0]
    g = mods.guided
    settings = g.GuidanceSettings(lr=0.05, iterations=2, adain=True)

    def recompute(patcher):
        with torch.inference_mode():
            mm.load_models_gpu([patcher])
        session = mods.session.ADModelSession(patcher, reference)
        with mods.autograd.autograd_through(patcher.model.diffusion_model):
            return g.ad_guidance_update(
                session,
                call["latent"],
                call["sigma"],
                call["reference_noise"],
                settings,
                adain_noise=call["adain_noise"],
            )

    with_lora = recompute(lora_model)
    base = recompute(sd15)
    assert torch.allclose(with_lora, call["result"], rtol=1e-5, atol=1e-5)
    assert float((base - call["result"]).abs().max()) > 1e-3


# -- SDXL ------------------------------------------------------------------------------------------------


def test_sdxl_with_pooled_and_size_conditioning(mods):
    import copy

    with torch.inference_mode():
        xl = tm.build("sdxl", seed=0)
        null = tm.conditioning("sdxl", seed=9)
        ref_lat = {"samples": 5.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
        (ref,) = mods.capture.CaptureReferenceAttention().capture(xl, ref_lat, null, "paper default")
        other_null = copy.deepcopy(null)
        other_null[0][1]["pooled_output"] = other_null[0][1]["pooled_output"] + 1.0
        (ref_other_pooled,) = mods.capture.CaptureReferenceAttention().capture(xl, ref_lat, other_null, "paper default")
    pos, neg = tm.conditioning("sdxl", seed=1), tm.conditioning("sdxl", seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    kwargs = dict(steps=2, sampler="euler", scheduler="normal", latent=latent, pos=pos, neg=neg)
    guided = guide(mods, xl, ref, lr=0.05, iterations=2)
    reports = []
    hook_of(guided).on_iteration = reports.append
    out = sample(guided, **kwargs)
    assert len(reports) == 4 and all(math.isfinite(r.ad) for r in reports)
    assert reports[0].ad > reports[1].ad and reports[2].ad > reports[3].ad
    plain = sample(xl, **kwargs)
    assert torch.isfinite(out).all() and float((out - plain).abs().max()) > 1e-2
    # the AD passes feed the null conditioning's pooled vector (y) to the UNet
    other = sample(guide(mods, xl, ref_other_pooled, lr=0.05, iterations=2), **kwargs)
    assert float((other - out).abs().max()) > 1e-4


# -- content and region masks --------------------------------------------------------------------------


def test_content_latent_and_target_mask(mods, sd15, ref_latent, null_cond, reference):
    labels = torch.zeros(1, H, W)
    labels[..., W // 2 :] = 1.0
    with torch.inference_mode():
        (masked_ref,) = mods.capture.CaptureReferenceAttention().capture(
            sd15, {"samples": ref_latent}, null_cond, "paper default", reference_mask=labels
        )
    content = {"samples": 5.0 * torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(8))}
    guided = guide(mods, sd15, masked_ref, content=content, content_weight=0.5, target_mask=labels.flip(-1))
    reports = []
    hook_of(guided).on_iteration = reports.append
    out = sample(guided, steps=2, sampler="euler", scheduler="normal")
    assert torch.isfinite(out).all() and all(r.content > 0 for r in reports)
    unmasked = sample(
        guide(mods, sd15, masked_ref, content=content, content_weight=0.5), steps=2, sampler="euler", scheduler="normal"
    )
    assert float((unmasked - out).abs().max()) > 1e-4

    wrong_size = guide(mods, sd15, reference, content={"samples": torch.randn(1, 4, H, W + 4)})
    with pytest.raises(mods.guided.GuidanceInputError, match="content latent"):
        sample(wrong_size, steps=1, sampler="euler", scheduler="normal")


# -- the node ------------------------------------------------------------------------------------------


def test_node_interface(pack, mods):
    node = mods.node.ADLossGuidance
    assert pack.NODE_CLASS_MAPPINGS["ADLossGuidance"] is node
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ADLossGuidance"] == "AD Loss Guidance"
    assert node.RETURN_TYPES == ("MODEL",) and node.DESCRIPTION and node.CATEGORY == "Attention Distillation"
    inputs = node.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, (_, options) in inputs[group].items():
            assert options.get("tooltip"), name
    required = inputs["required"]
    assert required["lr"][1]["default"] == 0.015 and required["iterations"][1]["default"] == 2
    assert required["adain"][1]["default"] is True
    assert (required["start_percent"][1]["default"], required["end_percent"][1]["default"]) == (0.0, 1.0)
    assert set(inputs["optional"]) == {"content", "content_weight", "target_mask", "gradient_checkpointing", "windows"}
    assert "0.05" in required["lr"][1]["tooltip"] and "0.015" in required["lr"][1]["tooltip"]


def test_node_errors(mods, sd15, reference):
    import copy

    error = mods.errors.ADNodeError
    node = mods.node.ADLossGuidance()
    wrong_width = copy.copy(reference)
    wrong_width.conditioning = [[torch.zeros(1, 77, 64), {}]]  # e.g. captured with another checkpoint's CLIP
    base = dict(lr=0.015, iterations=2, adain=True, start_percent=0.0, end_percent=1.0, noise_seed=0)
    cases = [
        (dict(reference="not a reference"), "Capture Reference Attention"),
        (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(iterations=-1), "iterations"),
        (dict(target_mask=torch.ones(1, H, W)), "reference_mask"),
        (dict(content={"samples": torch.randn(1, 3, H, W)}), "channels"),
        (dict(content={"no": "samples"}), "LATENT"),
        (dict(gradient_checkpointing="sometimes"), "gradient_checkpointing"),
        (dict(reference=wrong_width), "cross-attention"),
    ]
    for change, message in cases:
        kwargs = dict(base, model=sd15, reference=reference)
        kwargs.update(change)
        with pytest.raises(error, match=message):
            with torch.inference_mode():
                node.patch(**kwargs)

    with torch.inference_mode():
        (off,) = node.patch(sd15, reference, **dict(base, iterations=0))
    assert off is not sd15 and "sampler_post_cfg_function" not in off.model_options
