"""The per-video FLOP and time model of the ways to make a generation cheaper: dense attention, radial attention,
radial attention with a step cache, and a few-step recipe (Lightning) with both, from the family's cost model.

A run is a `RunPlan`: its steps, whether it guides (two forwards a step), which steps run the transformer (a step
cache skips the others) and, with radial attention, how many steps (counted over the whole run) and blocks stay
dense. Its FLOPs: every computed step costs the family's `step_flops`, less, on a sparse step, the self-attention
scores radial attention does not compute in the blocks past the dense ones (fraction from
`mlx_video.nn.radial.radial_score_fraction` on the step's token grid); a skipped step costs nothing (a
TaylorSeer forecast runs no part of the model; a reused MagCache step runs only the embeddings and the head,
which are left out). The text encoder is counted once per prompt. Time: the FLOPs over the chip's published
peak times an efficiency (an assumption; see `mlx_video.cost.predict`). The VAE decode is not modelled.

Only the caches whose decisions do not depend on the model's outputs can be counted ahead of a run: `magcache`
(a published table) and `taylorseer` (a fixed schedule). easycache and fbcache decide from the outputs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import mlx.core as mx

from . import cost as C
from .families import cost_model

DETERMINISTIC_CACHES = ("taylorseer", "magcache")


@dataclass(frozen=True)
class RunPlan:
    label: str
    steps: int
    guidance: bool
    computed: tuple[bool, ...]  # per step: the transformer runs (False: the step cache skipped it)
    sparse: bool = False  # radial attention
    radial: object | None = None  # its defaults (block, decay, dense_steps, dense_blocks, first_frame_dense)
    dense_steps: int | None = None  # dense steps of this run (None: the radial defaults' own)
    cache: str | None = None

    @property
    def evaluations(self) -> int:
        return sum(self.computed) * (2 if self.guidance else 1)


def expert_segments(spec, steps: int | None = None, sigmas=None) -> list[int]:
    """How many consecutive steps each model runs: a model with several experts switches where the timestep
    drops under its registry `boundary` x 1000 (the rule of the pipeline's `expert_schedule`), one model runs
    them all. `sigmas`: an explicit schedule (a recipe's), else the model's default sampler, schedule and shift."""
    from .samplers import explicit_schedule, make_sampler

    if sigmas is not None:
        timesteps = list(explicit_schedule(sigmas=sigmas).timesteps)
    else:
        timesteps = list(make_sampler(spec.default("sampler"), steps or spec.steps, spec.default("shift", 1.0),
                                      schedule=spec.default("schedule")).timesteps)
    boundary = spec.default("boundary")
    if spec.experts < 2 or boundary is None:
        return [len(timesteps)]
    high = sum(1 for t in timesteps if float(t) >= boundary * 1000)
    return [n for n in (high, len(timesteps) - high) if n]


class _Stub:
    """A stand-in transformer with the split forward, for replaying a cache's decisions (which must not read
    the outputs) without a model."""

    def __call__(self, x, t, context):
        return x

    def embed(self, x, t, context):
        return SimpleNamespace(hidden=x)

    def run_blocks(self, state, start=0, stop=None):
        return state

    def unembed(self, state):
        return state.hidden


def cache_computed_steps(option: str, spec, segments: list[int]) -> tuple[bool, ...]:
    """Which steps run the transformer under `--cache option` (a deterministic method), replayed through the
    step cache itself over the experts' segments."""
    from .pipelines.cache import make_step_cache

    labels = [str(k) for k, n in enumerate(segments) for _ in range(n)]
    cache = make_step_cache(option, len(labels), labels, spec.id)
    if cache.name not in DETERMINISTIC_CACHES:
        raise ValueError(f"{option}: only {', '.join(DETERMINISTIC_CACHES)} decide without the model's outputs")
    models = [_Stub() for _ in segments]
    x = mx.zeros((1, 1))
    for i, label in enumerate(labels):
        cache.begin_step(i, models[int(label)])
        cache(models[int(label)], x, mx.zeros((1,)), None)
    skipped = set(cache.stats()["reused_steps"]) | set(cache.stats()["forecast_steps"])
    return tuple(i not in skipped for i in range(len(labels)))


def plan_flops(spec, width: int, height: int, frames: int, plan: RunPlan, fraction: float | None) -> dict:
    """FLOPs of a run under `plan`; `fraction`: the radial score fraction of a sparse step (needed when the plan
    has radial attention)."""
    model = cost_model(spec.family)
    full = model.step_flops(spec, width, height, frames, plan.guidance)
    attention_per_block = model.step_flops(spec, width, height, frames, plan.guidance, layers=1).components[
        "self_attention"]
    blocks = round(full.components["self_attention"] / attention_per_block)
    sparse_saving = 0.0
    dense_steps = plan.steps
    if plan.sparse:
        dense_steps = plan.radial.dense_steps if plan.dense_steps is None else plan.dense_steps
        sparse_saving = max(0, blocks - plan.radial.dense_blocks) * attention_per_block * (1.0 - fraction)
    denoising = sum(full.total - (sparse_saving if i >= dense_steps else 0.0)
                    for i, ran in enumerate(plan.computed) if ran)
    text = model.video_flops(spec, width, height, frames, 1, plan.guidance)["text_encoder"]
    return {"denoising": denoising, "text_encoder": text, "total": denoising + text,
            "evaluations": plan.evaluations, "dense_steps": min(dense_steps, plan.steps) if plan.sparse else None}


def radial_parameters(spec):
    """The family's radial-attention defaults (block, decay, dense_steps, dense_blocks, first_frame_dense) and
    the score-fraction function, or (None, None, why not). The defaults are looked for as `radial`,
    `radial_defaults` or `RADIAL_DEFAULTS` on the registry entry, its transformer configuration, the module that
    defines that configuration, or the family's cost model."""
    try:
        from .nn.radial import radial_score_fraction
    except ImportError:
        return None, None, "mlx_video.nn.radial.radial_score_fraction is not available"
    config_module = sys.modules.get(type(spec.transformer).__module__)  # where the transformer's config lives
    for owner in (spec, spec.transformer, config_module, cost_model(spec.family)):
        for name in ("radial", "radial_defaults", "RADIAL_DEFAULTS"):
            found = getattr(owner, name, None)
            found = found(spec) if callable(found) else found
            if found is not None and hasattr(found, "dense_steps"):
                return found, radial_score_fraction, None
    return None, None, f"no radial-attention defaults found for the {spec.family} family"


def radial_fraction(spec, width: int, height: int, frames: int, radial, fraction_fn) -> float:
    t, h, w = cost_model(spec.family).token_grid(spec, width, height, frames)
    return float(fraction_fn(t, h, w, block=radial.block, decay=radial.decay,
                             first_frame_dense=getattr(radial, "first_frame_dense", True)))


def fastest_cache(spec, segments: list[int]) -> tuple[str, tuple[bool, ...]]:
    """The deterministic cache that runs the fewest steps at its defaults on this model, and its steps."""
    from .pipelines.cache import mag_tables

    options = ["taylorseer"] + (["magcache"] if spec.id in mag_tables() else [])
    runs = {o: cache_computed_steps(o, spec, segments) for o in options}
    best = min(options, key=lambda o: sum(runs[o]))
    return best, runs[best]


def speedup_plans(spec, radial, guidance: bool = True) -> list[RunPlan]:
    """At the model's defaults: dense, the fastest deterministic cache, radial, radial + that cache; and, when the
    model has a few-step recipe, the recipe alone and with radial + TaylorSeer, at radial's default dense steps and
    with them scaled to the run's length (ceil(dense steps x recipe steps / default steps)). The recipe rows use
    TaylorSeer, not MagCache: MagCache's ratios were calibrated on the base model's outputs, not the distilled
    one's. A plan with radial attention has `radial` None when radial attention is not available."""
    from .recipes import all_recipes

    steps = spec.steps
    name, computed = fastest_cache(spec, expert_segments(spec, steps))
    every = (True,) * steps
    plans = [RunPlan("dense", steps, guidance, every),
             RunPlan(name, steps, guidance, computed, cache=name),
             RunPlan("radial", steps, guidance, every, True, radial),
             RunPlan(f"radial + {name}", steps, guidance, computed, True, radial, cache=name)]
    recipe = next((r for r in all_recipes().values() if spec.id in r.models), None)
    if recipe is not None:
        sigmas = recipe.settings["sigmas"]
        few_guided = recipe.settings.get("guidance", 1.0) != 1.0
        computed = cache_computed_steps("taylorseer", spec, expert_segments(spec, sigmas=sigmas))
        plans.append(RunPlan(recipe.name, len(sigmas), few_guided, (True,) * len(sigmas)))
        few = RunPlan(f"{recipe.name} + radial + taylorseer", len(sigmas), few_guided, computed, True, radial,
                      cache="taylorseer")
        plans.append(few)
        if radial is not None and radial.dense_steps > 0:
            scaled = math.ceil(radial.dense_steps * len(sigmas) / steps)
            plans.append(replace(few, label=f"{few.label} ({scaled} dense steps)", dense_steps=scaled))
    return plans


def speedup_table(spec, width: int, height: int, frames: int, chips=("m3-ultra",), dtype: str = "bf16",
                  efficiency: float | None = None, guidance: bool = True) -> dict:
    """Each plan's FLOPs, its ratio to the dense run and the predicted minutes on `chips`; radial rows carry
    None with `radial_missing` saying why when radial attention is not available."""
    radial, fraction_fn, missing = radial_parameters(spec)
    fraction = radial_fraction(spec, width, height, frames, radial, fraction_fn) if radial is not None else None
    efficiency = C.DEFAULT_EFFICIENCY if efficiency is None else efficiency
    rows = []
    for plan in speedup_plans(spec, radial, guidance):
        if plan.sparse and plan.radial is None:
            rows.append({"plan": plan.label, "evaluations": plan.evaluations, "total": None})
            continue
        rows.append({"plan": plan.label, "cache": plan.cache, **plan_flops(spec, width, height, frames, plan,
                                                                             fraction)})
    dense = rows[0]["total"]
    for row in rows:
        row["fewer_flops"] = None if row["total"] is None else dense / row["total"]
        row["minutes"] = {c: None if row["total"] is None else
                          row["total"] / (_peak(c, dtype) * efficiency) / 60 for c in chips}
    return {"model": spec.id, "width": width, "height": height, "frames": frames,
            "tokens": cost_model(spec.family).tokens(spec, width, height, frames), "radial_fraction": fraction,
            "radial_missing": missing, "radial": _as_dict(radial), "efficiency": efficiency, "dtype": dtype,
            "rows": rows}


def _as_dict(radial) -> dict | None:
    if radial is None:
        return None
    return {k: getattr(radial, k) for k in ("block", "decay", "dense_steps", "dense_blocks", "first_frame_dense")
            if hasattr(radial, k)}


def _peak(chip: str, dtype: str) -> float:
    c = C.get_chip(chip)
    return (c.fp32_tflops if dtype == "fp32" else c.fp16_tflops) * 1e12
