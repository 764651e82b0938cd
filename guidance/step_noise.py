"""Reproducible per-step noise of guided sampling: fresh noise for every use, as the reference code
draws it, yet a pure function of (shape, seed, step, stream) so re-runs reuse cached features."""

from __future__ import annotations

import torch

# Independent noise streams per step, as the reference code draws fresh noise for each use.
STREAM_REFERENCE = 0
STREAM_ADAIN = 1
STREAM_CONTENT = 2

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 64-bit generator seed for (seed, step, stream): nearby inputs give unrelated seeds."""
    value = _splitmix64(int(seed) & _MASK64)
    value = _splitmix64(value ^ (int(step) & _MASK64))
    return _splitmix64(value ^ (int(stream) & _MASK64))


def step_noise(shape: tuple[int, ...], seed: int, step: int, stream: int) -> torch.Tensor:
    """Standard normal float32 noise on the CPU, a pure function of (shape, seed, step, stream),
    so runs are reproducible on every device and the feature cache can key on it."""
    generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, step, stream))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_step_key(timestep: float) -> int:
    """The step identity the per-step noise is drawn for: the step's target timestep t'
    (thousandths, for models with continuous timesteps). Unlike the index in the running
    schedule it is the same when a run is split (KSamplerAdvanced start/end steps)."""
    return int(round(float(timestep) * 1000))
