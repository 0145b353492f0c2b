"""Samplers for flow-matching video models.

Every sampler is built from (steps, shift, num_train_timesteps) and offers:

    sigmas       np.ndarray float32, shape (steps + 1,): the shifted noise levels, last entry 0
    timesteps    np.ndarray, shape (steps,): what the model receives at step i
    reset()      forget the multistep history; call before each run
    step(model_output, i, sample) -> next sample (mx.array, float32), for i = 0 .. steps − 1

A new sampler is one module with such a class, plus an entry in SAMPLERS.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

from .euler import FlowEulerSampler
from .unipc import FlowUniPCSampler


class Sampler(Protocol):
    sigmas: np.ndarray
    timesteps: np.ndarray

    def reset(self) -> None: ...

    def step(self, model_output: mx.array, i: int, sample: mx.array) -> mx.array: ...


SAMPLERS: dict[str, type] = {
    "unipc": FlowUniPCSampler,
    "euler": FlowEulerSampler,
}


def make_sampler(name: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> Sampler:
    try:
        sampler_class = SAMPLERS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; known samplers: {known}") from None
    return sampler_class(steps=steps, shift=shift, num_train_timesteps=num_train_timesteps)
