"""Backpropagation to the latent through a UNet whose weights are inference tensors.

ComfyUI runs every prompt under `torch.inference_mode()`, so checkpoint and LoRA-patched
weights are inference tensors that autograd refuses to save. Inside `autograd_through`
each parameter is swapped for a normal tensor that aliases the same storage (no copy, no
per-call cast) and the originals are put back on exit, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..attention.families import family_for


def _alias(t: torch.Tensor) -> torch.Tensor:
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _aliasable(t: torch.Tensor | None) -> bool:
    # Tensor subclasses (quantized/GGUF weights) go through their own cast path, which
    # already produces fresh tensors; meta tensors hold no data.
    return t is not None and type(t.data) is torch.Tensor and t.device.type != "meta"


@contextlib.contextmanager
def aliased_weights(module: torch.nn.Module) -> Iterator[int]:
    """Swap parameters and buffers for non-inference aliases that do not require grad."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, value in list(store.items()):
                    if not _aliasable(value):
                        continue
                    alias = _alias(value.data if isinstance(value, torch.nn.Parameter) else value)
                    if isinstance(value, torch.nn.Parameter):
                        alias = torch.nn.Parameter(alias, requires_grad=False)
                    swapped.append((store, name, value))
                    store[name] = alias
        yield len(swapped)
    finally:
        for store, name, value in reversed(swapped):
            store[name] = value


@contextlib.contextmanager
def clone_saved_tensors() -> Iterator[None]:
    """Store graph tensors as private copies, so later in-place edits cannot corrupt them.

    Needed where the host adds residuals in place (`x += n` in older ComfyUI transformer
    blocks). The clone, not the hook, keeps gradients right.
    """

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.requires_grad else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def needs_inplace_guard(diffusion_model: torch.nn.Module) -> bool:
    """Whether this host's blocks add residuals in place, as the model's family finds out."""
    family = family_for(diffusion_model)
    return family is not None and family.needs_inplace_guard(diffusion_model)


@contextlib.contextmanager
def autograd_through(diffusion_model: torch.nn.Module) -> Iterator[None]:
    """Grad on, inference mode off, weights aliased, in-place guard where the host needs it."""
    with torch.inference_mode(False), torch.enable_grad(), aliased_weights(diffusion_model):
        guard = clone_saved_tensors() if needs_inplace_guard(diffusion_model) else contextlib.nullcontext()
        with guard:
            yield
