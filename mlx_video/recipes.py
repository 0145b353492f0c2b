"""Few-step recipes: the published settings of step-distillation LoRAs, selected with `--recipe NAME`.

A recipe fills the settings the user left unset (an explicit option always wins). It does not fetch or pick
the LoRA files themselves: pass them with --lora-high / --lora-low (or --lora), as the recipe's `loras` says.

Numbers (ModelTC/Wan2.2-Lightning README.md and wan/configs/wan_{t2v,i2v}_A14B.py; ModelTC/LightX2V
configs/distill/*.json and step_distill/scheduler.py): Wan2.2-Lightning and the lightx2v Wan2.2 distill LoRAs both train on the
timesteps [1000, 937.5, 833.33, 625] = σ of linspace(1, 0, 5) shifted by 5, sampled with the flow Euler rule
x += (σ_next − σ)·v, without classifier-free guidance; the A14B boundary then gives high, high, low, low.
With --steps N the same rule is extended: linspace(1, 0, N+1) shifted by 5 (the shifted-linear schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MlxVideoError


def _shifted(steps: int, shift: float) -> list[float]:
    grid = [1.0 - i / steps for i in range(steps)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in grid]


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]  # registry ids it was published for
    settings: dict  # GenerationSettings fields
    loras: str  # which files go where, for the user
    source: str
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


_FOUR_STEP = {"sigmas": _shifted(4, 5.0), "shift": 5.0, "sampler": "euler", "schedule": "shifted-linear",
              "guidance": 1.0, "guidance_2": 1.0}

RECIPES = {
    r.name: r
    for r in [
        Recipe(
            "lightning", ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"), _FOUR_STEP,
            "--lora-high .../high_noise_model.safetensors --lora-low .../low_noise_model.safetensors",
            "lightx2v/Wan2.2-Lightning (Wan2.2-{T2V,I2V}-A14B-4steps-lora-rank64-Seko-V1.1)",
            "Wan2.2-Lightning: 4 steps, flow Euler, shift 5, timesteps 1000, 937.5, 833.33, 625, no CFG",
        ),
        Recipe(
            "lightx2v", ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"), _FOUR_STEP,
            "--lora-high ..._high_noise_lora_rank64_lightx2v_4step_*.safetensors "
            "--lora-low ..._low_noise_lora_rank64_lightx2v_4step_*.safetensors",
            "lightx2v/Wan2.2-Distill-Loras",
            "lightx2v Wan2.2 distill LoRAs: the same 4-step grid (the deterministic Wan2.2 scheduler is the Euler rule)",
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise MlxVideoError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def apply_recipe(s, spec) -> None:
    """Fill the unset fields of settings `s` (a GenerationSettings) from its recipe, for model `spec`."""
    recipe = get_recipe(s.recipe)
    if spec.id not in recipe.models:
        raise MlxVideoError(f"recipe {recipe.name} was published for {', '.join(recipe.models)}, not {spec.id}")
    values = dict(recipe.settings)
    if s.steps is not None or s.sigmas is not None:
        values.pop("sigmas")  # the user's step count: the recipe's shifted-linear rule over that many steps
    for name, value in values.items():
        if name == "guidance_2" and spec.experts < 2:
            continue
        if getattr(s, name) is None:
            setattr(s, name, list(value) if isinstance(value, list) else value)


def describe_recipes() -> str:
    """The recipes, for `mlxvid models`."""
    lines = ["few-step recipes (--recipe NAME; pass the LoRAs too):"]
    for r in RECIPES.values():
        timesteps = ", ".join(f"{1000 * s:g}" for s in r.settings["sigmas"])
        lines.append(f"  {r.name}: {r.description}\n    models {', '.join(r.models)}; timesteps {timesteps}; "
                     f"LoRAs: {r.loras}\n    from huggingface.co/{r.source.split(' ')[0]}")
    return "\n".join(lines)
