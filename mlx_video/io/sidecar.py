"""The JSON sidecar written next to each output: the settings, stage timings and software that made it."""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import platform
from fractions import Fraction
from pathlib import Path, PurePath

import numpy as np

from .. import __version__
from .atomic import atomic_file


def versions() -> dict:
    """Versions of the software that produced an output, and whether Metal was available."""
    import av
    import mlx.core as mx

    return {
        "mlxvid": __version__,
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "av": av.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "metal_available": bool(mx.metal.is_available()),
    }


SIDECAR_REPLACES_SUFFIX = (".mp4", ".mov", ".npy")


def sidecar_path(output_path: str | os.PathLike) -> Path:
    """`out.mp4` -> `out.json`, `out.npy` -> `out.json`; a PNG folder `frames-1.0/` -> `frames-1.0.json` (beside
    the folder, not in it)."""
    output_path = Path(output_path)
    if output_path.suffix.lower() in SIDECAR_REPLACES_SUFFIX and not output_path.is_dir():
        return output_path.with_suffix(".json")
    return output_path.with_name(output_path.name + ".json")


def write_sidecar(
    output_path: str | os.PathLike,
    settings: dict,
    timings: dict,
    overwrite: bool = False,
) -> Path:
    """Write `<output>.json` beside `output_path`, atomically; `timings` maps stage name to seconds."""
    path = sidecar_path(output_path)
    record = {
        "settings": to_jsonable(settings),
        "timings": to_jsonable(timings),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def to_jsonable(value):
    """`value` with numpy scalars and arrays, tuples, sets, paths and the like made JSON-serialisable.

    Non-finite floats become the strings "nan", "inf", "-inf" (JSON has no such numbers), and anything
    unknown becomes its `str`, so that recording settings can never fail at the end of a long run.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(item) for item in value), key=repr)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Fraction):
        return str(value) if value.denominator != 1 else value.numerator
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)
