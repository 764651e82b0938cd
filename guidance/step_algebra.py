"""Step algebra of guided sampling in ComfyUI's k-diffusion form (docs/DESIGN.md §2.5): where the running
schedule goes next, the deterministic step the sampler is about to take, and the denoised value that
lands it on the optimized latent."""

from __future__ import annotations

from typing import Any

import torch

_SCHEDULE_RTOL = 1e-5


def deterministic_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The Euler/DDIM (η = 0) step from σ to σ': x' = D + (x − D)·σ'/σ."""
    return denoised + (x - denoised) * (sigma_next / sigma)


def landing_denoised(x: torch.Tensor, x_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The denoised value D* whose Euler step from (x, σ) lands exactly on x_next at σ'."""
    ratio = sigma_next / sigma
    return (x_next - ratio * x) / (1.0 - ratio)


def schedule_step(sigmas: torch.Tensor, sigma: float) -> tuple[int, float] | None:
    """(step index i, σ_{i+1}) for a model call at σ in a descending schedule.

    i is the last schedule entry at or above σ, so calls at a schedule sigma, at a
    sampler's midpoint (dpm_2, dpmpp_sde, dpmpp_2s) or above the first sigma (churn) all
    aim at the next schedule sigma below them. None when nothing is below σ.
    """
    values = [float(v) for v in sigmas.detach().flatten().cpu()]
    threshold = sigma * (1.0 - _SCHEDULE_RTOL)
    index = None
    for i, value in enumerate(values):
        if value >= threshold:
            index = i
    if index is None:  # above the first sigma (churn): the first step
        index = 0
    if index + 1 >= len(values):
        return None
    nxt = values[index + 1]
    if not nxt < threshold:
        return None
    return index, nxt


def sigma_range(model_sampling: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(highest, lowest) σ at which guidance is active, like ComfyUI's other guidance nodes."""
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))
