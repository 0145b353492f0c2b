"""First-order flow-matching Euler sampler, as HunyuanVideo uses it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .flow import check_schedule_args, flow_euler_sigmas, shift_sigmas


class FlowEulerSampler:
    """x_{i+1} = x_i + v·(σ_{i+1} − σ_i), where the model predicts v = ε − x0.

    The grid and its shift are computed in float32, as in HunyuanVideo and diffusers'
    FlowMatchEulerDiscreteScheduler; the model receives the float timesteps σ·1000.
    """

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000):
        check_schedule_args(steps, shift)
        shifted = shift_sigmas(flow_euler_sigmas(steps), float(shift))
        self.sigmas = np.append(shifted, np.float32(0.0)).astype(np.float32)
        self.timesteps = (shifted * np.float32(num_train_timesteps)).astype(np.float32)
        self._deltas = np.diff(self.sigmas).tolist()

    def reset(self) -> None:
        """Euler keeps no history; present for the common sampler interface."""

    def step(self, model_output: mx.array, i: int, sample: mx.array) -> mx.array:
        if not 0 <= i < len(self._deltas):
            raise ValueError(f"step index {i} is outside 0..{len(self._deltas) - 1}")
        velocity = model_output.astype(mx.float32)
        return sample.astype(mx.float32) + velocity * self._deltas[i]
