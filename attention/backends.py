"""Attention in AD passes on a MODEL that carries an attention backend or another pack's override
(docs/DESIGN.md §3, "Attention backends and other packs' attention patches").

ComfyUI has one `transformer_options["optimized_attention_override"]` slot; its attention functions
call `override(func, q, k, v, heads, ...)` instead of their own kernel `func`. Two kinds fill it:

- kernel choices: ComfyUI's `ModelAttentionBackend` (PyTorch or comfy-kitchen INT8 attention, through
  `ModelPatcher.set_model_optimized_attention`) and other packs' sage/flash/sparse switches. They
  compute attention with a kernel of their own and never call `func`. Such kernels mostly have no
  backward, so AD passes compute SDPA instead; the sampler's own passes keep the backend.
- wrappers: overrides that change what reaches the kernel (or observe it) and then call `func`.
  They are part of the network the sampler runs, so families that run the MODEL's options in their
  AD passes (Flux) chain them, handing them SDPA as `func`.

An override that turns out not to call the `func` it is handed is treated as a kernel choice for that
call. None of the pack's overrides carries `container_function`, so ComfyUI hands them plain tensors
even where a model passes `AttentionTensorContainer`s.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_NOTED: set[str] = set()


def backward_capable_kernel(func: Callable) -> Callable:
    """The attention function of AD passes: SDPA, which every backend can differentiate (sage/flash/INT8
    kernels cannot); the host's own `func` should a ComfyUI version rename it."""
    import comfy.ldm.modules.attention as attention

    return getattr(attention, "attention_pytorch", None) or func


@functools.cache
def _host_kernel_choice_code() -> frozenset[types.CodeType]:
    """Code of the overrides `ModelPatcher.set_model_optimized_attention` installs (ComfyUI's
    ModelAttentionBackend node uses it); empty on hosts without it (v0.3.64, the 2024 core)."""
    try:
        from comfy.model_patcher import ModelPatcher
    except ImportError:
        return frozenset()
    setter = getattr(ModelPatcher, "set_model_optimized_attention", None)
    code = getattr(setter, "__code__", None)
    if code is None:
        return frozenset()
    return frozenset(const for const in code.co_consts if isinstance(const, types.CodeType))


def is_kernel_choice(override: Any) -> bool:
    """True for an override installed by ComfyUI's `set_model_optimized_attention`: it calls the kernel
    it was given there and ignores the attention function it is handed."""
    return getattr(override, "__code__", None) in _host_kernel_choice_code()


def _note_bypassed(override: Any) -> None:
    name = getattr(override, "__qualname__", type(override).__qualname__)
    if name not in _NOTED:
        _NOTED.add(name)
        log.info("AD passes compute attention with SDPA instead of %s, which brings its own kernel "
                 "(the sampler's own passes keep it)", name)


def ad_attention(override: Callable | None, kernel: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Attention of one call in an AD pass through `kernel` (SDPA), under the MODEL's `override`: a
    kernel choice is left out; any other override runs with `kernel` as its attention function, and
    if it returns without calling it (a kernel of its own), its result is replaced by `kernel`'s."""
    if override is None or is_kernel_choice(override):
        return kernel(*args, **kwargs)
    calls = []

    def handed(*inner_args: Any, **inner_kwargs: Any) -> torch.Tensor:
        calls.append(True)
        return kernel(*inner_args, **inner_kwargs)

    functools.update_wrapper(handed, kernel)
    out = override(handed, *args, **kwargs)
    if calls:
        return out
    _note_bypassed(override)
    return kernel(*args, **kwargs)


def backward_capable_attention(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`optimized_attention_override` of passes that run none of the MODEL's options: SDPA."""
    return backward_capable_kernel(func)(*args, **kwargs)


def options_identity(value: Any) -> Any:
    """What transformer options are, for feature cache keys: plain data by value, a kernel choice as
    such (it does not change AD features), anything else by `ad_cache_identity` or object identity."""
    if isinstance(value, dict):
        return tuple(sorted(((repr(k), options_identity(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return tuple(options_identity(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_kernel_choice(value):
        return "kernel choice"
    return getattr(value, "ad_cache_identity", ("id", id(value)))
