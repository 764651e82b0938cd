"""Optimization mode (docs/DESIGN.md §2.4): Adam on the latent over the family's descending schedule
(SD: the DDIM timesteps)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention.cache import ReferenceKV, tensor_digest
from ..attention.family import latent_dtype
from ..attention.recorder import LayerRecord
from ..attention.reference import ADReference
from ..attention.session import ADModelSession
from .ad_pass import ad_pass
from .losses import ad_loss, content_loss, labels_at, region_attention_mask
from .windows import Window, coverage, is_whole

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
    timestep: float
    ad: float
    content: float
    skipped: bool = False
    latent: torch.Tensor | None = None  # the whole latent after this iteration (model space), for previews


class RegionMasks:
    """Boolean attention masks per layer from reference labels (R, H, W) and target labels
    (B or 1, H, W), built once per (reference grid, target grid). On a model with joint text tokens
    (Flux) the regions are the image tokens': a text query attends to every reference token, an image
    query only to the reference's image tokens of its label (never to text or Z-Image's pad tokens)."""

    def __init__(self, reference_labels: torch.Tensor, target_labels: torch.Tensor) -> None:
        self.reference_labels = reference_labels
        self.target_labels = target_labels
        self._built: dict[tuple, torch.Tensor] = {}

    def for_layers(self, refs: list[ReferenceKV], records: list[LayerRecord]) -> list[torch.Tensor | None]:
        masks: list[torch.Tensor | None] = []
        for ref, rec in zip(refs, records, strict=True):
            batch = rec.q.shape[0]
            key = (ref.hw, rec.hw, batch, ref.k.device, ref.text_tokens, ref.trailing_tokens, rec.text_tokens)
            if key not in self._built:
                ref_tokens = _with_text(labels_at(self.reference_labels.to(ref.k.device), ref.hw), ref.text_tokens,
                                        ref.trailing_tokens)
                tgt_tokens = _with_text(labels_at(self.target_labels.to(ref.k.device), rec.hw), rec.text_tokens)
                if tgt_tokens.shape[0] != batch:
                    tgt_tokens = tgt_tokens[:1].expand(batch, -1)
                mask = region_attention_mask(tgt_tokens, ref_tokens.reshape(-1))
                if rec.text_tokens:
                    mask[:, :, : rec.text_tokens] = True
                self._built[key] = mask
            masks.append(self._built[key])
        return masks


_TEXT_LABEL = -1  # never a region label (labels_from_mask gives 0..255)


def _with_text(labels: torch.Tensor, text_tokens: int, trailing_tokens: int = 0) -> torch.Tensor:
    """(B, h·w) image-token labels with `text_tokens` text tokens first and `trailing_tokens` (Z-Image's
    image pads) last, both labelled as no region."""
    if not text_tokens and not trailing_tokens:
        return labels
    batch = labels.shape[0]
    return torch.cat([labels.new_full((batch, text_tokens), _TEXT_LABEL), labels,
                      labels.new_full((batch, trailing_tokens), _TEXT_LABEL)], dim=1)


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
    """Total loss, AD loss and content loss of the latent `x` (the model input) at `timestep`."""
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
    content = content_loss([r.image_part(r.q) for r in records], content_queries)
    return ad + content_weight * content, ad, content


def optimize_latent(
    session: ADModelSession,
    init: torch.Tensor,
    settings: OptimizeSettings,
    content: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    on_iteration: Callable[[IterationReport], None] | None = None,
    windows: list[Window] | None = None,
    before_window: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the reference code's `optimize` loop on `init` (model space); returns model space.

    With `windows` (more than one), every iteration back-propagates the AD loss of each window
    on its own, averages the gradients where windows overlap and takes one Adam step: the
    memory of a pass is the window's, whatever the latent's size. `before_window` runs before
    each window's pass (Cancel: an iteration over many windows can take long). Every pass,
    windows included, is conditioned on the size of the whole latent (docs/DESIGN.md §2.2).

    Must run inside `ad_pass` (guidance/ad_pass.py).
    """
    session.reference.cache.begin_run()
    session.condition_on_image(init.shape)
    x = init.detach().to(latent_dtype(init)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    use_content = content is not None and settings.content_weight != 0
    warned = False
    content_key = tensor_digest(content) if use_content else None
    windowed = windows is not None and not is_whole(windows)
    parts = windows if windowed else [None]
    masks = [region_masks(session, _crop_labels(target_labels, w)) for w in parts]
    count = coverage(windows, *x.shape[-2:], device=x.device).to(x.dtype) if windowed else None
    for step, timestep in enumerate(session.family.optimize_times(session.base_model, settings.steps)):
        refs = session.reference_kv(timestep)
        content_q = [
            session.queries(_crop(content, w), timestep, cache_key=(content_key, w)) if use_content else None
            for w in parts
        ]
        for iteration in range(settings.iterations):
            optimizer.zero_grad(set_to_none=True)
            finite, ad, cl = True, 0.0, 0.0
            for part, part_q, part_masks in zip(parts, content_q, masks, strict=True):
                if part is not None and before_window is not None:
                    before_window()
                loss, part_ad, part_cl = ad_objective(
                    session, _crop(x, part), timestep, refs, part_q, settings.content_weight, part_masks
                )
                ad += float(part_ad.detach()) / len(parts)
                cl += float(part_cl.detach()) / len(parts) if part_cl is not None else 0.0
                if not bool(torch.isfinite(loss)):
                    finite = False
                    break
                loss.backward()  # per window: its graph is freed before the next one is built
            if finite:
                if count is not None:
                    x.grad.div_(count)
                optimizer.step()
            elif not warned:
                log.warning("Latent AD Optimize: non-finite loss at timestep %s; update skipped", timestep)
                warned = True
            if on_iteration is not None:
                on_iteration(IterationReport(step, iteration, timestep, ad, cl, not finite, x.detach()))
    return x.detach()


def optimize_on_model(
    patcher: Any,
    reference: ADReference,
    samples: torch.Tensor,
    settings: OptimizeSettings,
    *,
    start: torch.Tensor | None = None,
    content: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    windows: list[Window] | None = None,
    gradient_checkpointing: bool = False,
    on_iteration: Callable[[IterationReport], None] | None = None,
    before_window: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Latent AD Optimize on a loaded MODEL: LATENT-space `samples` (and `content`) in, the optimized
    LATENT-space samples out. `start`: the model-space start latent instead of `samples` (seeded
    noise for texture synthesis)."""
    with ad_pass(patcher, reference, gradient_checkpointing=gradient_checkpointing) as session:
        if start is None:
            init = session.to_model_space(samples)
        else:
            init = start.detach().clone().to(session.device, latent_dtype(samples))
        content_in = session.to_model_space(content) if content is not None else None
        result = optimize_latent(session, init, settings, content=content_in, target_labels=target_labels,
                                 on_iteration=on_iteration, windows=windows, before_window=before_window)
        return session.to_latent_space(result).to(samples.device, samples.dtype)


def _crop(tensor: torch.Tensor | None, window: Window | None) -> torch.Tensor | None:
    return tensor if tensor is None or window is None else window.crop(tensor)


def _crop_labels(labels: torch.Tensor | None, window: Window | None) -> torch.Tensor | None:
    return labels if labels is None or window is None else window.crop_labels(labels)
