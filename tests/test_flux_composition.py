"""A Flux AD pass leaves the MODEL as it was (plain sampling bit-identical before and after,
its options untouched, also when the pass fails midway) and composes with what is already
on it: an existing dit replace patch and attention override run inside the AD pass and
keep running in plain sampling afterwards."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf

pytestmark = tf.requires_flux_host
SIGMA = 0.7


def _sample(patcher) -> torch.Tensor:
    import comfy.sample

    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 16, 8, 6, generator=generator)
    positive = tf.null_conditioning(seed=5, guidance=3.5)
    negative = tf.null_conditioning(seed=6, guidance=3.5)
    return comfy.sample.sample(patcher, noise, 3, 1.0, "euler", "simple", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def _ad_pass_with_backward(patcher, checkpoint: bool = True) -> list:
    """What an AD update does: a reference pass, then a differentiated, checkpointed pass."""
    from attention_distillation_pack.attention import flux_family as ff
    from attention_distillation_pack.attention.layers import select_layers
    from attention_distillation_pack.guidance.autograd import autograd_through
    from attention_distillation_pack.guidance.losses import ad_loss

    base = patcher.model
    layers = select_layers(base.diffusion_model, "paper default")
    options = patcher.model_options["transformer_options"]
    time, cond = tf.pass_inputs(base, tf.latent(), SIGMA)
    with autograd_through(base.diffusion_model):
        with torch.no_grad():
            refs = ff.FluxFeaturePass(base, layers, transformer_options=options).run(tf.latent(seed=3), time, cond)
        x = tf.latent(seed=4).requires_grad_(True)
        records = ff.FluxFeaturePass(base, layers, checkpoint=checkpoint, transformer_options=options).run(x, time, cond)
        loss = ad_loss([r.q for r in records], [r.out for r in records], [r.k for r in refs], [r.v for r in refs])
        loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    return records


class _Counters:
    def __init__(self) -> None:
        self.replace = 0
        self.override: list[str] = []

    def dit_replace(self, args: dict, extra: dict) -> dict:
        self.replace += 1
        return extra["original_block"](args)

    def attention_override(self, func, *args, **kwargs):
        self.override.append(func.__name__)
        return func(*args, **kwargs)


def _patched(counters: _Counters | None = None):
    with torch.inference_mode():
        patcher = tf.build("dev")
    if counters is not None:
        patcher.set_model_patch_replace(counters.dit_replace, "dit", "single_block", 1)
        patcher.model_options["transformer_options"]["optimized_attention_override"] = counters.attention_override
    return patcher


def test_plain_sampling_is_bit_identical_after_an_ad_pass(pack):
    patcher = _patched(_Counters())
    options = patcher.model_options["transformer_options"]
    options_before = {key: id(value) for key, value in options.items()}
    replaces_before = {key: id(value) for key, value in options["patches_replace"].items()}
    dit_before = dict(options["patches_replace"]["dit"])
    with torch.inference_mode():
        before = _sample(patcher)
        _ad_pass_with_backward(patcher)
        after = _sample(patcher)
    assert torch.equal(before, after)
    assert {key: id(value) for key, value in options.items()} == options_before
    assert {key: id(value) for key, value in options["patches_replace"].items()} == replaces_before
    assert options["patches_replace"]["dit"] == dit_before
    assert all(p.is_inference() for p in patcher.model.diffusion_model.parameters())


def test_existing_dit_replace_and_attention_override_run_inside_and_after(pack):
    counters = _Counters()
    patcher = _patched(counters)
    with torch.inference_mode():
        records = _ad_pass_with_backward(patcher)
        # reference pass, differentiated pass and its checkpointed recomputation: single block 1
        # (AD layer 3) runs in all three; each block's attention is SDPA under the existing override
        assert counters.replace == 3
        assert set(counters.override) == {"attention_pytorch"}
        counters.replace, counters.override = 0, []
        _sample(patcher)
    import comfy.ldm.modules.attention as attention

    assert counters.replace == 3  # one model call per euler step (cfg 1)
    # five blocks per call, each with the host's own attention again
    assert len(counters.override) == 3 * 5
    assert set(counters.override) == {attention.optimized_attention.__name__}
    # composing did not change what AD reads: a pass-through override and replace leave the features
    with torch.inference_mode():
        bare = _ad_pass_with_backward(_patched())
    for composed, plain in zip(records, bare, strict=True):
        torch.testing.assert_close(composed.out, plain.out, rtol=0, atol=0)


def test_a_failing_pass_leaves_nothing_behind(pack):
    patcher = _patched()

    def failing(args: dict, extra: dict) -> dict:
        raise KeyboardInterrupt  # what a Cancel looks like from inside a forward

    with torch.inference_mode():
        before = _sample(patcher)
        broken = patcher.clone()
        broken.set_model_patch_replace(failing, "dit", "single_block", 0)
        with pytest.raises(KeyboardInterrupt):
            _ad_pass_with_backward(broken)
        after = _sample(patcher)
    assert torch.equal(before, after)
    assert "patches_replace" not in patcher.model_options["transformer_options"]
