"""ComfyUI v0.33's training switch (`comfy.model_management.in_training`) around the AD passes: comfy-kitchen's
RoPE kernels, active on the host, have no backward, so a backward through a Flux block fails without it; the
pack sets it for its AD passes only (the sampler's own passes keep the kernels) and restores it whatever
happens (attention/host_training.py)."""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf
from test_flux_guided import _pack_model, guided, sample


def _host_switch():
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        pytest.skip("this ComfyUI has no training switch (it arrived with comfy-kitchen's kernels, after v0.3.64)")
    return mm


class _SwitchProbe:
    """Records ComfyUI's training switch and grad mode at every diffusion-model forward (a test double's
    forward pre-hook; the pack itself patches nothing)."""

    def __init__(self, module: torch.nn.Module) -> None:
        import comfy.model_management as mm

        self.seen: list[tuple[bool, bool]] = []
        self.handle = module.register_forward_pre_hook(lambda *_: self.seen.append((mm.in_training, torch.is_grad_enabled())))

    def close(self) -> None:
        self.handle.remove()


pytestmark = tf.requires_flux_host


def test_kitchen_kernels_are_active_and_have_no_backward_without_the_switch(pack):
    """Proves the host runs comfy-kitchen's RoPE: a plain backward through a Flux forward fails."""
    from attention_distillation_pack.guidance.autograd import autograd_through

    mm = _host_switch()
    with torch.inference_mode():
        patcher = tf.build("dev")
        dm = patcher.model.diffusion_model
        cond = tf.null_conditioning()
        with autograd_through(dm):
            assert mm.in_training is False
            x = tf.latent().requires_grad_(True)
            out = dm(x, torch.tensor([0.5]), cond[0][0], y=cond[0][1]["pooled_output"], guidance=torch.ones(1))
            with pytest.raises(RuntimeError, match="no autograd formula"):
                out.sum().backward()


@pytest.mark.parametrize("before", [False, True])
def test_ad_passes_only_run_under_the_switch_and_restore_it(pack, before):
    """Guided sampling: every differentiated AD pass ran with the switch on, every sampler pass with it as the
    user had it, and it is as before afterwards."""
    mm = _host_switch()
    patcher = _pack_model("dev", lora=False)
    model, _ = guided(patcher)
    probe = _SwitchProbe(model.model.diffusion_model)
    mm.in_training = before
    try:
        sample(model, steps=3)
        after = mm.in_training
    finally:
        mm.in_training = False
        probe.close()
    assert after is before
    differentiated = [switch for switch, grad in probe.seen if grad]
    plain = [switch for switch, grad in probe.seen if not grad]
    assert differentiated and all(differentiated), probe.seen
    # the sampler's passes (no grad) see the user's value; the no-grad reference passes of the AD update see it on
    assert plain.count(before) >= 3, probe.seen


def test_switch_is_restored_when_cancel_interrupts_an_ad_pass(pack):
    mm = _host_switch()
    patcher = _pack_model("dev", lora=False)
    model, _ = guided(patcher)
    seen = []

    def cancel_inside_the_ad_pass(module, args):
        seen.append(mm.in_training)
        if mm.in_training and torch.is_grad_enabled():
            raise mm.InterruptProcessingException()  # what ComfyUI raises when the user presses Cancel

    handle = model.model.diffusion_model.register_forward_pre_hook(cancel_inside_the_ad_pass)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(model, steps=3)
    finally:
        handle.remove()
    assert True in seen and mm.in_training is False
