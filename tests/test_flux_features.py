"""Recorded Flux features equal a direct computation from the block's weights: q, k, v after
the q/k RMS norm and RoPE (written here from the token positions), text tokens first, and
out = SDPA(q, k, v); the pass feeds the model what ComfyUI's sampler feeds it at σ, with
guidance 1.0 whatever the null conditioning carries, and stops after the last selected block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tiny_flux as tf
from comfy_env import differentiable_kernels

pytestmark = tf.requires_flux_host
SIGMA = 0.6


def _rms(t: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Flux's own RMSNorm (up to v0.3.64): `scale`, eps 1e-6; ComfyUI's RMSNorm op (v0.33): torch's RMSNorm
    with `weight` and its `eps` (None: the dtype's machine epsilon)."""
    if hasattr(norm, "scale"):
        return t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * norm.scale
    eps = norm.eps if norm.eps is not None else torch.finfo(t.dtype).eps
    return t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps) * norm.weight


def _positions(text: int, hw: tuple[int, int], batch: int, dtype) -> torch.Tensor:
    """(B, T + L, 3) ids: text tokens at 0, image tokens at (0, row, column), row-major."""
    rows, cols = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(text, 3, dtype=torch.long), image]).to(dtype)
    return ids[None].expand(batch, -1, -1)


def _rotate(t: torch.Tensor, ids: torch.Tensor, axes_dim: list[int], theta: float) -> torch.Tensor:
    """Rotary embedding: channel pairs (2i, 2i+1) of axis a turn by pos_a · theta^(-2i/d_a)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis, None].double() * freqs)
    angle = torch.cat(angles, dim=-1)[:, None]  # (B, 1, N, d/2)
    even, odd = t[..., 0::2].double(), t[..., 1::2].double()
    out = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    return out.flatten(-2).to(t.dtype)


def _modulated(hidden: torch.Tensor, lin: torch.nn.Module, vec: torch.Tensor, chunks: int) -> tuple:
    mod = F.linear(F.silu(vec[:, None]), lin.weight, lin.bias).chunk(chunks, dim=-1)
    shift, scale, gate = mod[:3]
    return F.layer_norm(hidden, hidden.shape[-1:], eps=1e-6) * (1 + scale) + shift, gate


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


@torch.no_grad()
def _stream_qkv(hidden, mod_lin, attn, vec, heads):
    """q, k, v of one stream of a double block, normed, before RoPE."""
    h, _ = _modulated(hidden, mod_lin, vec, 6)
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    norm = attn.norm
    return _rms(_heads(q, heads), norm.query_norm), _rms(_heads(k, heads), norm.key_norm), _heads(v, heads)


@torch.no_grad()
def _direct(block, kind: str, inputs: dict, ids: torch.Tensor) -> dict:
    heads = int(block.num_heads)
    axes, theta = tf.TINY["axes_dim"], tf.TINY["theta"]
    vec = inputs["vec"]
    if kind == "single_block":
        x = inputs["img"]
        h, _ = _modulated(x, block.modulation.lin, vec, 3)
        qkv = F.linear(h, block.linear1.weight, block.linear1.bias)[..., : 3 * x.shape[-1]]
        q, k, v = qkv.chunk(3, dim=-1)
        q = _rms(_heads(q, heads), block.norm.query_norm)
        k = _rms(_heads(k, heads), block.norm.key_norm)
        v = _heads(v, heads)
    else:
        tq, tk, tv = _stream_qkv(inputs["txt"], block.txt_mod.lin, block.txt_attn, vec, heads)
        iq, ik, iv = _stream_qkv(inputs["img"], block.img_mod.lin, block.img_attn, vec, heads)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
    q, k = _rotate(q, ids, axes, theta), _rotate(k, ids, axes, theta)
    return {"q": q, "k": k, "v": v, "out": F.scaled_dot_product_attention(q, k, v)}


@differentiable_kernels()
def _capture_inputs(base, x, conditioning, guidance: float):
    """Block inputs of a plain forward through ComfyUI's `apply_model` at σ (the sampler's call)."""
    captured = {}

    def capture(key):
        def replace(args, extra):
            captured[key] = {name: value.clone() for name, value in args.items() if torch.is_tensor(value)}
            return extra["original_block"](args)
        return replace

    keys = [("double_block", i) for i in range(2)] + [("single_block", j) for j in range(3)]
    options = {"patches_replace": {"dit": {key: capture(key) for key in keys}}}
    with torch.no_grad():
        base.apply_model(
            x, torch.full((x.shape[0],), SIGMA, dtype=x.dtype), c_crossattn=conditioning[0][0].expand(x.shape[0], -1, -1),
            y=conditioning[0][1]["pooled_output"].expand(x.shape[0], -1), guidance=torch.tensor([guidance]),
            transformer_options=options,
        )
    return captured


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_recorded_features_equal_the_direct_computation(pack, kind):
    from attention_distillation_pack.attention import flux_family as ff
    from attention_distillation_pack.attention.layers import select_layers

    with torch.inference_mode():
        patcher = tf.build(kind, dtype=torch.float64)
        base = patcher.model
        conditioning = tf.null_conditioning(dtype=torch.float64, guidance=7.0)
        x = tf.latent(batch=2, dtype=torch.float64)
        layers = select_layers(base.diffusion_model, "0,1,3,4")
        records = ff.FluxFeaturePass(base, layers).run(x, *tf.pass_inputs(base, x, SIGMA, conditioning))
        inputs = _capture_inputs(base, x, conditioning, guidance=1.0)
    ids = _positions(tf.TEXT_TOKENS, (4, 3), 2, torch.float64)
    blocks = {"double_block": base.diffusion_model.double_blocks, "single_block": base.diffusion_model.single_blocks}
    for layer, record in zip(layers, records, strict=True):
        kind_, number = layer.patch_key
        expected = _direct(blocks[kind_][number], kind_, inputs[layer.patch_key], ids)
        assert record.q.shape == (2, 4, tf.TEXT_TOKENS + 12, 16)
        assert record.hw == (4, 3) and record.text_tokens == tf.TEXT_TOKENS
        # ComfyUI rotates q and k in float32 (its RoPE tables are float32), v is untouched
        for name, tolerance in (("q", 1e-6), ("k", 1e-6), ("v", 1e-12), ("out", 1e-6)):
            error = (getattr(record, name) - expected[name]).abs().max() / expected[name].abs().max()
            assert error < tolerance, (layer.patch_key, name, float(error))
    # text first: the text rows of a double block's q are the text stream's own queries
    text_q, *_ = _stream_qkv(inputs[("double_block", 0)]["txt"], blocks["double_block"][0].txt_mod.lin,
                             blocks["double_block"][0].txt_attn, inputs[("double_block", 0)]["vec"], 4)
    text_rows = _rotate(text_q, ids[:, : tf.TEXT_TOKENS], tf.TINY["axes_dim"], 10000)
    torch.testing.assert_close(records[0].q[:, :, : tf.TEXT_TOKENS], text_rows, rtol=1e-6, atol=1e-6)


def test_guidance_is_one_whatever_the_null_conditioning_carries(pack):
    """FLUX.1-dev embeds guidance: features at the conditioning's 3.5 would differ."""
    from attention_distillation_pack.attention import flux_family as ff
    from attention_distillation_pack.attention.layers import select_layers

    with torch.inference_mode():
        base = tf.build("dev", dtype=torch.float64).model
        x = tf.latent(dtype=torch.float64)
        feature_pass = ff.FluxFeaturePass(base, select_layers(base.diffusion_model, "4"))
        runs = {}
        for guidance in (None, 3.5, 1.0):
            conditioning = tf.null_conditioning(guidance=guidance, dtype=torch.float64)
            runs[guidance] = feature_pass.run(x, *tf.pass_inputs(base, x, SIGMA, conditioning))[0].q
        at_35 = _capture_inputs(base, x, conditioning, guidance=3.5)[("single_block", 2)]
        at_1 = _capture_inputs(base, x, conditioning, guidance=1.0)[("single_block", 2)]
    assert torch.equal(runs[None], runs[3.5]) and torch.equal(runs[None], runs[1.0])
    assert not torch.allclose(at_35["vec"], at_1["vec"])


def test_forward_stops_after_the_last_selected_block(pack):
    """Blocks after the last selected one never run, and neither does the final layer."""
    from attention_distillation_pack.attention import flux_family as ff
    from attention_distillation_pack.attention.layers import select_layers

    calls = []

    def later_block(args, extra):
        calls.append("single_block 2")
        return extra["original_block"](args)

    with torch.inference_mode():
        patcher = tf.build("dev")
        patcher.set_model_patch_replace(later_block, "dit", "single_block", 2)
        base = patcher.model
        final = base.diffusion_model.final_layer
        handle = final.register_forward_hook(lambda *a: calls.append("final_layer"))
        try:
            options = patcher.model_options["transformer_options"]
            inputs = tf.pass_inputs(base, tf.latent(), SIGMA)
            layers = select_layers(base.diffusion_model, "0,3")
            ff.FluxFeaturePass(base, layers, transformer_options=options).run(tf.latent(), *inputs)
            assert calls == []
            ff.FluxFeaturePass(base, layers, stop_early=False, transformer_options=options).run(tf.latent(), *inputs)
            assert calls == ["single_block 2", "final_layer"]
        finally:
            handle.remove()


def test_conditioning_is_batched_and_bad_conditioning_gets_clear_errors(pack):
    from attention_distillation_pack.attention import flux_family as ff
    import tiny_models as tm

    with torch.inference_mode():
        dev, schnell = tf.build("dev").model, tf.build("schnell").model
    x = tf.latent(batch=3)
    cond = ff.flux_conditioning(dev, tf.null_conditioning(guidance=3.5), x, torch.device("cpu"))
    assert cond["context"].shape == (3, tf.TEXT_TOKENS, 32) and cond["y"].shape == (3, 24)
    assert torch.equal(cond["guidance"], torch.ones(3))
    assert "guidance" not in ff.flux_conditioning(schnell, tf.null_conditioning(), x, torch.device("cpu"))
    assert ff.feature_time(dev.model_sampling, 0.25) == (0.25, 0.25)
    assert ff.feature_time(schnell.model_sampling, 0.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no pooled output"):
        ff.flux_conditioning(dev, [[torch.zeros(1, 4, 32), {}]], x, torch.device("cpu"))
    with pytest.raises(ValueError, match="empty"):
        ff.flux_conditioning(dev, [], x, torch.device("cpu"))
    sd_text = [[tm.conditioning("sdxl")[0][0], {"pooled_output": torch.zeros(1, 1280)}]]
    assert "encode it with a Flux CLIP" in ff.flux_conditioning_mismatch(dev, sd_text)
    assert ff.flux_conditioning_mismatch(dev, tf.null_conditioning()) is None
    assert ff.null_text_tokenizer_options() == {"t5xxl_min_length": 512}
