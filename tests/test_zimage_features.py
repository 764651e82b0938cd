"""What a Z-Image AD pass records equals ComfyUI's own forward read directly (docs/DESIGN.md §2.8): q, k
(after the q/k RMSNorm and RoPE), v and the attention output before `out` of the selected main layers;
query rows = the real caption and image rows, keys and values = every token, pads included; time
`timestep(σ)` = σ; the MODEL's rope options and attention override apply, ControlNet patches do not; the
forward stops after the last selected layer; ComfyUI's training switch is set only during the pass."""

from __future__ import annotations

import pytest
import torch
import tiny_zimage as tz
import zimage_literal as zl

pytestmark = tz.requires_zimage_host
SPEC = "0,2"


@pytest.fixture(scope="module")
def zimage():
    return zl.pack_model()


def _pass(patcher, spec: str = SPEC, checkpoint: bool = False, stop_early: bool = True):
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.attention.zimage import ZIMAGE

    layers = select_layers(patcher.model.diffusion_model, spec)
    return ZIMAGE.feature_pass(patcher, layers, stop_early=stop_early, checkpoint=checkpoint)


def _run(patcher, x: torch.Tensor, sigma: float, spec: str = SPEC, null: list | None = None, **kwargs):
    from attention_distillation_pack.attention.zimage import ZIMAGE
    from attention_distillation_pack.guidance.autograd import autograd_through

    base = patcher.model
    null = null if null is not None else tz.null_conditioning()
    with torch.inference_mode():
        feature_pass = _pass(patcher, spec, **kwargs)
        time, _ = ZIMAGE.feature_time(base.model_sampling, sigma)
        cond = ZIMAGE.conditioning(base, null, x, torch.device("cpu"))
        with autograd_through(base.diffusion_model), torch.no_grad():
            return feature_pass.run(x, time, cond)


def _direct(patcher, x: torch.Tensor, sigma: float, layers=(0, 2), null: list | None = None, options=None):
    base = zl.literal_model(patcher)
    null = null if null is not None else tz.null_conditioning()
    with torch.no_grad():
        return zl.features(base.diffusion_model, x, sigma, null[0][0], layers, options=options)


@pytest.mark.parametrize("shape,caption", [((1, 8, 6), 8), ((2, 8, 16), 8), ((1, 7, 5), 40), ((1, 8, 6), 32)],
                         ids=["image-and-caption-pads", "no-image-pads-batch-2", "odd-latent-long-caption",
                              "no-caption-pads"])
@pytest.mark.parametrize("sigma", [1.0, 0.37, 0.0])
def test_recorded_features_are_comfyuis_forward_read_directly(pack, zimage, shape, caption, sigma):
    batch, height, width = shape
    x = tz.latent(seed=3, batch=batch, height=height, width=width)
    null = tz.null_conditioning(tokens=caption)
    records = _run(zimage, x, sigma, null=null)
    direct = _direct(zimage, x, sigma, null=null)
    image = -(-height // 2) * -(-width // 2)
    for record, (q, k, v, out) in zip(records, direct, strict=True):
        assert record.q.shape == (batch, 4, caption + image, 64)
        assert record.k.shape == (batch, 4, tz.padded(caption) + tz.padded(image), 64)
        assert record.text_tokens == caption and record.hw == (-(-height // 2), -(-width // 2))
        assert record.keys_around_grid() == (tz.padded(caption), tz.padded(image) - image)
        torch.testing.assert_close(record.q, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.k, k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.v, v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.out, out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.image_part(record.q), q[:, :, caption:])


def test_time_is_sigma_not_the_networks_internal_time(pack, zimage):
    """The pass feeds `timestep(σ)` = σ; ComfyUI's NextDiT embeds 1 − σ itself. Fed 1 − σ, features differ."""
    x = tz.latent(seed=4)
    ours = _run(zimage, x, 0.2)
    assert torch.allclose(ours[0].out, _direct(zimage, x, 0.2)[0][3], atol=1e-6)
    assert not torch.allclose(ours[0].out, _direct(zimage, x, 0.8)[0][3], atol=1e-3)


def test_the_reference_attends_to_itself_exactly(pack, zimage):
    """AD(style, style) = 0: a layer's output rows are the attention of its query rows over all its keys
    and values, pads included (dropping the pad keys breaks this)."""
    import torch.nn.functional as F

    for record in _run(zimage, tz.latent(seed=5), 0.6):
        target = F.scaled_dot_product_attention(record.q, record.k, record.v)
        torch.testing.assert_close(record.out, target, rtol=1e-5, atol=1e-6)
        before, after = record.keys_around_grid()
        real_keys = torch.cat([record.k[:, :, : record.text_tokens], record.k[:, :, before : before + 12]], dim=2)
        real_values = torch.cat([record.v[:, :, : record.text_tokens], record.v[:, :, before : before + 12]], dim=2)
        assert after > 0
        assert float((F.scaled_dot_product_attention(record.q, real_keys, real_values) - record.out).abs().max()) > 1e-3


def test_the_forward_stops_after_the_last_selected_attention(pack, zimage):
    """Selecting main layers 0-1 runs nothing after layer 1's attention: not its feed-forward, not layer 2,
    not the final layer; `stop_early=False` runs the other main layers and records the same features."""
    dm = zimage.model.diffusion_model
    calls: list[str] = []
    hooks = [dm.layers[1].feed_forward.register_forward_hook(lambda *a: calls.append("ffn1")),
             dm.layers[2].register_forward_hook(lambda *a: calls.append("layer2")),
             dm.final_layer.register_forward_hook(lambda *a: calls.append("final"))]
    try:
        stopped = _run(zimage, tz.latent(), 0.5, spec="0-1")
        assert calls == []
        full = _run(zimage, tz.latent(), 0.5, spec="0-1", stop_early=False)
        assert calls == ["ffn1", "layer2"]
    finally:
        for hook in hooks:
            hook.remove()
    for a, b in zip(stopped, full, strict=True):
        assert torch.equal(a.out, b.out) and torch.equal(a.k, b.k)


def test_model_options_apply_controlnet_patches_do_not(pack, zimage):
    """The MODEL's rope options and its attention override run inside AD passes (the override on every
    attention call, with SDPA as its function); a Z-Image ControlNet's double_block / noise_refiner patches
    never run; the MODEL's options are not modified."""
    model = zimage.clone()
    model.set_model_rope_options(1.0, 3.0, 1.0, 2.0, 1.0, 0.0)
    seen = []

    def override(func, *args, **kwargs):
        seen.append(func.__name__)
        return func(*args, **kwargs)

    model.model_options["transformer_options"]["optimized_attention_override"] = override
    patched = []
    model.set_model_double_block_patch(lambda args: patched.append("double") or {"img": args["img"] * 2})
    model.set_model_noise_refiner_patch(lambda args: patched.append("refiner") or {"img": args["img"] * 2})
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in model.model_options["transformer_options"].items()}
    x = tz.latent(seed=6)
    records = _run(model, x, 0.5)
    rope = {"rope_options": model.model_options["transformer_options"]["rope_options"]}
    direct = _direct(zimage, x, 0.5, options=rope)
    assert seen == ["attention_pytorch"] * (4 + 3)  # refiners, then main layers 0, 1, 2
    assert patched == []
    assert model.model_options["transformer_options"] == before
    for record, (q, k, v, out) in zip(records, direct, strict=True):
        torch.testing.assert_close(record.q, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.out, out, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(records[0].q, _direct(zimage, x, 0.5)[0][0], atol=1e-3), "rope options change q"


def test_the_training_switch_is_set_during_the_pass_only(pack, zimage):
    """comfy-kitchen's fused RMSNorm/RoPE kernels have no backward: the pass runs under ComfyUI's
    `in_training`, restored afterwards, also when the pass fails."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        pytest.skip("this ComfyUI has no training switch")
    model = zimage.clone()
    during = []

    def override(func, *args, **kwargs):
        during.append(mm.in_training)
        if len(during) == 6:
            raise KeyError("boom")
        return func(*args, **kwargs)

    model.model_options["transformer_options"]["optimized_attention_override"] = override
    assert mm.in_training is False
    with pytest.raises(KeyError, match="boom"):
        _run(model, tz.latent(), 0.5)
    assert during and all(during)
    assert mm.in_training is False


def test_checkpointed_differentiated_pass_records_the_same_rows(pack, zimage):
    from attention_distillation_pack.attention.zimage import ZIMAGE
    from attention_distillation_pack.guidance.autograd import autograd_through

    base = zimage.model
    x0 = tz.latent(seed=8, batch=2)
    outs = []
    with torch.inference_mode():
        cond = ZIMAGE.conditioning(base, tz.null_conditioning(), x0, torch.device("cpu"))
        for checkpoint in (False, True):
            with autograd_through(base.diffusion_model):
                x = x0.clone().requires_grad_(True)
                records = _pass(zimage, "0-2", checkpoint=checkpoint).run(x, 0.5, cond)
                loss = sum(r.out.abs().mean() + r.q.abs().mean() for r in records)
                (grad,) = torch.autograd.grad(loss, [x])
                outs.append(([r.q.detach() for r in records], [r.out.detach() for r in records], grad,
                             [r.k is None for r in records]))
    (q0, o0, g0, _), (q1, o1, g1, none1) = outs
    assert none1 == [True, True, False]  # a checkpointed layer returns what the losses read
    for a, b in zip(q0 + o0, q1 + o1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-8)


def test_checkpointing_and_stopping_early_bound_the_memory_of_a_differentiated_pass(pack):
    """Six main layers, 16×16 latent: with block checkpointing a differentiated pass to the last layer keeps
    each earlier layer's input only; stopping after layer 1 keeps nothing of the later layers."""
    from memory_meter import peak_bytes
    from attention_distillation_pack.attention.zimage import ZIMAGE
    from attention_distillation_pack.guidance.autograd import autograd_through

    deep = zl.pack_model(n_layers=6)
    base = deep.model
    x0 = tz.latent(seed=9, height=16, width=16)

    def measure(spec: str, checkpoint: bool) -> int:
        with torch.inference_mode():
            feature_pass = _pass(deep, spec, checkpoint=checkpoint)
            cond = ZIMAGE.conditioning(base, tz.null_conditioning(), x0, torch.device("cpu"))
            with autograd_through(base.diffusion_model):
                x = x0.clone().requires_grad_(True)

                def step() -> None:
                    records = feature_pass.run(x, 0.5, cond)
                    torch.autograd.grad(sum(r.out.abs().mean() for r in records), [x])

                return peak_bytes(step)

    plain, checkpointed, early = measure("5", False), measure("5", True), measure("1", False)
    print(f"peak tensor memory: plain {plain} B, checkpointed {checkpointed} B, stopped after layer 1 {early} B")
    assert checkpointed < 0.6 * plain, (plain, checkpointed)
    assert early < 0.5 * plain, (plain, early)
