"""Other nodes' attention patches in Flux AD passes (docs/DESIGN.md §3, "Attention backends and other packs'
attention patches"). Since v0.33 ComfyUI's Flux blocks run `attn1_patch` / `attn1_output_patch` and the
model runs ScaleROPE's `rope_options` in every forward. They shape the network the sampler runs, so they
are in the AD passes, and the reference pass and the optimized latent's pass compute the same way:

- each (and another pack's override that changes the attention math) changes the AD features, exactly as a
  direct forward with the same options computes them, in the reference pass, the differentiated pass and
  its checkpointed recomputation; a sampler-only patch (NAG, which needs the sampler's cond/uncond batch)
  leaves them as they are;
- reference features cached under other options are not reused;
- ScaleROPE before or after AD Loss Guidance gives the same run, and a re-run reuses the cached features.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
import tiny_flux as tf
from ad_helpers import capture
from attention_doubles import scaling_override
from comfy_env import differentiable_kernels

SIGMA = 0.6


def _flux_runs_patches() -> bool:
    if tf.HOST_REASON is not None:
        return False
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.model as model

    return ("attn1_patch" in inspect.getsource(layers.SingleStreamBlock.forward)
            and "rope_options" in inspect.getsource(model.Flux.process_img))


pytestmark = [tf.requires_flux_host, pytest.mark.skipif(
    not _flux_runs_patches(), reason="ComfyUI's Flux runs attn1 patches and rope_options since v0.33")]


def _scale_rope(model):
    from comfy_extras.nodes_rope import ScaleROPE

    with torch.inference_mode():
        return ScaleROPE.execute(model, 2.0, 0.5, 1.5, -1.0, 1.0, 0.0).args[0]


def _nag(model):
    from comfy_extras.nodes_nag import NAGuidance

    with torch.inference_mode():
        return NAGuidance.execute(model, 5.0, 0.5, 1.5).args[0]


def _attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    return {"v": v * 1.5, "k": k.flip(-1)}


def _attn1_output_patch(out, extra_options):
    return out * 0.8 + 0.1


def _with(model, kind: str):
    if kind == "ScaleROPE":
        return _scale_rope(model)
    if kind == "NAG":
        return _nag(model)
    patched = model.clone()
    if kind == "attn1_patch":
        patched.set_model_attn1_patch(_attn1_patch)
    elif kind == "attn1_output_patch":
        patched.set_model_attn1_output_patch(_attn1_output_patch)
    else:
        patched.model_options["transformer_options"]["optimized_attention_override"] = scaling_override(0.7)
    return patched


@pytest.fixture(scope="module")
def flux():
    with torch.inference_mode():
        return tf.build("dev")


@pytest.fixture(scope="module")
def null():
    return tf.null_conditioning(guidance=3.5)


def _reference(flux, null):
    return capture(flux, tf.latent(seed=21), null)


def _passes(patcher, reference, checkpoint: bool = True, offset: float = 0.0):
    """Reference keys/values at σ, then the differentiated pass of the same noised reference plus `offset`
    (its AD loss against the reference features) and the gradient of that loss to the latent."""
    from attention_distillation_pack.attention.session import ADModelSession
    from attention_distillation_pack.guidance.autograd import autograd_through
    from attention_distillation_pack.guidance.losses import ad_loss

    noise = tf.latent(seed=5)
    with torch.inference_mode():
        session = ADModelSession(patcher, reference, gradient_checkpointing=checkpoint)
        time, _ = session.family.feature_time(patcher.model.model_sampling, SIGMA)
        with autograd_through(patcher.model.diffusion_model):
            kv = session.reference_kv(time, noise, SIGMA)
            x = session.family.noised(session.reference_latent + offset, noise, SIGMA).detach().requires_grad_(True)
            records = session.features(x, time)
            loss = ad_loss([r.q for r in records], [r.out for r in records], [r.k for r in kv], [r.v for r in kv])
            loss.backward()
    return kv, records, float(loss.detach()), x.grad.clone(), time, x.detach()


def _literal_kv(patcher, x: torch.Tensor, time: float, null: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k, v) of every attention call of a direct forward under the MODEL's own options, read where the
    kernel is called (behind the MODEL's override, if any)."""
    records = []

    def kernel(q, k, v, heads, **kwargs):
        records.append((k, v))
        b, h, n, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)

    options = dict(patcher.model_options["transformer_options"])
    previous = options.get("optimized_attention_override")
    options["optimized_attention_override"] = (
        (lambda func, *a, **kw: previous(kernel, *a, **kw)) if previous else (lambda func, *a, **kw: kernel(*a, **kw)))
    context, pooled = null[0][0], null[0][1]["pooled_output"]
    with torch.inference_mode(), differentiable_kernels():
        patcher.model.diffusion_model(x, torch.full((1,), time), context, y=pooled, guidance=torch.ones(1),
                                      transformer_options=options)
    return records


@pytest.mark.parametrize("kind", ["ScaleROPE", "attn1_patch", "attn1_output_patch", "another pack's override"])
def test_each_patch_shapes_both_ad_passes_as_a_direct_forward(pack, flux, null, kind):
    patched = _with(flux, kind)
    kv, records, loss, _, time, x = _passes(patched, _reference(flux, null))
    plain_kv, *_ = _passes(flux, _reference(flux, null))
    # in the AD passes: the features differ from the plain model's ...
    assert max(float((a.k - b.k).abs().max()) for a, b in zip(kv, plain_kv)) > 1e-3
    # ... exactly as a direct forward under the same options computes them
    literal = _literal_kv(patched, x, time, null)[-len(kv):]
    for ours, (k, v) in zip(kv, literal, strict=True):
        torch.testing.assert_close(ours.k, k)
        torch.testing.assert_close(ours.v, v)
    # the reference pass and the latent's pass compute the same way: the same input scores 0
    assert loss < 1e-6
    for ours, reference in zip(records, kv, strict=True):
        torch.testing.assert_close(ours.k, reference.k)
    # the checkpointed recomputation in the backward runs the patch too: the gradient of another latent
    # is that of the pass kept whole
    _, _, _, grad_checkpointed, *_ = _passes(patched, _reference(flux, null), checkpoint=True, offset=0.3)
    _, _, _, grad_whole, *_ = _passes(patched, _reference(flux, null), checkpoint=False, offset=0.3)
    assert grad_checkpointed.abs().sum() > 0
    torch.testing.assert_close(grad_checkpointed, grad_whole)


def test_a_sampler_only_patch_leaves_the_ad_features(pack, flux, null):
    kv, *_ = _passes(_with(flux, "NAG"), _reference(flux, null))
    plain_kv, *_ = _passes(flux, _reference(flux, null))
    for ours, plain in zip(kv, plain_kv, strict=True):
        torch.testing.assert_close(ours.k, plain.k, rtol=0, atol=0)


def test_reference_features_cached_under_other_options_are_not_reused(pack, flux, null):
    reference = _reference(flux, null)
    plain_kv, *_ = _passes(flux, reference)
    scaled = _scale_rope(flux)
    reused_kv, *_ = _passes(scaled, reference)  # the same AD_REFERENCE, its cache holding the plain features
    fresh_kv, *_ = _passes(scaled, _reference(flux, null))
    for reused, fresh, plain in zip(reused_kv, fresh_kv, plain_kv, strict=True):
        torch.testing.assert_close(reused.k, fresh.k, rtol=0, atol=0)
        assert float((reused.k - plain.k).abs().max()) > 1e-3


def _guided(model, reference):
    from attention_distillation_pack.nodes.guidance import ADLossGuidance

    with torch.inference_mode():
        return ADLossGuidance().patch(model, reference, 0.01, 2, True, 0.0, 1.0, 3)[0]


def _sample(model) -> torch.Tensor:
    import comfy.sample

    noise = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", tf.null_conditioning(seed=5),
                                   tf.null_conditioning(seed=6), torch.zeros_like(noise), seed=0, disable_pbar=True)


def test_scale_rope_before_or_after_the_guidance_gives_the_same_run(pack, flux, null):
    reference = capture(flux, tf.latent(seed=21, height=6, width=8), null)
    before = _sample(_guided(_scale_rope(flux), reference))
    after = _sample(_scale_rope(_guided(flux, reference)))
    assert torch.equal(before, after)
    assert float((before - _sample(_scale_rope(flux))).abs().max()) > 1e-3  # the guidance acted


def test_a_rerun_under_the_same_options_reuses_the_cached_features(pack, flux, null):
    reference = capture(flux, tf.latent(seed=21, height=6, width=8), null)
    model = _scale_rope(_guided(flux, reference))
    model.model_options["transformer_options"]["optimized_attention_override"] = scaling_override(0.7)
    first = _sample(model)
    misses = reference.cache.misses
    assert misses > 0 and reference.cache.hits == 0
    assert torch.equal(_sample(model), first)
    assert reference.cache.misses == misses and reference.cache.hits == misses
