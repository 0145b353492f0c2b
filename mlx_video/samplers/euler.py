"""First-order flow-matching Euler sampler, as HunyuanVideo uses it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .schedules import Schedule


class FlowEulerSampler:
    """x_{i+1} = x_i + v·(σ_{i+1} − σ_i), where the model predicts v = ε − x0.

    The step sizes are float32 differences of the schedule's σ (with σ = 0 appended), as in HunyuanVideo
    and diffusers' FlowMatchEulerDiscreteScheduler.
    """

    def __init__(self, schedule: Schedule):
        self.sigmas = np.append(schedule.sigmas, 0.0).astype(np.float32)
        self.timesteps = schedule.timesteps
        self.steps = len(schedule.sigmas)
        self._deltas = np.diff(self.sigmas).tolist()

    def reset(self) -> None:
        """Euler keeps no history; present for the common sampler interface."""

    def step(self, model_output: mx.array, i: int, sample: mx.array) -> mx.array:
        if not 0 <= i < len(self._deltas):
            raise ValueError(f"step index {i} is outside 0..{len(self._deltas) - 1}")
        velocity = model_output.astype(mx.float32)
        return sample.astype(mx.float32) + velocity * self._deltas[i]
