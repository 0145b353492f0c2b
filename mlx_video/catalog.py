"""`mlxvid models`: what the registry knows, what is converted here, and what a default run would need."""

from __future__ import annotations

import json
from pathlib import Path

DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def converted_folder(spec) -> dict | None:
    """The converted folder of a registry model in the models home, if there is one."""
    from .registry import models_home

    path = models_home() / spec.id
    try:
        manifest = json.loads((path / "mlxvid.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict):
        return None
    return {"path": str(path), "bytes": folder_bytes(path), "dtype": manifest.get("dtype"),
            "quantization": (manifest.get("quantization") or {}).get("mode") if isinstance(manifest.get("quantization"), dict)
            else manifest.get("quantization")}


def default_peak_bytes(spec, dtype: str = "bf16", quantize: str | None = None) -> int | None:
    """Estimated peak memory of a run at the published defaults (the family's cost model)."""
    from .families import cost_model

    w, h = spec.default_size
    try:
        estimate = cost_model(spec.family).estimate_peak_memory(spec, w, h, spec.default("frames"), dtype=dtype,
                                                                quantize=quantize, guidance=spec.cfg_by_default)
    except Exception:  # a family without a cost model for this entry: say unknown rather than fail the listing
        return None
    return int(estimate.peak_bytes)


def folder_peak_bytes(path) -> int | None:
    """Estimated peak memory of a default run of a converted folder, from the folder itself (its configs and
    stored bytes: the estimate generate's preflight makes); None where the folder cannot say (e.g. a model that
    needs an input to settle its size)."""
    from .pipelines.base import GenerationSettings, Pipeline

    try:
        pipe = Pipeline.from_pretrained(str(path))
        settings = pipe.resolve(GenerationSettings(prompt="a default run"))
        return int(pipe.estimate_memory(settings)["peak_bytes"])
    except Exception:  # noqa: BLE001 -- the listing says "estimated from the registry" instead
        return None


def model_info(spec) -> dict:
    from .pipelines.base import available_memory_bytes
    from .presets import quality_profiles

    here = converted_folder(spec)
    dtype = DTYPE_NAMES.get(here["dtype"], "bf16") if here else "bf16"
    quant = here["quantization"] if here else None
    peak = folder_peak_bytes(here["path"]) if here else None
    source = "the converted folder" if peak is not None else "the registry"
    if peak is None:
        peak = default_peak_bytes(spec, dtype, quant if quant in ("q8", "q4", "fp8") else None)
    return {"id": spec.id, "family": spec.family, "task": spec.task, "experts": spec.experts,
            "defaults": {k: v for k, v in spec.defaults.items() if k != "negative_prompt"},
            "sizes": [list(s) for s in spec.sizes], "frame_rule": spec.frame_rule,
            "quality": {q: {"sizes": [list(s) for s in p["sizes"]], "steps": p["steps"]}
                        for q, p in quality_profiles(spec).items()},
            "recipes": model_recipes(spec), "upscale": upscale_stages(spec), "converted": here, "hf_repo": spec.hf_repo, "estimated_peak_bytes": peak,
            "estimated_for": {"dtype": dtype, "quantization": quant, "from": source},
            "available_bytes": available_memory_bytes()}


def upscale_stages(spec) -> list[dict]:
    """The super-resolution stages of this model's runs: [{"upscale": the --upscale choice, "model": the SR model's
    registry id}], from the SR models' `extra["upscales"]`."""
    from .registry import sr_stages

    return [{"upscale": s.extra.get("output_resolution"), "model": s.id} for s in sr_stages(spec.id)]


def model_recipes(spec) -> list[str]:
    """The names of the published few-step recipes for this model (mlx_video.recipes)."""
    try:
        from .recipes import all_recipes
    except ImportError:
        return []
    return [r.name for r in all_recipes().values() if spec.id in r.models]


def describe(spec) -> str:
    from .families import get_family
    from .pipelines.base import format_bytes

    info = model_info(spec)
    d = spec.defaults
    sizes = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
    guidance = f"{d.get('guidance')}" + (f" / {d.get('guidance_2')} (second expert)" if spec.experts == 2 else "")
    shape = f"{spec.experts} experts, boundary {d.get('boundary')}" if spec.experts == 2 else "one model"
    lines = [
        f"{spec.id}  ({get_family(spec.family).title})",
        f"  task {spec.task}, {shape}",
        f"  steps {d.get('steps')}, shift {d.get('shift')}, guidance {guidance}, sampler {d.get('sampler')}"
        + (f", schedule {d['schedule']}" if d.get("schedule") else ""),
        f"  {d.get('frames')} frames ({spec.frame_rule}) at {d.get('fps')} fps "
        f"(longest clip {d.get('max_frames') or d.get('frames')} frames); sizes {sizes}",
        "  quality: " + "; ".join(f"{q} {'/'.join(f'{w}x{h}' for w, h in p['sizes'])}, {p['steps']} steps"
                                  for q, p in info["quality"].items()),
    ]
    recipes = model_recipes(spec)
    if recipes:
        lines.append("  few-step recipes (--recipe NAME, with its LoRAs): " + ", ".join(recipes))
    for stage in info["upscale"]:
        lines.append(f"  super-resolution: --upscale {stage['upscale']} runs {stage['model']} after the base run")
    here = info["converted"]
    if here:
        lines.append(f"  converted here: {here['path']} ({format_bytes(here['bytes'])}, {here['dtype']}"
                     + (f", {here['quantization']}" if here["quantization"] else "") + ")")
    else:
        lines.append(f"  not converted here (mlxvid download {spec.id})")
    if info["estimated_peak_bytes"] is not None:
        avail = info["available_bytes"]
        fits = "" if avail is None else (" - fits" if info["estimated_peak_bytes"] <= avail else " - more than")
        fits += "" if avail is None else f" the {format_bytes(avail)} available now"
        lines.append(f"  default run: estimated peak {format_bytes(info['estimated_peak_bytes'])} "
                     f"({info['estimated_for']['dtype']}{', ' + here['quantization'] if here and here['quantization'] else ''}; "
                     f"from {info['estimated_for']['from']})"
                     + fits)
    if spec.hf_repo:
        lines.append(f"  weights: huggingface.co/{spec.hf_repo}")
    return "\n".join(lines)
