"""Attention backends compose with AD (docs/DESIGN.md §3, "Attention backends and other packs' attention
patches"). With ComfyUI's ModelAttentionBackend node (either choice) or another pack's kernel switch on the
MODEL, wired before or after AD Loss Guidance, and into Latent AD Optimize:

- the sampler's own passes run the backend (every attention call of a plain run with it);
- the AD passes never call it: they compute SDPA and differentiate (the INT8 kernel has no backward);
- the results equal those without a backend, bit for bit (the doubles compute the host's default numbers);
- the input MODEL samples bit-identically afterwards.
"""

from __future__ import annotations

import pytest
import torch
import tiny_flux as tf
import tiny_models as tm
from ad_helpers import capture, optimize
from attention_doubles import (
    NODE_CHOICES,
    host_attention,
    KernelDouble,
    register_doubles,
    requires_backend_node,
    requires_override,
    with_backend,
)

CHOICES = [pytest.param(c, marks=requires_backend_node) for c in NODE_CHOICES] + ["another pack's kernel"]
ORDERS = ("backend, then guidance", "guidance, then backend")

pytestmark = [requires_override, pytest.mark.usefixtures("one_thread")]


class Family:
    """A tiny model of one family with what its runs need."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        with torch.inference_mode():
            self.model = tm.build("sd15", seed=0) if kind == "sd15" else tf.build("dev")
        if kind == "sd15":
            self.shape, self.lr, self.sampler, self.scheduler, self.cfg = (1, 4, 8, 6), 0.05, "ddim", "ddim_uniform", 5.0
            self.positive, self.negative = tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)
            null, ref_shape = tm.conditioning("sd15", seed=9), (1, 4, 8, 6)
        else:
            self.shape, self.lr, self.sampler, self.scheduler, self.cfg = (1, 16, 8, 6), 0.01, "euler", "simple", 1.0
            self.positive = tf.null_conditioning(seed=5, guidance=3.5)
            self.negative = tf.null_conditioning(seed=6, guidance=3.5)
            null, ref_shape = tf.null_conditioning(guidance=3.5), (1, 16, 6, 8)
        reference = 2.0 * torch.randn(ref_shape, generator=torch.Generator().manual_seed(21))
        self.reference = capture(self.model, reference, null)

    def sample(self, model) -> torch.Tensor:
        import comfy.sample

        latent = torch.zeros(self.shape)
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(11))
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, 2, self.cfg, self.sampler, self.scheduler, self.positive,
                                       self.negative, latent, seed=0, disable_pbar=True)

    def guided(self, model):
        from attention_distillation_pack.nodes.guidance import ADLossGuidance

        with torch.inference_mode():
            return ADLossGuidance().patch(model, self.reference, self.lr, 2, True, 0.0, 1.0, 3,
                                          gradient_checkpointing="on")[0]

    def optimized(self, model) -> torch.Tensor:
        content = torch.randn(self.shape, generator=torch.Generator().manual_seed(31))
        return optimize(model, self.reference, content, steps=2, lr=self.lr, iterations=2, weight=0.5,
                        gradient_checkpointing="on")


@pytest.fixture(scope="module", params=["sd15", pytest.param("flux", marks=tf.requires_flux_host)])
def family(request, pack):
    family = Family(request.param)
    family.plain = family.sample(family.model)
    family.guided_plain = family.sample(family.guided(family.model))
    family.optimized_plain = family.optimized(family.model)
    return family


@pytest.fixture
def kernels(monkeypatch) -> dict[str, KernelDouble]:
    return register_doubles(monkeypatch)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[bool]:
    """Calls of ComfyUI's SDPA kernel (`attention_pytorch`, what AD passes pick), True where differentiated."""
    attention = host_attention()
    original, calls = attention.attention_pytorch, []

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in args[:3]))
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_pytorch", counted)
    return calls


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("choice", CHOICES)
def test_guidance_keeps_the_backend_in_sampling_and_sdpa_in_ad(family, kernels, sdpa_calls, choice, order):
    kernel = kernels[choice]
    backend_only = with_backend(family.model, choice, kernels)
    assert torch.equal(family.sample(backend_only), family.plain)
    calls_per_run = kernel.calls["sampler"]
    assert calls_per_run > 0 and kernel.calls["ad"] == 0
    kernel.reset()

    if order == ORDERS[0]:
        model = family.guided(with_backend(family.model, choice, kernels))
    else:
        model = with_backend(family.guided(family.model), choice, kernels)
    out = family.sample(model)

    assert kernel.calls["sampler"] == calls_per_run  # every attention call of the sampler's passes
    if choice != "another pack's kernel" or family.kind == "sd15":
        assert kernel.calls["ad"] == 0  # a kernel choice never runs in an AD pass
    if family.kind == "flux":  # SD AD passes record with SDPA itself; Flux's other blocks call ComfyUI's SDPA
        assert any(sdpa_calls)
    assert not torch.equal(out, family.plain)  # the guidance acted
    assert torch.equal(out, family.guided_plain)
    assert torch.equal(family.sample(family.model), family.plain)  # the input MODEL is untouched


@pytest.mark.parametrize("choice", CHOICES)
def test_optimize_on_a_model_with_a_backend_is_the_plain_result(family, kernels, choice):
    model = with_backend(family.model, choice, kernels)
    assert torch.equal(family.optimized(model), family.optimized_plain)
    if choice != "another pack's kernel" or family.kind == "sd15":
        assert kernels[choice].calls == {"sampler": 0, "ad": 0}
    assert torch.equal(family.sample(model), family.plain)  # the backend still samples, as before
    assert kernels[choice].calls["sampler"] > 0
    assert torch.equal(family.sample(family.model), family.plain)


@requires_backend_node
@pytest.mark.parametrize("pass_kind", ["sd15", "flux"])
def test_tensor_containers_reach_the_pack_as_tensors(pack, kernels, pass_kind):
    """A model that hands attention `AttentionTensorContainer`s: the INT8 backend's `container_function`
    would take them; the pack's AD overrides carry none, so ComfyUI unwraps them and SDPA differentiates."""
    from attention_distillation_pack.attention.backends import backward_capable_attention
    from attention_distillation_pack.attention.flux_blocks import ADAttention, FluxPassState

    attention = host_attention()
    with torch.inference_mode():
        int8 = with_backend(tm.build("sd15"), "comfy kitchen attention", kernels)
    backend = int8.model_options["transformer_options"]["optimized_attention_override"]
    assert backend.container_function is not None
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=generator).requires_grad_(True) for _ in range(3))
    key = ("single_block", 0)
    state = FluxPassState(selected=(key,), hw=(1, 5), text_tokens=0, stop_early=False)
    override = backward_capable_attention if pass_kind == "sd15" else ADAttention(state, key, backend)
    containers = [attention.AttentionTensorContainer(t) for t in (q, k, v)]
    out = attention.optimized_attention(*containers, 2, skip_reshape=True,
                                        transformer_options={"optimized_attention_override": override})
    torch.testing.assert_close(out, attention.attention_pytorch(q, k, v, 2, skip_reshape=True), rtol=0, atol=0)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    assert kernels["comfy kitchen attention"].container_calls == 0
    assert kernels["comfy kitchen attention"].calls["ad"] == 0
    if pass_kind == "flux":
        assert state.records[key].q is q and state.records[key].k is k
