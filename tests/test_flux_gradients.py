"""Gradients with respect to the latent through ComfyUI's Flux inside inference mode
(inference-tensor weights, LoRA-patched), with the in-place residual guard, plain and
block-checkpointed: equal to central finite differences in float64; and the autograd path
through ComfyUI's per-call cast of bf16/fp8-stored weights."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf
from comfy_env import differentiable_kernels
import tiny_models as tm

SIGMA = 0.55
SPEC = "0,3,4"  # a double block, two single blocks: checkpointing covers both kinds


def _float64_rope(args: dict, extra: dict) -> dict:
    """A dit replace that hands the block float64 RoPE tables. ComfyUI builds them in float32
    and rotates q and k in their dtype, which leaves float32 noise far above what central
    differences in float64 resolve; with float64 tables the whole model is float64."""
    return extra["original_block"](dict(args, pe=args["pe"].double()))


def float64_options() -> dict:
    keys = [("double_block", i) for i in range(2)] + [("single_block", j) for j in range(3)]
    return {"patches_replace": {"dit": {key: _float64_rope for key in keys}}}


def _objective(patcher, checkpoint: bool, options: dict | None = None, seed: int = 4):
    """The AD loss as a function of the latent, with its attention targets fixed at the
    reference's keys/values over the queries of a fixed latent (autograd and differences see
    the same function; the AD loss proper detaches its target), plus L1 terms on the image
    tokens' queries and on all keys, so that every recorded feature carries gradient."""
    from attention_distillation_pack.attention import flux_family as ff
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.guidance.losses import attention_target, content_loss

    base = patcher.model
    dtype = base.get_dtype() if base.manual_cast_dtype is None else base.manual_cast_dtype
    layers = select_layers(base.diffusion_model, SPEC)
    differentiated = ff.FluxFeaturePass(base, layers, checkpoint=checkpoint, transformer_options=options)
    fixed_pass = ff.FluxFeaturePass(base, layers, transformer_options=options)
    time, cond = tf.pass_inputs(base, tf.latent(), SIGMA, tf.null_conditioning(dtype=dtype))
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, 16, 6, 8, generator=generator).to(torch.float64)
    content = torch.randn(1, 16, 8, 6, generator=generator).to(torch.float64)
    with torch.no_grad():
        refs = fixed_pass.run(reference, time, cond)
        fixed = fixed_pass.run(content, time, cond)
        targets = [attention_target(c.q, r.k, r.v) for c, r in zip(fixed, refs)]

    def loss(x: torch.Tensor) -> torch.Tensor:
        records = differentiated.run(x, time, cond)
        ad = sum((r.out - t).abs().mean() for r, t in zip(records, targets))
        content_q = content_loss([r.image_part(r.q) for r in records], [c.image_part(c.q) for c in fixed])
        return ad + 0.3 * content_q + 0.1 * content_loss([r.k for r in records], [c.k for c in fixed])

    return loss


def _lora_patched(kind: str = "dev", dtype: torch.dtype = torch.float64, lowvram: bool = False):
    """LoRA on every 2-D block weight through ComfyUI's loader, patched inside inference mode;
    `lowvram`: every op casts per call and applies the LoRA on the fly (LowVramPatch).

    v0.33 computes a fully loaded LoRA in `lora_compute_dtype` (float32 on CPU) and an on-the-fly one
    in the weight's dtype; for float64 weights both compute in float64 here, so the two loading modes
    hold the same weights (on v0.3.64 they already did)."""
    import comfy.model_management as mm
    import comfy.sd

    compute_dtypes = getattr(mm, "LORA_COMPUTE_DTYPES", {})
    device = torch.device("cpu")
    before = compute_dtypes.get(device)
    compute_dtypes[device] = dtype
    try:
        with torch.inference_mode():
            base = tf.build(kind, dtype=dtype)
            patched, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base, match="blocks"), 1.0, 0.0)
            patched.patch_model(device_to=device, lowvram_model_memory=1 if lowvram else 0)
    finally:
        if before is None:
            compute_dtypes.pop(device, None)
        else:
            compute_dtypes[device] = before
    assert len(patched.patches) > 0
    return patched


def _gradient(patcher, x0: torch.Tensor, checkpoint: bool, directions: list[torch.Tensor] = (),
              options: dict | None = None):
    from attention_distillation_pack.guidance.autograd import autograd_through

    dm = patcher.model.diffusion_model
    with torch.inference_mode():  # the executor's context: the node runs inside it
        loss = _objective(patcher, checkpoint, options)
        with autograd_through(dm):
            x = x0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x), [x])
            eps = 1e-6
            pairs = []
            for direction in directions:
                with torch.no_grad():
                    fd = (loss(x0 + eps * direction) - loss(x0 - eps * direction)) / (2 * eps)
                pairs.append((float(fd), float((grad * direction).sum())))
    assert all(p.is_inference() for p in dm.parameters()), "weights were not restored"
    return grad, pairs


@tf.requires_flux_host
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_gradient_matches_finite_differences_with_lora(pack, kind, checkpoint):
    patcher = _lora_patched(kind)
    try:
        assert next(patcher.model.diffusion_model.parameters()).is_inference()
        x0 = tf.latent(seed=7, batch=2, dtype=torch.float64)
        generator = torch.Generator().manual_seed(9)
        random = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        grad, _ = _gradient(patcher, x0, checkpoint, options=float64_options())
        directions = [grad / grad.norm(), random / random.norm()]
        grad, pairs = _gradient(patcher, x0, checkpoint, directions, options=float64_options())
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        for fd, analytic in pairs:
            assert abs(fd - analytic) <= 1e-6 * float(grad.norm()), pairs
    finally:
        with torch.inference_mode():
            patcher.unpatch_model(device_to=torch.device("cpu"))


@tf.requires_flux_host
def test_lowvram_loading_gives_the_same_gradient(pack):
    """On-the-fly LoRA weights (lowvram): the gradient is that of the model, checked against central
    differences as for full loading, and equals full loading's. v0.3.64 rounds both loading modes' LoRA
    through float32 alike (equal to 1e-13); v0.33 computes a fully loaded LoRA's deltas in float32 and an
    on-the-fly one in the weight's dtype, so there the two models differ by float32 rounding (measured:
    1.5e-5 of the largest gradient element) and agree to 1e-4."""
    import comfy.model_management as mm

    x0 = tf.latent(seed=7, dtype=torch.float64)
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = []
    for lowvram in (False, True):
        patcher = _lora_patched(lowvram=lowvram)
        on_the_fly = [m for m in patcher.model.diffusion_model.modules() if getattr(m, "weight_function", None)]
        assert bool(on_the_fly) is lowvram
        try:
            grad, pairs = _gradient(patcher, x0, True, [direction / direction.norm()], options=float64_options())
            for fd, analytic in pairs:
                assert abs(fd - analytic) <= 1e-6 * float(grad.norm()), pairs
            grads.append(grad)
        finally:
            with torch.inference_mode():
                patcher.unpatch_model(device_to=torch.device("cpu"))
    same_rounding = not hasattr(mm, "in_training")  # the hosts before v0.33
    tolerance = dict(rtol=1e-10, atol=1e-13) if same_rounding else dict(rtol=1e-4, atol=1e-4 * float(grads[0].abs().max()))
    torch.testing.assert_close(grads[1], grads[0], **tolerance)


@tf.requires_flux_host
def test_checkpointing_gives_the_same_gradient_and_lora_changes_it(pack):
    patcher = _lora_patched()
    try:
        x0 = tf.latent(seed=7, dtype=torch.float64)
        plain, _ = _gradient(patcher, x0, checkpoint=False)
        checkpointed, _ = _gradient(patcher, x0, checkpoint=True)
        torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-14)
    finally:
        with torch.inference_mode():
            patcher.unpatch_model(device_to=torch.device("cpu"))
    with torch.inference_mode():
        without_lora = tf.build("dev", dtype=torch.float64)
    base_grad, _ = _gradient(without_lora, x0, checkpoint=True)
    assert (base_grad - plain).norm() > 1e-3 * plain.norm()


@tf.requires_flux_host
@differentiable_kernels()
def test_comfyui_flux_blocks_need_the_inplace_guard(pack):
    """Why the guard exists: a plain backward through ComfyUI's Flux fails on `x += …`."""
    from attention_distillation_pack.guidance.autograd import autograd_through
    import comfy.ldm.modules.attention as attention

    with torch.inference_mode():
        patcher = tf.build("dev", dtype=torch.float64)
        dm = patcher.model.diffusion_model
        cond = tf.null_conditioning(dtype=torch.float64)
        with autograd_through(dm):
            x = tf.latent(dtype=torch.float64).requires_grad_(True)
            sdpa = {"optimized_attention_override": lambda func, *a, **k: attention.attention_pytorch(*a, **k)}
            out = dm(x, torch.tensor([SIGMA]), cond[0][0].clone(), y=cond[0][1]["pooled_output"].clone(),
                     guidance=torch.ones(1, dtype=torch.float64), transformer_options=sdpa)
            with pytest.raises(RuntimeError, match="inplace"):
                out.sum().backward()


def test_residual_guard_keeps_residuals_and_refuses_other_inplace_edits(pack):
    from attention_distillation_pack.attention.flux_blocks import residual_guard

    leaf = torch.randn(5, dtype=torch.float64, requires_grad=True)
    residual = leaf * 1
    with residual_guard(residual):
        saved = residual.sin()  # saves the residual
        residual += 1.0  # the block's in-place add
    (grad,) = torch.autograd.grad(saved.sum(), [leaf])
    torch.testing.assert_close(grad, leaf.detach().cos())

    other = leaf * 2
    with residual_guard(residual):
        result = other.exp()  # saves its own output
        result.mul_(2.0)  # an in-place edit the guard does not cover
    with pytest.raises(RuntimeError, match="modified in place"):
        result.sum().backward()


@tf.requires_flux_host
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_low_precision_weights_through_the_per_call_cast(pack, stored):
    """Weights stored in bf16/fp8 and cast to float32 per call by `comfy.ops` manual_cast:
    gradients are finite and equal those of a float32 model holding the rounded weights."""
    with torch.inference_mode():
        weights = tf.random_weights(tf.build("dev").model.diffusion_model)
        low = tf.build("dev", dtype=stored, manual_cast=torch.float32, weights=weights)
        rounded = tf.build("dev", weights={k: v.to(stored).float() for k, v in weights.items()})
        exact = tf.build("dev", weights=weights)
    assert next(low.model.diffusion_model.parameters()).dtype == stored
    x0 = tf.latent(seed=7).to(torch.float64)
    grad_low, _ = _gradient(low, x0, checkpoint=True)
    grad_rounded, _ = _gradient(rounded, x0, checkpoint=True)
    grad_exact, _ = _gradient(exact, x0, checkpoint=False)
    assert torch.isfinite(grad_low).all() and grad_low.abs().sum() > 0
    torch.testing.assert_close(grad_low, grad_rounded, rtol=1e-5, atol=1e-7)
    cosine = torch.nn.functional.cosine_similarity(grad_low.flatten(), grad_exact.flatten(), dim=0)
    assert cosine > (0.998 if stored == torch.bfloat16 else 0.98), float(cosine)
