"""Small helpers shared by the optimize tests: run the nodes, measure losses at fixed timesteps."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch


def pack_modules(**names: str) -> SimpleNamespace:
    """The pack's modules by short name, e.g. pack_modules(windows="guidance.windows"), imported the
    way ComfyUI loads the pack (call after the `pack` fixture has loaded it)."""
    return SimpleNamespace(**{k: importlib.import_module(f"attention_distillation_pack.{v}") for k, v in names.items()})


def capture(patcher, reference: torch.Tensor, cond, layers: str = "paper default", **kwargs):
    from attention_distillation_pack.nodes.capture import CaptureReferenceAttention

    with torch.inference_mode():
        return CaptureReferenceAttention().capture(patcher, {"samples": reference}, cond, layers, **kwargs)[0]


def optimize(patcher, ref, latent: torch.Tensor, steps=4, lr=0.05, iterations=1, weight=0.0, seed=0, **kwargs):
    from attention_distillation_pack.nodes.optimize import LatentADOptimize

    with torch.inference_mode():
        out, _ = LatentADOptimize().optimize(patcher, ref, {"samples": latent}, steps, lr, iterations, weight, seed, **kwargs)
    return out["samples"]


def losses_at(patcher, ref, latent: torch.Tensor, timesteps=(1, 250, 500), content: torch.Tensor | None = None):
    """Mean AD (and content) loss of a LATENT over fixed timesteps: comparable between runs."""
    from attention_distillation_pack.attention.session import ADModelSession
    from attention_distillation_pack.guidance.autograd import autograd_through
    from attention_distillation_pack.guidance.optimize import ad_objective

    session = ADModelSession(patcher, ref)
    ad_total, content_total = 0.0, 0.0
    with torch.inference_mode(), autograd_through(patcher.model.diffusion_model), torch.no_grad():
        x = session.to_model_space(latent)
        c = session.to_model_space(content) if content is not None else None
        for t in timesteps:
            cq = session.queries(c, t) if c is not None else None
            _, ad, cl = ad_objective(session, x, t, session.reference_kv(t), cq, 1.0, None)
            ad_total += float(ad)
            content_total += float(cl) if cl is not None else 0.0
    return ad_total / len(timesteps), content_total / len(timesteps)
