"""Recorded Qwen-Image features equal a direct computation (docs/DESIGN.md §2.8): block 0's q, k written
from its weights (RMS norms, then RoPE of the centred image grid and the size-dependent text positions),
v unnormed and unrotated, text rows first, out = SDPA(q, k, v) before the output projections; the
selected blocks equal ComfyUI's own override capture on a whole forward at the network time; the pass
stops after the last selected block, chains the MODEL's own attention override in every block it runs,
and runs under the training switch with the non-differentiable backend replaced by SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import qwen_literal as ql
import tiny_qwen_image as tq

pytestmark = tq.requires_qwen_host
SIGMA = 0.6


def _session_pass(patcher, layers: str, **kwargs):
    from attention_distillation_pack.attention.families import family_of
    from attention_distillation_pack.attention.layers import select_layers

    family = family_of(patcher.model)
    return family, family.feature_pass(patcher, select_layers(patcher.model.diffusion_model, layers), **kwargs)


def _rms(t: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    eps = norm.eps if norm.eps is not None else torch.finfo(t.dtype).eps
    return t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps) * norm.weight


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


@torch.no_grad()
def _block0(dm, x: torch.Tensor, tau: float, context: torch.Tensor):
    """q, k, v of block 0, written from the weights."""
    block, attn = dm.transformer_blocks[0], dm.transformer_blocks[0].attn
    img = F.linear(ql.pack(x), dm.img_in.weight, dm.img_in.bias)
    txt = F.linear(_rms(context, dm.txt_norm), dm.txt_in.weight, dm.txt_in.bias)
    temb = dm.time_text_embed(torch.tensor([tau]), img)

    def modulated(hidden, mod):
        shift, scale, _ = mod(temb).chunk(2, dim=-1)[0].chunk(3, dim=-1)
        return F.layer_norm(hidden, hidden.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    img_m, txt_m = modulated(img, block.img_mod), modulated(txt, block.txt_mod)
    heads = attn.heads
    q = torch.cat([_rms(_heads(attn.add_q_proj(txt_m), heads), attn.norm_added_q), _rms(_heads(attn.to_q(img_m), heads), attn.norm_q)], 2)
    k = torch.cat([_rms(_heads(attn.add_k_proj(txt_m), heads), attn.norm_added_k), _rms(_heads(attn.to_k(img_m), heads), attn.norm_k)], 2)
    v = torch.cat([_heads(attn.add_v_proj(txt_m), heads), _heads(attn.to_v(img_m), heads)], 2)
    ids = ql.positions(context.shape[1], x.shape[-2] // 2, x.shape[-1] // 2)
    return ql.rotate(q, ids, tq.TINY["axes_dims_rope"]), ql.rotate(k, ids, tq.TINY["axes_dims_rope"]), v


def test_block_zero_features_equal_the_weights_computation(pack):
    with torch.inference_mode():
        patcher = tq.build()
    family, ad_pass = _session_pass(patcher, "0")
    x = tq.latent(height=8, width=6)
    null = tq.null_conditioning()
    time, _ = family.feature_time(patcher.model.model_sampling, SIGMA)
    assert abs(time - SIGMA) < 1e-7  # ModelSamplingFlux: τ = σ (float32)
    (record,) = ad_pass.run(x, time, family.conditioning(patcher.model, null, x, torch.device("cpu")))
    q, k, v = _block0(patcher.model.diffusion_model, x, SIGMA, null[0][0])
    assert record.q.shape == (1, 4, tq.TEXT_TOKENS + 12, 12) and record.text_tokens == tq.TEXT_TOKENS
    assert record.hw == (4, 3)
    torch.testing.assert_close(record.q, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.k, k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.v, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(record.out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert float((record.q[:, :, tq.TEXT_TOKENS:] - record.image_part(record.q)).abs().max()) == 0


def test_selected_blocks_equal_comfyui_override_capture_and_the_pass_stops(pack):
    calls: list[int] = []

    def model_override(func, *args, **kwargs):  # an override the MODEL carries: chained, never dropped
        calls.append(kwargs["transformer_options"]["block_index"])
        assert func.__name__ == "attention_pytorch"
        import comfy.model_management as mm

        assert mm.in_training
        return func(*args, **kwargs)

    with torch.inference_mode():
        patcher = tq.build().clone()
        patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = model_override
    family, ad_pass = _session_pass(patcher, "paper default")
    x = tq.latent(batch=2, height=6, width=8)
    null = tq.null_conditioning()
    records = ad_pass.run(x, SIGMA, family.conditioning(patcher.model, null, x, torch.device("cpu")))
    assert calls == list(range(9))  # every block up to the last selected one, then no more
    literal = ql.features(patcher.model.diffusion_model, x, SIGMA, null[0][0], last=2)
    assert len(records) == 2
    for record, (q, k, v, out) in zip(records, literal, strict=True):
        for ours, theirs in ((record.q, q), (record.k, k), (record.v, v), (record.out, out)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    calls.clear()
    _, early = _session_pass(patcher, "2")
    early.run(x, SIGMA, family.conditioning(patcher.model, null, x, torch.device("cpu")))
    assert calls == [0, 1, 2]
