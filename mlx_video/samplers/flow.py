"""Noise-level grids for flow-matching samplers.

Convention: x_σ = (1 − σ)·x0 + σ·ε, with σ = 1 pure noise and σ = 0 the clean sample.
Every grid here is the one an official implementation builds before its timestep shift.
"""

from __future__ import annotations

import numpy as np


def check_schedule_args(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """σ' = s·σ / (1 + (s − 1)·σ): with s > 1, more of the steps are spent at high noise.

    Evaluated in the dtype of `sigmas`, in the same order as the references, so grids match bit for bit.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_flow_sigmas(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Wan's UniPC grid before the shift: `steps` float64 values from σ_max down to (excluding) σ_min = 0.

    σ_max = 1 − 1/num_train_timesteps, rounded to float32 because Wan reads it back from a float32
    tensor; that rounding decides how σ·1000 truncates to the model's integer timesteps.
    """
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1]


def flow_euler_sigmas(steps: int) -> np.ndarray:
    """HunyuanVideo's flow-Euler grid before the shift: `steps` float32 values from 1 down to (excluding) 0.

    HunyuanVideo builds it with torch.linspace in float32, which can differ from this one in the last bit.
    """
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)[:-1]
