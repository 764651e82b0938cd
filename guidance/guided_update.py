"""The AD update of one guided sampling step (docs/DESIGN.md §2.5 steps 2-4): AdaIN to the noised
reference, then a fresh Adam on the family's model input of the post-step latent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.cache import tensor_digest
from ..attention.family import latent_dtype
from ..attention.session import ADModelSession
from .losses import adain
from .optimize import ad_objective, region_masks
from .windows import Window, coverage, is_whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuidanceSettings:
    """Defaults are the reference code's style-specific text-to-image settings."""

    lr: float = 0.015
    iterations: int = 2
    adain: bool = True
    content_weight: float = 0.25


@dataclass
class GuidanceIteration:
    """One Adam iteration of one guided step, for progress, Cancel and tests."""

    step: int
    iteration: int
    sigma_next: float
    timestep: float
    ad: float
    content: float
    skipped: bool = False


def ad_guidance_update(
    session: ADModelSession,
    latent: torch.Tensor,
    sigma: float,
    reference_noise: torch.Tensor,
    settings: GuidanceSettings,
    *,
    adain_noise: torch.Tensor | None = None,
    content: torch.Tensor | None = None,
    content_noise: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    step: int = 0,
    on_iteration: Callable[[GuidanceIteration], None] | None = None,
    windows: list[Window] | None = None,
) -> torch.Tensor:
    """One guidance update (docs/DESIGN.md §2.5 steps 2-4) of the post-step latent.

    latent: x' in k-diffusion form and model space (after process_latent_in) at noise level
    `sigma` (σ' of the step; 0 on the last step). reference_noise: ε for the reference's
    features, shaped like the model-space reference; adain_noise: ε of the AdaIN target
    (default: reference_noise); content: model-space content latent (batch 1 or B) with its
    ε in content_noise. Returns the optimized x'* in the same form (SD: c·z*, the Adam variable
    being the family's model input z = x'/c).

    With `windows` (more than one), each window gets this update on its own (AdaIN and a
    fresh Adam, like the reference code's panorama mode) and the results are averaged where
    windows overlap. Every pass, windows included, is conditioned on the size of the whole
    latent, the image being made (docs/DESIGN.md §2.2).

    Must run inside `ad_pass` (guidance/ad_pass.py).
    """
    session.condition_on_image(latent.shape)
    if windows is None or is_whole(windows):
        return _update_latent(
            session, latent, sigma, reference_noise, settings, adain_noise, content, content_noise, target_labels,
            step, on_iteration,
        )
    total = torch.zeros_like(latent, dtype=latent_dtype(latent))
    for window in windows:
        part = _update_latent(
            session,
            window.crop(latent),
            sigma,
            reference_noise,
            settings,
            adain_noise,
            window.crop(content) if content is not None else None,
            window.crop(content_noise) if content_noise is not None else None,
            window.crop_labels(target_labels) if target_labels is not None else None,
            step,
            on_iteration,
        )
        window.add_into(total, part.to(total))
    return total / coverage(windows, *latent.shape[-2:], device=total.device).to(total.dtype)


def _update_latent(
    session: ADModelSession,
    latent: torch.Tensor,
    sigma: float,
    reference_noise: torch.Tensor,
    settings: GuidanceSettings,
    adain_noise: torch.Tensor | None,
    content: torch.Tensor | None,
    content_noise: torch.Tensor | None,
    target_labels: torch.Tensor | None,
    step: int,
    on_iteration: Callable[[GuidanceIteration], None] | None,
) -> torch.Tensor:
    """`ad_guidance_update` of one latent or window, in the session's declared image."""
    sigma = float(sigma)
    optimize = settings.iterations > 0 and settings.lr != 0
    if not optimize and not settings.adain:
        return latent.detach().clone()
    family = session.family
    timestep, sigma_ref = family.feature_time(session.base_model.model_sampling, sigma)
    reference = session.reference_latent
    z = family.to_model_input(latent.detach().to(reference.device, latent_dtype(latent)), sigma)

    if settings.adain:
        target = family.noised(reference, adain_noise if adain_noise is not None else reference_noise, sigma_ref)
        z = adain(family.adain_view(z), family.adain_view(target), dims=family.adain_dims).reshape(z.shape)
    if not optimize:
        return family.from_model_input(z, sigma).detach()

    # The noise is part of the cache key (by content), so re-runs with the same reference
    # noise seed reuse the features and any other noise gets its own entry.
    refs = session.reference_kv(timestep, noise=reference_noise, sigma=sigma_ref)
    masks = region_masks(session, target_labels)
    content_q = None
    if content is not None and settings.content_weight != 0:
        if content_noise is None:
            raise ValueError("content_noise is required with a content latent")
        noised = family.noised(content.to(reference), content_noise, sigma_ref)
        content_q = session.queries(noised, timestep, cache_key=("ad-guidance-content", tensor_digest(noised)))

    z = z.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=settings.lr)
    for iteration in range(settings.iterations):
        optimizer.zero_grad(set_to_none=True)
        loss, ad, cl = ad_objective(session, z, timestep, refs, content_q, settings.content_weight, masks)
        skipped = not bool(torch.isfinite(loss))
        if skipped:
            log.warning("AD Loss Guidance: non-finite loss at sigma %.4g; update skipped", sigma)
        else:
            loss.backward()
            optimizer.step()
        if on_iteration is not None:
            on_iteration(
                GuidanceIteration(
                    step,
                    iteration,
                    sigma,
                    timestep,
                    float(ad.detach()),
                    float(cl.detach()) if cl is not None else 0.0,
                    skipped,
                )
            )
        if skipped:
            break
    return family.from_model_input(z.detach(), sigma).detach()
