"""Flow-matching time and noising shared by the DiT families (docs/DESIGN.md §2.7 and §2.8): ComfyUI's
CONST parametrization, where the network takes the latent itself at `model_sampling.timestep(σ)`.

attention/flux_family.py still answers these itself; a DiT family added since inherits them from here.
"""

from __future__ import annotations

from typing import Any

import torch

from .family import ModelFamily


class FlowMatchingFamily(ModelFamily):
    """The sampling parametrization of a CONST (flow-matching) model: x_σ = σ·ε + (1 − σ)·x0."""

    def optimize_times(self, base_model: Any, steps: int) -> list[float]:
        """The model's own `simple` sigmas for `steps` (its ModelSampling* shift included), without the final 0,
        as network times."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        import comfy.samplers

        sampling = base_model.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)[:-1]
        return [float(t) for t in sampling.timestep(sigmas.float()).reshape(-1)]

    def feature_time(self, model_sampling: Any, sigma: float) -> tuple[float, float]:
        """(network time, noise level): the MODEL's current `timestep(σ)`; σ = 0 is the clean latent at time 0."""
        time = model_sampling.timestep(torch.tensor([float(sigma)], dtype=torch.float32))
        return float(time.reshape(-1)[0]), float(sigma)

    def to_model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x  # CONST: the network takes the latent itself

    def from_model_input(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        return z

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """σ·ε + (1 − σ)·x0 (ComfyUI's CONST `noise_scaling`)."""
        return sigma * noise.to(clean) + (1.0 - sigma) * clean
