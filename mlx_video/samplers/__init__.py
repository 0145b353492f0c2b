"""Samplers for flow-matching video models: a sigma schedule (`schedules.py`) plus a step rule.

A step rule is built from a `Schedule` and offers:

    sigmas       np.ndarray float32, shape (steps + 1,): the noise levels, last entry 0
    timesteps    np.ndarray, shape (steps,): what the model receives at step i
    reset()      forget the multistep history; call before each run
    step(model_output, i, sample) -> next sample (mx.array, float32), for i = 0 .. steps − 1

A new step rule is one module with such a class plus an entry in SAMPLERS, naming the schedule it uses
when none is given (the one its reference implementation pairs it with); a new schedule is one function
plus an entry in `schedules.SCHEDULES`. The CLI's choices come from these two tables.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

from .euler import FlowEulerSampler
from .schedules import SCHEDULES, Schedule, explicit_schedule, make_schedule
from .unipc import FlowUniPCSampler


class Sampler(Protocol):
    sigmas: np.ndarray
    timesteps: np.ndarray

    def reset(self) -> None: ...

    def step(self, model_output: mx.array, i: int, sample: mx.array) -> mx.array: ...


# step rule name -> (class, the schedule it takes by default)
SAMPLERS: dict[str, tuple[type, str]] = {
    "unipc": (FlowUniPCSampler, "unipc-grid"),
    "euler": (FlowEulerSampler, "shifted-linear"),
}


def make_sampler(
    name: str,
    steps: int | None = None,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    *,
    schedule: str | Schedule | None = None,
) -> Sampler:
    """A step rule over a schedule: a schedule name (default: the rule's own), or a ready `Schedule`
    (e.g. `explicit_schedule(sigmas=[...])`, in which case `steps` and `shift` are not used)."""
    try:
        sampler_class, default_schedule = SAMPLERS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; known samplers: {known}") from None
    if not isinstance(schedule, Schedule):
        schedule = make_schedule(schedule or default_schedule, steps, shift, num_train_timesteps)
    return sampler_class(schedule)


__all__ = ["SAMPLERS", "SCHEDULES", "Sampler", "Schedule", "explicit_schedule", "make_sampler", "make_schedule"]
