"""The denoising loop every family shares, its guidance strategies and its per-step hooks.

    latents = denoise(sampler, latents, predict, hooks)

`predict(latents, i, t)` returns the model's velocity for step i (a family builds it: input preparation,
which transformer runs, guidance); the sampler turns it into the next latents; then each hook sees the
step; a hook that returns an array replaces the latents the next step starts from (None leaves them). The only
host synchronisation inside the loop is the NaN guard's check (one scalar per step).

Guidance strategies combine a conditional and an unconditional pass of `forward(x, t, cond)`:
    batched      both passes in one forward of batch 2 (the reference pipelines' way; fastest)
    sequential   two forwards of batch 1: the same numbers with half the activation memory
    none         the conditional pass alone (guidance 1, or a model with embedded guidance, which takes the
                 scale as an input inside `cond` and needs one pass)
`cond` and `uncond` are whatever the family's forward takes as conditioning (an array, or a tuple or dict of
arrays with a leading batch axis): batching concatenates them leaf by leaf.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import mlx.core as mx
from mlx.utils import tree_map

from ..errors import NonFiniteLatentsError

Forward = Callable[[mx.array, mx.array, object], mx.array]


def _batch(a, b):
    return tree_map(lambda x, y: mx.concatenate([x, y], axis=0), a, b)


def guidance_batched(forward: Forward, x, t, cond, uncond, scale: float) -> mx.array:
    if uncond is None or scale == 1.0:
        return forward(x, t, cond)
    out = forward(mx.concatenate([x, x]), mx.concatenate([t, t]), _batch(cond, uncond))
    n = x.shape[0]
    c, u = out[:n], out[n:]
    return u + scale * (c - u)


def guidance_sequential(forward: Forward, x, t, cond, uncond, scale: float) -> mx.array:
    if uncond is None or scale == 1.0:
        return forward(x, t, cond)
    c = forward(x, t, cond)
    u = forward(x, t, uncond)
    return u + scale * (c - u)


def guidance_none(forward: Forward, x, t, cond, uncond, scale: float) -> mx.array:
    return forward(x, t, cond)


GUIDANCE = {"batched": guidance_batched, "sequential": guidance_sequential, "none": guidance_none}


def get_guidance(name: str):
    try:
        return GUIDANCE[name]
    except KeyError:
        raise ValueError(f"unknown guidance mode {name!r}; choose one of {', '.join(GUIDANCE)}") from None


class StepHook(Protocol):
    def __call__(self, i: int, t, latents: mx.array) -> mx.array | None: ...


class NonFiniteGuard:
    """Stops the run at the first step whose latents hold NaN or inf, naming the step (`label(i)` adds which
    model ran). This is the loop's one host synchronisation per step."""

    def __init__(self, steps: int, label: Callable[[int], str] = lambda i: "model"):
        self.steps, self.label = steps, label

    def __call__(self, i: int, t, latents: mx.array) -> None:
        if not mx.all(mx.isfinite(latents)).item():
            raise NonFiniteLatentsError(
                f"step {i + 1}/{self.steps} (timestep {t}, {self.label(i)}) produced NaN or infinite latents; stopping "
                "now instead of producing noise. Check that the weights converted cleanly, or try --dtype fp32 at "
                "conversion"
            )


class ProgressHook:
    def __init__(self, bar, label: Callable[[int], str] | None = None):
        self.bar, self.label = bar, label

    def __call__(self, i: int, t, latents: mx.array) -> None:
        if self.label is not None:
            self.bar.set_postfix_str(self.label(i))
        self.bar.update()


def denoise(sampler, latents: mx.array, predict: Callable[[mx.array, int, object], mx.array],
            hooks: Iterable[StepHook] = ()) -> mx.array:
    """Run every step of `sampler` from `latents` (float32, any layout the family's predict takes)."""
    hooks = list(hooks)
    sampler.reset()
    for i, t in enumerate(sampler.timesteps):
        velocity = predict(latents, i, t)
        latents = sampler.step(velocity, i, latents)
        mx.eval(latents)
        for hook in hooks:
            replaced = hook(i, t, latents)
            if replaced is not None:  # a hook may hold part of the latents (see mlx_video.chains)
                latents = replaced
    return latents
