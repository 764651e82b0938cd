"""Timestep schedules of the reference code."""

from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DDIM "leading" spacing with offset 1: t_i = 1 + (T // steps)·(steps − 1 − i).

    200 steps give 996, 991, …, 1 (DESIGN §2.4).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps must be at most {num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [1 + stride * (steps - 1 - i) for i in range(steps)]
