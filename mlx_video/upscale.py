"""`mlxvid upscale`: a finished run's latents (the .npy of --save-latents and its sidecar) through a
super-resolution model, into latents at the higher resolution.

The super-resolution model is a registry model of task "sr" whose `extra["upscales"]` lists the run's model (or
`--model`). Its pipeline gives `output_size(width, height)` and `upscale(settings, low_res, context=...)`. The
prompt states come from the run's own model folder (`encode`), as the super-resolution release holds no text
encoder of its own. The result is a .npy with a sidecar naming the run's model, so `mlxvid decode` decodes it with
that model's VAE (the super-resolution models share it). An image-to-video run's image (the file its sidecar
names, checked against the digest recorded) is encoded again at the high resolution by the run's model folder
(`encode_reference`: its VAE and image encoder), as the official pipeline hands its reference image to the SR stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from .errors import MlxVideoError


def sr_model_for(model_id: str) -> str:
    """The registry's super-resolution model that takes `model_id`'s runs."""
    from .registry import sr_stages

    found = [s.id for s in sr_stages(model_id)]
    if not found:
        raise MlxVideoError(f"no super-resolution model takes {model_id}'s latents; name one with --model")
    return found[0]


def run_image(record: dict, latents_path: Path):
    """The (H, W, 3) uint8 image an image-to-video run's sidecar names (as given, else beside the latents), or None
    for a text-to-video run; refused when missing or not the file the run read (its recorded sha256)."""
    from .io.image import load_image
    from .io.source_video import input_sha256

    if record.get("image") is None:
        return None
    named = Path(record["image"])
    found = next((p for p in (named, Path(latents_path).parent / named.name) if p.is_file()), None)
    if found is None:
        raise MlxVideoError(f"the run's image {named} is not there (nor beside {latents_path}): upscaling an "
                            "image-to-video run encodes its image again at the high resolution")
    digest = ((record.get("input_files") or {}).get("image") or {}).get("sha256")
    if digest is not None and input_sha256(found) != digest:
        raise MlxVideoError(f"{found} is not the image the run was made from (its sha256 differs from the one "
                            "its sidecar records)")
    return load_image(found)


def upscale_latents(latents_path, output, model: str | None = None, seed: int | None = None,
                    overwrite: bool = False, quiet: bool = False, echo=click.echo) -> Path:
    """Upscale saved latents; writes `output` (.npy) and its sidecar, atomically. The SR run's estimated peak
    is checked against the memory available before any weights are read."""
    from .io.sidecar import sidecar_path
    from .pipelines.base import GenerationSettings
    from .run import check_output_writable, load_pipeline, read_sidecar, read_latents, save_latents_file

    latents_path, output = Path(latents_path), Path(output)
    if output.suffix.lower() != ".npy":
        raise MlxVideoError(f"--output {output} must be a .npy (decode it with `mlxvid decode`)")
    if not sidecar_path(latents_path).is_file():
        raise MlxVideoError(f"{latents_path} has no sidecar ({sidecar_path(latents_path).name}): upscaling needs the "
                            "run's prompt and model, which it records")
    record = read_sidecar(sidecar_path(latents_path))
    reference = run_image(record, latents_path)
    low_res = read_latents(latents_path)
    check_output_writable(output, overwrite)
    check_output_writable(sidecar_path(output), overwrite, "--output (its .json sidecar)")
    base_folder = record.get("model_folder")
    base = load_pipeline(base_folder if base_folder and Path(base_folder).is_dir() else record["model"])
    sr = load_pipeline(model or sr_model_for(base.spec.id))
    if sr.spec.task != "sr" or not hasattr(sr, "upscale"):
        raise MlxVideoError(f"{sr.spec.id} is not a super-resolution model")
    st, sh, sw = base.spec.vae_stride
    width, height = sr.output_size(low_res.shape[4] * sw, low_res.shape[3] * sh)
    frames = (low_res.shape[2] - 1) * st + 1
    settings = GenerationSettings(prompt=record.get("prompt") or "", negative_prompt=record.get("negative_prompt"),
                                  width=width, height=height, frames=frames,
                                  seed=record.get("seed", 0) if seed is None else seed)
    estimate = sr.check_memory(sr.resolve(settings), None)  # before any weights are read
    start = time.perf_counter()
    context = base.encode(base.resolve(GenerationSettings(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt, width=low_res.shape[4] * sw,
        height=low_res.shape[3] * sh, frames=frames, guidance=sr.resolve(settings).guidance, image=record.get("image"))),
        progress=not quiet)
    states = None if reference is None else sr.encode_reference(base, reference, settings, progress=not quiet)
    encoded = time.perf_counter() - start
    result = sr.upscale(settings, low_res, progress=not quiet, context=context, image_states=states)
    rec = {**record, "width": width, "height": height, "render_size": [width, height], "upscaled_from": str(latents_path),
           "upscale": {**result.settings.to_dict(), "model": sr.spec.id, "model_folder": str(sr.folder.path),
                       "memory_estimate": estimate}}
    save_latents_file(output, np.asarray(result.latents, dtype=np.float32), rec,
                      {"text_encoding": encoded, **result.timings}, overwrite, overwrite)
    echo(f"wrote {width}x{height} latents ({sr.spec.id}) to {output}; decode them with `mlxvid decode {output}`")
    return output
