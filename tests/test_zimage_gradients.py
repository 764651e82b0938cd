"""Gradients with respect to the latent through ComfyUI's Z-Image inside inference mode (inference-tensor
weights, LoRA through ComfyUI's loader, comfy-kitchen's kernels switched off by the pack's training
switch), plain and block-checkpointed: equal to central finite differences in float64; and the autograd
path through ComfyUI's per-call cast of fp8-stored weights."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm
import tiny_zimage as tz

pytestmark = tz.requires_zimage_host
SIGMA = 0.55
SPEC = "0,2"  # a checkpointed recorded layer, a checkpointed passed-through one, and the last


class Float64Rope(torch.nn.Module):
    """Test double for NextDiT's `rope_embedder`: the same RoPE tables in float64. ComfyUI builds them in
    float32 and rotates q and k in that dtype, which leaves float32 noise far above what central
    differences in float64 resolve; with float64 tables the whole model is float64."""

    def __init__(self, embedder: torch.nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedder(ids).double()


def _lora_patched(dtype: torch.dtype = torch.float64, lowvram: bool = False):
    """LoRA on every 2-D main-layer weight through ComfyUI's loader, patched inside inference mode (as
    tests/test_flux_gradients.py: LoRA computed in the weights' dtype in both loading modes)."""
    import comfy.model_management as mm
    import comfy.sd

    compute_dtypes = getattr(mm, "LORA_COMPUTE_DTYPES", {})
    device = torch.device("cpu")
    before = compute_dtypes.get(device)
    compute_dtypes[device] = dtype
    try:
        with torch.inference_mode():
            base = tz.build(dtype=dtype)
            patched, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base, match="layers"), 1.0, 0.0)
            patched.patch_model(device_to=device, lowvram_model_memory=1 if lowvram else 0)
    finally:
        if before is None:
            compute_dtypes.pop(device, None)
        else:
            compute_dtypes[device] = before
    assert len(patched.patches) > 0
    dm = patched.model.diffusion_model
    dm.rope_embedder = Float64Rope(dm.rope_embedder)
    return patched


def _objective(patcher, checkpoint: bool, seed: int = 4):
    """The AD loss as a function of the latent, with its targets fixed at the reference's keys/values over
    the queries of a fixed latent (autograd and differences see the same function), plus L1 terms on the
    image rows' queries and on all keys, so that every recorded feature carries gradient."""
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.attention.zimage import ZIMAGE
    from attention_distillation_pack.guidance.losses import attention_target, content_loss

    base = patcher.model
    layers = select_layers(base.diffusion_model, SPEC)
    differentiated = ZIMAGE.feature_pass(patcher, layers, checkpoint=checkpoint)
    fixed_pass = ZIMAGE.feature_pass(patcher, layers)
    dtype = base.get_dtype() if base.manual_cast_dtype is None else base.manual_cast_dtype
    cond = ZIMAGE.conditioning(base, tz.null_conditioning(dtype=dtype), tz.latent(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, 16, 6, 8, generator=generator).to(torch.float64)
    content = torch.randn(1, 16, 8, 6, generator=generator).to(torch.float64)
    with torch.no_grad():
        refs = fixed_pass.run(reference, SIGMA, cond)
        fixed = fixed_pass.run(content, SIGMA, cond)
        targets = [attention_target(c.q, r.k, r.v) for c, r in zip(fixed, refs)]

    def loss(x: torch.Tensor) -> torch.Tensor:
        records = differentiated.run(x, SIGMA, cond)
        ad = sum((r.out - t).abs().mean() for r, t in zip(records, targets))
        content_q = content_loss([r.image_part(r.q) for r in records], [c.image_part(c.q) for c in fixed])
        keys = 0.1 * (records[-1].k - fixed[-1].k).abs().mean()  # the last layer keeps its keys
        return ad + 0.3 * content_q + keys

    return loss


def _gradient(patcher, x0: torch.Tensor, checkpoint: bool, directions=()):
    from attention_distillation_pack.guidance.autograd import autograd_through

    dm = patcher.model.diffusion_model
    with torch.inference_mode():  # the executor's context: the node runs inside it
        loss = _objective(patcher, checkpoint)
        with autograd_through(dm):
            x = x0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x), [x])
            eps = 1e-6
            pairs = []
            for direction in directions:
                with torch.no_grad():
                    fd = (loss(x0 + eps * direction) - loss(x0 - eps * direction)) / (2 * eps)
                pairs.append((float(fd), float((grad * direction).sum())))
    assert all(p.is_inference() for p in dm.parameters() if p.device.type != "meta"), "weights were not restored"
    return grad, pairs


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_gradient_matches_finite_differences_with_lora(pack, checkpoint):
    import comfy.model_management as mm

    patcher = _lora_patched()
    assert next(patcher.model.diffusion_model.parameters()).is_inference()
    x0 = tz.latent(seed=7, batch=2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(9)
    random = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    grad, _ = _gradient(patcher, x0, checkpoint)
    _, pairs = _gradient(patcher, x0, checkpoint, directions=[grad / grad.norm(), random / random.norm()])
    for fd, analytic in pairs:
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (fd, analytic)
    assert float(grad.abs().sum()) > 0
    assert getattr(mm, "in_training", False) is False


def test_lowvram_loading_gives_the_model_gradient_checkpointed_or_not(pack):
    """Per-call weight casting with on-the-fly LoRA (ComfyUI's lowvram path): the gradient is the model's,
    checked against central differences, plain and checkpointed alike. It equals full loading's to 1e-4:
    v0.33 rounds a fully loaded LoRA's deltas through float32 and an on-the-fly one not (tests/
    test_flux_gradients.py measured the same on Flux)."""
    x0 = tz.latent(seed=7, dtype=torch.float64)
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    loaded, _ = _gradient(_lora_patched(), x0, checkpoint=False)
    lowvram = _lora_patched(lowvram=True)
    assert any(getattr(m, "weight_function", None) for m in lowvram.model.diffusion_model.modules())
    grads = []
    for checkpoint in (False, True):
        grad, pairs = _gradient(lowvram, x0, checkpoint, [direction / direction.norm()])
        for fd, analytic in pairs:
            assert abs(fd - analytic) <= 1e-6 * float(grad.norm()), pairs
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[0], loaded, rtol=1e-4, atol=1e-4 * float(loaded.abs().max()))


def test_fp8_stored_weights_differentiate_through_the_per_call_cast(pack):
    """fp8 weights cast to float32 per call: the gradient is a float32 model's holding the same rounded weights."""
    import zimage_literal as zl
    from attention_distillation_pack.guidance.autograd import autograd_through

    stored = zl.pack_model(stored=torch.float8_e4m3fn)
    assert next(stored.model.diffusion_model.parameters()).dtype == torch.float8_e4m3fn
    with torch.inference_mode():
        stored.patch_model(device_to=torch.device("cpu"))
        weights = {k: v.float() for k, v in stored.model.diffusion_model.state_dict().items()}
        stored.unpatch_model(device_to=torch.device("cpu"))
        plain = tz.build(weights=weights)
    grads = []
    for patcher in (stored, plain):
        from attention_distillation_pack.attention.layers import select_layers
        from attention_distillation_pack.attention.zimage import ZIMAGE

        base = patcher.model
        with torch.inference_mode():
            feature_pass = ZIMAGE.feature_pass(patcher, select_layers(base.diffusion_model, SPEC), checkpoint=True)
            cond = ZIMAGE.conditioning(base, tz.null_conditioning(), tz.latent(), torch.device("cpu"))
            with autograd_through(base.diffusion_model):
                x = tz.latent(seed=3).requires_grad_(True)
                loss = sum(r.out.abs().mean() for r in feature_pass.run(x, SIGMA, cond))
                (grad,) = torch.autograd.grad(loss, [x])
        grads.append(grad)
    assert float(grads[0].abs().sum()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
