"""The model families, discovered from their packages.

A family is one package here, `mlx_video/families/<name>/`, holding its configs, transformer, VAE, pipeline,
key tables, conversion planner, cost model and cache/preview tables; its `__init__.py` defines `FAMILY`, a
`mlx_video.spec.Family` that lists its published models and names its modules. The shared parts of the engine
(the denoising loop, samplers, model folders, the converter's machinery, memory preflight, outputs, CLI,
benchmarks) know no family by name: they look the family up here, the way mlx-lm picks a model class from a
config's `model_type`, and import its modules only when used.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace

from mlx_video.errors import MlxVideoError
from mlx_video.spec import Family

FAMILIES: dict[str, Family] = {}  # filled in place by discover()


def discover() -> dict[str, Family]:
    """(Re)read every package under this one (a folder added to `__path__` included) and rebuild `FAMILIES`."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise MlxVideoError(f"{module.__name__} is in the family folder but defines no FAMILY (a mlx_video.spec.Family)")
        if family.name in found:
            raise MlxVideoError(f"two family packages are named {family.name!r}")
        found[family.name] = replace(family, package=module.__name__)
    if sum(f.catch_all for f in found.values()) > 1:
        raise MlxVideoError("more than one family declares catch_all")
    FAMILIES.clear()
    FAMILIES.update(sorted(found.items(), key=lambda item: (item[1].order, item[0])))
    return FAMILIES


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise MlxVideoError(f"unknown model family {name!r}; this mlxvid knows {', '.join(FAMILIES)}") from None


def load(family: Family, path: str):
    """A module ("module") or one of its attributes ("module:attribute") of the family's package."""
    module, _, attr = path.partition(":")
    loaded = importlib.import_module(f"{family.package}.{module}")
    return getattr(loaded, attr) if attr else loaded


def pipeline_class(name: str, task: str | None = None):
    family = get_family(name)
    return load(family, dict(family.task_pipelines).get(task, family.pipeline))


def converter(name: str):
    return load(get_family(name), get_family(name).converter)


def cost_model(name: str):
    return load(get_family(name), get_family(name).cost)


def bench_module(name: str):
    """The family's benchmark cases (mlx_video/bench_case.py), or None where it declares none."""
    return optional_table(name, "bench")


def schedule_names() -> dict[str, str]:
    """{a family's name for a sigma schedule: the shared schedule's name}, over every family."""
    return {name: schedule for family in FAMILIES.values() for name, schedule in family.schedule_names}


def optional_table(name: str, field: str):
    """The family's table named by `field` ("latent_rgb", "mag_tables", "recipes", "bench"), or None where it has
    none."""
    family = get_family(name)
    path = getattr(family, field)
    return None if path is None else load(family, path)


discover()
