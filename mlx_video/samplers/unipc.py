"""Wan 2.2's default sampler: UniPC (predictor UniP + corrector UniC) on the flow-matching schedule.

Same algorithm and settings as Wan's FlowUniPCMultistepScheduler: solver order 2, updates on the x0
prediction (x0 = x − σ·v), the "bh2" variant B(h) = e^{−h} − 1, the corrector at every step from the
second on, order 1 for the first step (warm-up) and for the last one (lower_order_final, which in that
code applies at any number of steps), and a final σ of 0.

All coefficients depend only on the σ grid, so they are computed once on the host (numpy, float64);
a step is then a handful of fp32 array operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .schedules import Schedule

SOLVER_ORDER = 2


@dataclass(frozen=True)
class LinearUpdate:
    """new = sample_scale·x + x0_scale·m0 + older_scale·(m_older − m0) + newer_scale·(m_newer − m0).

    m0 is the x0 prediction at the step's starting σ; m_older the one a step earlier (order-2 terms);
    m_newer the one at the step's target σ (corrector only).
    """

    sample_scale: float
    x0_scale: float
    older_scale: float = 0.0
    newer_scale: float = 0.0


def log_snr(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ."""
    return float(np.log1p(-sigma) - np.log(sigma))


def order_one_terms(sigma_from: float, sigma_to: float) -> tuple[float, float, float, float]:
    """(sample_scale, x0_scale, h, B(h)) of the first-order exponential-integrator step σ_from → σ_to."""
    h = log_snr(sigma_to) - log_snr(sigma_from)
    b_h = float(np.expm1(-h))  # also h·φ1(h) in the x0 form
    return sigma_to / sigma_from, -(1.0 - sigma_to) * b_h, h, b_h


def predictor_update(sigmas: list[float], i: int, order: int) -> LinearUpdate:
    """UniP from σ_i to σ_{i+1}, using the x0 predictions at σ_i (and σ_{i−1} when order is 2)."""
    sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
    if sigma_to == 0.0:
        # The log-SNR is infinite at σ = 0; the first-order step's limit is the x0 prediction itself.
        if order != 1:
            raise ValueError("a step that ends at σ = 0 must be first order")
        return LinearUpdate(sample_scale=0.0, x0_scale=1.0)
    sample_scale, x0_scale, h, b_h = order_one_terms(sigma_from, sigma_to)
    if order == 1:
        return LinearUpdate(sample_scale, x0_scale)
    r = (log_snr(sigmas[i - 1]) - log_snr(sigma_from)) / h
    # Order 2 uses ρ = 1/2 directly instead of solving for it, as the reference does.
    return LinearUpdate(sample_scale, x0_scale, older_scale=-(1.0 - sigma_to) * b_h * 0.5 / r)


def corrector_update(sigmas: list[float], i: int, order: int) -> LinearUpdate:
    """UniC of the step σ_{i−1} → σ_i, once the model has been evaluated at σ_i."""
    sigma_from, sigma_to = sigmas[i - 1], sigmas[i]
    sample_scale, x0_scale, h, b_h = order_one_terms(sigma_from, sigma_to)
    weight = -(1.0 - sigma_to) * b_h
    if order == 1:
        return LinearUpdate(sample_scale, x0_scale, newer_scale=weight * 0.5)
    r = (log_snr(sigmas[i - 2]) - log_snr(sigma_from)) / h
    # Match the Taylor terms of orders 1 and 2: R·ρ = g with R's rows the powers 0, 1 of the nodes (r, 1).
    hh = -h
    g1 = float(np.expm1(hh)) / hh - 1.0
    g2 = g1 / hh - 0.5
    g = np.array([g1, 2.0 * g2]) / b_h
    rho_older, rho_newer = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), g)
    return LinearUpdate(
        sample_scale,
        x0_scale,
        older_scale=weight * float(rho_older) / r,
        newer_scale=weight * float(rho_newer),
    )


def apply_update(update: LinearUpdate, sample, m0, m_older=None, m_newer=None) -> mx.array:
    out = update.sample_scale * sample + update.x0_scale * m0
    if update.older_scale:
        out = out + update.older_scale * (m_older - m0)
    if update.newer_scale:
        out = out + update.newer_scale * (m_newer - m0)
    return out


class FlowUniPCSampler:
    """Multistep UniPC for flow models; remembers the last two x0 predictions and the last sample."""

    def __init__(self, schedule: Schedule):
        self.sigmas = np.append(schedule.sigmas, 0.0).astype(np.float32)
        self.timesteps = schedule.timesteps
        steps = self.steps = len(schedule.sigmas)

        # The coefficients use the float32 σ that the reference's arithmetic sees, as Python floats so
        # that they scale mx arrays instead of turning them into numpy ones.
        grid = self.sigmas.tolist()
        # Warm-up: one earlier x0 prediction is needed for order 2; the last step is always first order.
        self.orders = [min(SOLVER_ORDER, i + 1, steps - i) for i in range(steps)]
        self.predictors = [predictor_update(grid, i, self.orders[i]) for i in range(steps)]
        self.correctors = [None] + [corrector_update(grid, i, self.orders[i - 1]) for i in range(1, steps)]
        self.reset()

    def reset(self) -> None:
        self._x0_history: list[mx.array] = []
        self._last_sample: mx.array | None = None

    def step(self, model_output: mx.array, i: int, sample: mx.array) -> mx.array:
        if not 0 <= i < self.steps:
            raise ValueError(f"step index {i} is outside 0..{self.steps - 1}")
        if len(self._x0_history) != min(i, SOLVER_ORDER):
            raise ValueError(f"UniPC steps must run in order from 0 after reset(); got step {i}")

        sample = sample.astype(mx.float32)
        # The x0 prediction comes from the sample as the model saw it, before the correction.
        x0 = sample - float(self.sigmas[i]) * model_output.astype(mx.float32)
        if i > 0:
            older = self._x0_history[-2] if len(self._x0_history) == 2 else None
            sample = apply_update(self.correctors[i], self._last_sample, self._x0_history[-1], older, x0)

        self._x0_history = (self._x0_history + [x0])[-SOLVER_ORDER:]
        self._last_sample = sample
        older = self._x0_history[-2] if len(self._x0_history) == 2 else None
        return apply_update(self.predictors[i], sample, x0, older)
