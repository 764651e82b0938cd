"""Optimization mode (DESIGN §2.4): Adam on the latent over the DDIM timestep schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.cache import ReferenceKV
from ..attention.session import ADModelSession
from .losses import ad_loss, content_loss, labels_at, region_attention_mask
from .schedule import ddim_timesteps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeSettings:
    steps: int = 200
    lr: float = 0.05
    iterations: int = 1
    content_weight: float = 0.25


@dataclass
class IterationReport:
    step: int
    iteration: int
    timestep: int
    ad: float
    content: float
    skipped: bool = False


def layer_masks(
    reference_labels: torch.Tensor | None, target_labels: torch.Tensor | None, refs: list[ReferenceKV], batch: int
) -> list[torch.Tensor | None] | None:
    """Region masks per layer (reference labels (R,H,W) and target labels (B or 1,H,W)), or None."""
    if reference_labels is None or target_labels is None:
        return None
    masks: list[torch.Tensor | None] = []
    for ref in refs:
        ref_tokens = labels_at(reference_labels.to(ref.k.device), ref.hw).reshape(-1)
        tgt_tokens = labels_at(target_labels.to(ref.k.device), ref.hw)
        if tgt_tokens.shape[0] != batch:
            tgt_tokens = tgt_tokens[:1].expand(batch, -1)
        masks.append(region_attention_mask(tgt_tokens, ref_tokens))
    return masks


def ad_objective(
    session: ADModelSession,
    x: torch.Tensor,
    timestep: float,
    refs: list[ReferenceKV],
    content_queries: list[torch.Tensor] | None,
    content_weight: float,
    masks: list[torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Total loss, AD loss and content loss of the latent `x` (the UNet input) at `timestep`."""
    records = session.features(x, timestep)
    ad = ad_loss(
        [r.q for r in records],
        [r.out for r in records],
        [ref.k for ref in refs],
        [ref.v for ref in refs],
        attn_scale=session.reference.attn_scale,
        masks=masks,
    )
    if content_queries is None:
        return ad, ad, None
    content = content_loss([r.q for r in records], content_queries)
    return ad + content_weight * content, ad, content


def optimize_latent(
    session: ADModelSession,
    init: torch.Tensor,
    settings: OptimizeSettings,
    content: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    on_iteration: Callable[[IterationReport], None] | None = None,
) -> torch.Tensor:
    """Run the reference code's `optimize` loop on `init` (model space); returns model space.

    Must run inside `autograd_through(diffusion_model)`.
    """
    x = init.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    use_content = content is not None and settings.content_weight != 0
    warned = False
    for step, timestep in enumerate(ddim_timesteps(settings.steps)):
        refs = session.reference_kv(timestep)
        masks = layer_masks(session.reference.labels, target_labels, refs, x.shape[0])
        content_q = session.queries(content, timestep) if use_content else None
        for iteration in range(settings.iterations):
            optimizer.zero_grad(set_to_none=True)
            loss, ad, cl = ad_objective(session, x, timestep, refs, content_q, settings.content_weight, masks)
            skipped = not bool(torch.isfinite(loss))
            if skipped:
                if not warned:
                    log.warning("Latent AD Optimize: non-finite loss at timestep %s; update skipped", timestep)
                    warned = True
            else:
                loss.backward()
                optimizer.step()
            if on_iteration is not None:
                on_iteration(
                    IterationReport(step, iteration, timestep, float(ad.detach()), float(cl.detach()) if cl is not None else 0.0, skipped)
                )
    return x.detach()
