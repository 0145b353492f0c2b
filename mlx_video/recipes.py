"""Few-step recipes: the published settings of step-distillation LoRAs, selected with `--recipe NAME`.

A recipe fills the settings the user left unset (an explicit option always wins). It does not fetch or pick
the LoRA files themselves: pass them with --lora-high / --lora-low (or --lora), as the recipe's `loras` says.

Each family lists the recipes published for its models (`Family.recipes`, e.g. mlx_video/families/wan/step_recipes.py).
With --steps N a recipe's grid is extended by its own rule: linspace(1, 0, N+1) shifted (the shifted-linear
schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MlxVideoError


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]  # registry ids it was published for
    settings: dict  # GenerationSettings fields
    loras: str  # which files go where, for the user
    source: str
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


def all_recipes() -> dict[str, Recipe]:
    """Every family's published recipes by name (`Family.recipes`)."""
    from .families import FAMILIES, optional_table

    return {r.name: r for name in FAMILIES for r in (optional_table(name, "recipes") or [])}


def get_recipe(name: str) -> Recipe:
    recipes = all_recipes()
    try:
        return recipes[name]
    except KeyError:
        raise MlxVideoError(f"unknown recipe {name!r}; choose one of {', '.join(recipes)}") from None


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
    for r in all_recipes().values():
        timesteps = ", ".join(f"{1000 * s:g}" for s in r.settings["sigmas"])
        lines.append(f"  {r.name}: {r.description}\n    models {', '.join(r.models)}; timesteps {timesteps}; "
                     f"LoRAs: {r.loras}\n    from huggingface.co/{r.source.split(' ')[0]}")
    return "\n".join(lines)
