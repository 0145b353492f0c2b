"""Sigma schedules: where on the noise axis each step evaluates the model.

A schedule turns (steps, shift) into a `Schedule`: `sigmas` (steps,) descending, strictly inside (0, 1], and
`timesteps` (steps,), what the transformer receives at each step. The final σ = 0 is appended by the step
rule. Every grid here is the one an official implementation builds, in its precision.

    unipc-grid        the flow UniPC grid of Wan 2.2's official sampler: linspace from 1 − 1/1000 (rounded to
                      float32), shifted in float64; the model sees σ·1000 truncated to integers, as the official
                      code casts it. (A family may publish its own name for a schedule: `Family.schedule_names`.)
    shifted-linear    linspace(1, 0) shifted in float32 (HunyuanVideo, diffusers' FlowMatchEuler); timesteps
                      σ·1000 as floats.
    linear-quadratic  Mochi's: the first half of the steps linear down to a threshold σ, the rest quadratic;
                      no shift (the model sees σ·1000 as floats).
An explicit list of sigmas (or of timesteps, σ = t/1000) serves distilled checkpoints: `explicit_schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .flow import check_schedule_args, flow_euler_sigmas, shift_sigmas, unipc_flow_sigmas


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (steps,) float, descending, last > 0 (the step rule appends σ = 0)
    timesteps: np.ndarray  # (steps,) what the model is given


def unipc_grid_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    check_schedule_args(steps, shift)
    shifted = shift_sigmas(unipc_flow_sigmas(steps, num_train_timesteps), float(shift))
    return Schedule(shifted, (shifted * num_train_timesteps).astype(np.int64))


def shifted_linear_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    check_schedule_args(steps, shift)
    shifted = shift_sigmas(flow_euler_sigmas(steps), float(shift)).astype(np.float32)
    return Schedule(shifted, (shifted * np.float32(num_train_timesteps)).astype(np.float32))


def linear_quadratic_sigmas(steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> np.ndarray:
    """Mochi's noise levels, (steps,) float64 descending from 1 (σ = 1 − the official "t" values).

    The first `linear_steps` (default half) values of t go linearly from 0 to `threshold_noise`; the rest
    follow the quadratic through (linear_steps, threshold_noise) and (steps, 1) with the same slope at the
    join, as Genmo's `linear_quadratic_schedule` builds them.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps == 1:
        return np.array([1.0])
    if linear_steps is None:
        linear_steps = steps // 2
    if not 0 < linear_steps < steps:
        raise ValueError(f"linear_steps must be between 1 and {steps - 1}, got {linear_steps}")
    t_linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    quadratic_steps = steps - linear_steps
    threshold_step_diff = linear_steps - threshold_noise * steps
    quadratic_coef = threshold_step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold_noise / linear_steps - 2 * threshold_step_diff / (quadratic_steps**2)
    const = quadratic_coef * (linear_steps**2)
    t_quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
    t = np.array(t_linear + t_quadratic, dtype=np.float64)
    return 1.0 - t


def linear_quadratic_schedule(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Schedule:
    """Mochi's schedule. `shift` must be 1: the published recipe applies none."""
    if shift != 1.0:
        raise ValueError(f"the linear-quadratic schedule takes no shift (got {shift}); leave --shift out")
    sigmas = linear_quadratic_sigmas(steps).astype(np.float32)
    return Schedule(sigmas, (sigmas * np.float32(num_train_timesteps)).astype(np.float32))


def explicit_schedule(sigmas=None, timesteps=None, num_train_timesteps: int = 1000) -> Schedule:
    """A distilled checkpoint's own grid: sigmas in (0, 1], or timesteps in (0, num_train_timesteps]."""
    if (sigmas is None) == (timesteps is None):
        raise ValueError("give either sigmas or timesteps")
    values = np.asarray(sigmas if sigmas is not None else timesteps, dtype=np.float64).reshape(-1)
    top = 1.0 if sigmas is not None else float(num_train_timesteps)
    what = "sigmas" if sigmas is not None else "timesteps"
    if values.size == 0:
        raise ValueError(f"the {what} list is empty")
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values > top):
        raise ValueError(f"{what} must lie in (0, {top:g}], got {values.tolist()}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"{what} must decrease strictly, got {values.tolist()}")
    sig = values if sigmas is not None else values / num_train_timesteps
    sig = sig.astype(np.float32)
    return Schedule(sig, (sig * np.float32(num_train_timesteps)).astype(np.float32))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "unipc-grid": unipc_grid_schedule,
    "shifted-linear": shifted_linear_schedule,
    "linear-quadratic": linear_quadratic_schedule,
}


def make_schedule(name: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    try:
        build = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}") from None
    return build(steps, shift, num_train_timesteps)
