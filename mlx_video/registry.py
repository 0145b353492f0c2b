"""The models mlxvid knows, with the defaults their authors publish.

A variant is one entry here, not a code path. An entry is family-neutral: which family's code runs it
(`mlx_video.families`), its task, where its weights are published, the published sizes and frame rule, and
a `defaults` table of generation settings (the names of `GenerationSettings` fields plus the family's own,
such as Wan's expert `boundary`). A converted folder's manifest carries the defaults it was converted with,
so a folder whose model is not listed here (a fine-tune, a distilled checkpoint) still runs; the registry
fills in only what a manifest lacks (`ModelFolder.spec`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MlxVideoError
from .spec import ModelSpec  # noqa: F401  (the registry's entries; re-exported)

MODELS: dict[str, ModelSpec] = {}  # filled in place by collect_models()


def collect_models() -> dict[str, ModelSpec]:
    """(Re)build MODELS from the family packages' declared models (`mlx_video.families`)."""
    from .families import FAMILIES

    models: dict[str, ModelSpec] = {}
    for family in FAMILIES.values():
        for spec in family.models:
            if spec.family != family.name:
                raise MlxVideoError(f"{spec.id} is declared by family {family.name} but names family {spec.family}")
            if spec.id in models:
                raise MlxVideoError(f"model id {spec.id} is declared twice ({models[spec.id].family}, {family.name})")
            models[spec.id] = spec
    MODELS.clear()
    MODELS.update(models)
    return MODELS


def models_with_task(task: str) -> list[str]:
    """The registry ids of one task (e.g. "s2v", the audio-driven models), for messages."""
    return [spec.id for spec in MODELS.values() if spec.task == task]


def sr_models() -> list[ModelSpec]:
    """The super-resolution models (task "sr"): each takes finished runs of the models its `extra["upscales"]`
    lists, to its `extra["output_resolution"]`."""
    return [spec for spec in MODELS.values() if spec.task == "sr"]


def sr_stages(model_id: str) -> list[ModelSpec]:
    """The super-resolution models that take `model_id`'s runs."""
    return [spec for spec in sr_models() if model_id in spec.extra.get("upscales", ())]


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        raise MlxVideoError(f"unknown model {model_id!r}; known models: {', '.join(MODELS)}") from None


def models_home() -> Path:
    """Where `mlxvid convert` puts a registry model by default and `generate --model ID` looks for it."""
    return Path(os.environ.get("MLXVID_HOME", Path.home() / ".cache" / "mlxvid")) / "models"


collect_models()
