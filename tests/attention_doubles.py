"""Attention backends for the tests of tests/test_backends.py and tests/test_flux_patches.py: kernels in the
shape ComfyUI registers its own, what ComfyUI's ModelAttentionBackend node installs with them, and another
pack's overrides (a kernel of its own; a wrapper that changes what reaches the kernel)."""

from __future__ import annotations

import pytest
import torch


def host_attention():
    import comfy.ldm.modules.attention as attention

    return attention


def _backend_node():
    try:
        from comfy_extras.nodes_model_advanced import ModelAttentionBackend
    except Exception:  # the 2024 core has no comfy_extras of this kind
        return None
    return ModelAttentionBackend


HAS_OVERRIDE = hasattr(host_attention(), "wrap_attn")
requires_override = pytest.mark.skipif(
    not HAS_OVERRIDE, reason="this ComfyUI has no optimized_attention_override (added in v0.3.64)")
requires_backend_node = pytest.mark.skipif(
    _backend_node() is None or not hasattr(host_attention(), "AttentionTensorContainer"),
    reason="ModelAttentionBackend and AttentionTensorContainer are ComfyUI v0.33 core features")

NODE_CHOICES = ("pytorch attention", "comfy kitchen attention")
REGISTERED_NAME = {"pytorch attention": "pytorch", "comfy kitchen attention": "comfy_kitchen_int8"}


class _NoBackward(torch.autograd.Function):
    """What a kernel without an autograd formula gives a backward (comfy-kitchen's custom ops raise)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("Trying to backward through the INT8 attention double but no autograd formula was registered")


class KernelDouble:
    """An attention kernel registered the way ComfyUI registers its own (`wrap_attn`; the INT8 kernel with a
    `container_function` for `AttentionTensorContainer` inputs). It computes the host's default kernel's
    numbers, so a run through it equals a run without it bit for bit, and counts its calls in sampler
    passes (inference mode) and elsewhere (AD passes leave inference mode). `differentiable=False`: no
    backward, as comfy-kitchen's INT8 attention."""

    def __init__(self, differentiable: bool) -> None:
        attention = host_attention()
        self.differentiable = differentiable
        self.calls = {"sampler": 0, "ad": 0}
        self.container_calls = 0
        self.kernel = attention.wrap_attn(self._compute)
        if not differentiable:
            self.kernel.container_function = self._from_containers

    def _compute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **kwargs) -> torch.Tensor:
        self.calls["sampler" if torch.is_inference_mode_enabled() else "ad"] += 1
        kwargs["_inside_attn_wrapper"] = True  # the host's default kernel itself, not an override
        out = host_attention().optimized_attention(q, k, v, heads, **kwargs)
        return out if self.differentiable else _NoBackward.apply(out)

    def _from_containers(self, q, k, v, heads: int, **kwargs) -> torch.Tensor:
        self.container_calls += 1
        return self._compute(q.take(), k.take(), v.take(), heads, **kwargs)

    def reset(self) -> None:
        self.calls = {"sampler": 0, "ad": 0}
        self.container_calls = 0


def register_doubles(monkeypatch) -> dict[str, KernelDouble]:
    """Doubles registered under the names ModelAttentionBackend looks up, the INT8 choice made available
    (it is not on CPU), by node choice; and one for another pack's kernel switch."""
    attention = host_attention()
    doubles = {"pytorch attention": KernelDouble(True), "comfy kitchen attention": KernelDouble(False),
               "another pack's kernel": KernelDouble(False)}
    for choice, name in REGISTERED_NAME.items():
        monkeypatch.setitem(attention.REGISTERED_ATTENTION_FUNCTIONS, name, doubles[choice].kernel)
    monkeypatch.setattr(attention, "COMFY_KITCHEN_INT8_ATTENTION_IS_AVAILABLE", True, raising=False)
    return doubles


def with_backend(model, choice: str, kernels: dict[str, KernelDouble]):
    """`model` with `choice`: ComfyUI's ModelAttentionBackend node called as the executor calls it, or
    another pack's kernel switch shaped like the sage patches packs install (the kernel of its own,
    the attention function it is handed ignored)."""
    with torch.inference_mode():
        if choice == "another pack's kernel":
            kernel = kernels[choice].kernel

            def attention_override_kernel(func, *args, **kwargs):
                return kernel(*args, **kwargs)

            patched = model.clone()
            patched.model_options["transformer_options"]["optimized_attention_override"] = attention_override_kernel
            return patched
        node_class = _backend_node()
        assert choice in node_class.INPUT_TYPES()["required"]["attention"][0]
        node = node_class()
        (patched,) = getattr(node, node_class.FUNCTION)(model=model, attention=choice)
    return patched


def scaling_override(factor: float):
    """Another pack's override that changes the attention math: queries scaled, then the kernel it is handed."""

    def attention_override_scaled(func, q, k, v, *args, **kwargs):
        return func(q * factor, k, v, *args, **kwargs)

    return attention_override_scaled
