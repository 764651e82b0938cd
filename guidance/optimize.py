"""Optimization mode (DESIGN §2.4): Adam on the latent over the DDIM timestep schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.cache import ReferenceKV, tensor_digest
from ..attention.recorder import LayerRecord
from ..attention.session import ADModelSession
from ..attention.unet_pass import latent_dtype
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


class RegionMasks:
    """Boolean attention masks per layer from reference labels (R, H, W) and target labels
    (B or 1, H, W), built once per (reference grid, target grid)."""

    def __init__(self, reference_labels: torch.Tensor, target_labels: torch.Tensor) -> None:
        self.reference_labels = reference_labels
        self.target_labels = target_labels
        self._built: dict[tuple, torch.Tensor] = {}

    def for_layers(self, refs: list[ReferenceKV], records: list[LayerRecord]) -> list[torch.Tensor | None]:
        masks: list[torch.Tensor | None] = []
        for ref, rec in zip(refs, records, strict=True):
            batch = rec.q.shape[0]
            key = (ref.hw, rec.hw, batch, ref.k.device)
            if key not in self._built:
                ref_tokens = labels_at(self.reference_labels.to(ref.k.device), ref.hw).reshape(-1)
                tgt_tokens = labels_at(self.target_labels.to(ref.k.device), rec.hw)
                if tgt_tokens.shape[0] != batch:
                    tgt_tokens = tgt_tokens[:1].expand(batch, -1)
                self._built[key] = region_attention_mask(tgt_tokens, ref_tokens)
            masks.append(self._built[key])
        return masks


def region_masks(session: ADModelSession, target_labels: torch.Tensor | None) -> RegionMasks | None:
    if target_labels is None or session.reference.labels is None:
        return None
    return RegionMasks(session.reference.labels, target_labels)


def ad_objective(
    session: ADModelSession,
    x: torch.Tensor,
    timestep: float,
    refs: list[ReferenceKV],
    content_queries: list[torch.Tensor] | None,
    content_weight: float,
    masks: RegionMasks | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Total loss, AD loss and content loss of the latent `x` (the UNet input) at `timestep`."""
    records = session.features(x, timestep)
    ad = ad_loss(
        [r.q for r in records],
        [r.out for r in records],
        [ref.k for ref in refs],
        [ref.v for ref in refs],
        attn_scale=session.reference.attn_scale,
        masks=masks.for_layers(refs, records) if masks is not None else None,
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
    session.reference.cache.begin_run()
    x = init.detach().to(latent_dtype(init)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    use_content = content is not None and settings.content_weight != 0
    warned = False
    masks = region_masks(session, target_labels)
    content_key = tensor_digest(content) if use_content else None
    for step, timestep in enumerate(ddim_timesteps(settings.steps)):
        refs = session.reference_kv(timestep)
        content_q = session.queries(content, timestep, cache_key=content_key) if use_content else None
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
