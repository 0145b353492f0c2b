"""`generate --upscale`: a run, then its super-resolution stage, decoded at the high resolution, in one command.

The super-resolution model is the registry's model of task "sr" whose `extra["upscales"]` lists the run's model and
whose `extra["output_resolution"]` is the resolution asked for; its folder is `--upscale-model` (a folder or a
registry id), else the registry id's folder under the models home. With `--preset` and `--quality high` the model's
stage is picked where the delivery is at least its size (`planned_upscale`). Everything is settled before any
weights are read (`upscale_job`); the run keeps each finished stage's latents beside its output until the output is
written (`StageStore`), so the same command resumes after an interruption. The SR stage itself is what
`mlxvid upscale` runs on saved latents (`mlx_video.upscale`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import click
import numpy as np

from .errors import MlxVideoError


def sr_spec_for(model_id: str, resolution: str | None = None):
    """The super-resolution model that takes `model_id`'s runs (to `resolution`, when given), or an error naming
    the models that have one."""
    from .registry import sr_models, sr_stages

    takes = sr_stages(model_id)
    if not takes:
        having = sorted({m for s in sr_models() for m in s.extra.get("upscales", ())})
        raise MlxVideoError(f"{model_id} has no super-resolution stage; --upscale is for {', '.join(having) or 'none'}")
    matching = [s for s in takes if resolution in (None, s.extra.get("output_resolution"))]
    if not matching:
        other = takes[0]
        raise MlxVideoError(f"--upscale {resolution}: {model_id}'s runs upscale to {other.extra['output_resolution']} "
                            f"({other.id}); give --upscale {other.extra['output_resolution']}")
    return matching[0]


def planned_upscale(o: dict, spec, preset) -> str | None:
    """The --upscale stage of a generate run: the one asked for; else, with --preset and --quality high, the
    model's super-resolution stage when its output's shorter side is at most the delivery's (a 720p model to a
    1080p delivery: 1080p; a 480p model: 720p), the rest of the way being the delivery's LANCZOS scaling; else none
    (and for a chain of clips, which has no such stage)."""
    from .chains import extension_frames
    from .registry import sr_stages

    asked = o.get("upscale")
    if asked is not None:
        return None if asked == "none" else asked
    if preset is None or o.get("quality") != "high":
        return None
    stages = sr_stages(spec.id)
    if not stages or min(stages[0].sizes[0]) > min(preset.width, preset.height) or extension_frames(o, spec):
        return None
    return stages[0].extra["output_resolution"]


def sr_folder(o: dict, base_spec, resolution: str):
    """The super-resolution model folder of a generate --upscale run (--upscale-model, else the registry model's
    folder under the models home), opened (manifest and configs, no weights) and checked to take the run's model."""
    from .model_folder import ModelFolder, resolve_model
    from .registry import MODELS, models_home

    spec = sr_spec_for(base_spec.id, resolution)
    named = o.get("upscale_model")
    if named is None:
        home = models_home() / spec.id
        if not (home / "mlxvid.json").is_file():
            raise MlxVideoError(
                f"--upscale {resolution} runs {spec.id}, which is not converted (looked in {home}): convert it from its "
                f"release (mlxvid convert RELEASE_FOLDER {home} --base {spec.id}), or name its folder with "
                "--upscale-model PATH" + ("" if o.get("upscale") else "; --upscale none delivers without it"))
        folder = ModelFolder.open(home)
    else:
        folder = resolve_model(str(named))
    model = folder.manifest.get("model")
    known = MODELS.get(model)  # the registry says which runs it takes; a folder of another SR model: its task
    if folder.spec.task != "sr" or (known is not None and base_spec.id not in known.extra.get("upscales", ())):
        raise MlxVideoError(f"--upscale-model {folder.path} is {model}, not a super-resolution model that takes "
                            f"{base_spec.id}'s runs ({spec.id} does)")
    return folder


@dataclass
class UpscaleJob:
    """A generate run followed by its super-resolution stage, settled and checked: the base run (a `run.Job`, whose
    output, delivery and interpolation apply to the upscaled video), the SR pipeline and its settings."""

    options: dict
    base: object  # run.Job
    sr: object  # the super-resolution pipeline (its folder opened, no weights read)
    settings: object  # the SR run's GenerationSettings, resolved (the high-resolution size)
    reference: np.ndarray | None  # an image-to-video run's image (uint8), encoded again at the high resolution
    estimate: dict

    @property
    def output(self):
        return self.base.output

    @property
    def upscale_steps(self) -> int:
        """The SR stage's denoising steps (after the base run's)."""
        return int(self.settings.steps)

    def summary(self) -> str:
        s = self.settings
        return (f"{self.base.summary()}; then {self.sr.spec.id}: {s.width}x{s.height}, {s.steps} steps (shift {s.shift}, "
                f"guidance {s.guidance}), decoded at that size")

    def record(self) -> dict:
        rec = self.base.record(options=self.options)
        s = self.settings
        rec.update(render_size=[s.width, s.height], memory_estimate=self.estimate,
                   upscale={**s.to_dict(), "model": self.sr.spec.id, "model_folder": str(self.sr.folder.path)})
        return rec

    def execute(self, echo=click.echo, hooks=()) -> dict:
        return run_upscaled(self, echo, hooks)


def upscale_job(o: dict, resolution: str, pipe, prepare_base) -> UpscaleJob:
    """Settle a generate --upscale run before any weights are read: the base run (`prepare_base(options)`, a
    one-clip run.Job), the SR folder, the high-resolution settings, the memory of every stage."""
    from .chains import extension_frames
    from .distributed import world_size
    from .pipelines.base import GenerationSettings, load_pipeline
    from .presets import quality_profiles

    if extension_frames(o, pipe.spec) is not None:
        raise MlxVideoError("--upscale makes one clip: give at most one clip's --frames or --duration")
    if world_size() > 1:
        raise MlxVideoError("--upscale runs on one process; launch it without mlx.launch")
    check_one_run_options(o, resolution)
    sr = load_pipeline(sr_folder(o, pipe.spec, resolution))
    base = prepare_base(dict(o, upscale="none", upscale_model=None))
    if base.output is None and base.save_latents is None:
        raise MlxVideoError("--upscale needs --output or --save-latents")
    b = base.settings
    width, height = sr.output_size(b.width, b.height)
    steps = quality_profiles(sr.spec)[o["quality"]]["steps"] if o.get("quality") else None
    settings = sr.resolve(GenerationSettings(prompt=b.prompt, negative_prompt=b.negative_prompt, width=width,
                                             height=height, frames=b.frames, seed=b.seed, fps=b.fps, steps=steps))
    reference = None
    if b.image is not None:
        from .io.image import load_image

        reference = load_image(b.image)
    estimate = upscale_memory(base, sr, settings, o.get("max_memory"))
    return UpscaleJob(o, base, sr, settings, reference, estimate)


def check_one_run_options(o: dict, resolution: str) -> None:
    """Refuse --cache and --attention radial with an SR stage: they are settings of one denoising run, and the SR
    models run neither (step-distilled, their condition changes mid-run; no radial parameters)."""
    from .pipelines.attention_mode import parse_attention
    from .pipelines.cache import parse_cache

    given = [f"--cache {o['cache']}"] if parse_cache(o.get("cache")) is not None else []
    if parse_attention(o.get("attention")).name != "dense":
        given.append(f"--attention {o['attention']}")
    if given:
        raise MlxVideoError(f"{' and '.join(given)} with --upscale {resolution}: the super-resolution stage runs "
                            "without them. Give --upscale none, or run the base with them and --save-latents, then "
                            "`mlxvid upscale` its latents")


def upscale_memory(base, sr, settings, max_memory_gb: float | None) -> dict:
    """Each stage's estimated peak, refused (as `Pipeline.check_memory`) when the largest is over the limit: the base
    run's encoding and denoising at its size, the SR model's denoising ("upscaling") and the base model's image
    encoding and decoding at the high resolution."""
    from .pipelines.base import GenerationSettings, available_memory_bytes, format_bytes

    has_image = base.pixels is not None
    low = base.pipe.estimate_memory(base.settings, "off", has_image)["stages"]
    high_settings = base.pipe.resolve(GenerationSettings.from_dict(
        dict(base.settings.to_dict(), width=settings.width, height=settings.height)))
    high = base.pipe.estimate_memory(high_settings, base.vae_tiling, has_image)["stages"]
    stages = {k: v for k, v in low.items() if k != "decoding"}
    if has_image:
        stages["image_encoding"] = high.get("image_encoding", stages.get("image_encoding", 0))
    stages["upscaling"] = sr.estimate_memory(settings)["stages"]["denoising"]
    if base.output is not None:
        stages["decoding"] = high["decoding"]
    peak = max(stages, key=stages.get)
    limit = available_memory_bytes() if max_memory_gb is None else int(max_memory_gb * 1024**3)
    if limit is not None and stages[peak] > limit:
        per_stage = ", ".join(f"{k} {format_bytes(v)}" for k, v in stages.items())
        raise MlxVideoError(f"this run needs about {format_bytes(stages[peak])} at its peak ({peak}; per stage: "
                            f"{per_stage}) but {format_bytes(limit)} are available. Try a smaller --size, a quantized "
                            "conversion, or without --upscale; --max-memory GB overrides the limit (estimates)")
    return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak], "limit_bytes": limit}


class StageStore:
    """The finished stages of a generate --upscale run (the base latents, then the upscaled ones), kept beside its
    output until the output is written, so that the same command, interrupted, resumes after the last finished
    stage. A fingerprint of what decides each stage's latents (model folders, resolved settings, the image, the
    starting latents) must match; delivery options may change freely."""

    def __init__(self, job: UpscaleJob):
        import hashlib
        import json

        from .distributed import folder_fingerprint

        beside = job.base.output or job.base.save_latents
        self.folder = beside.with_name(f".{beside.name}.upscale")
        base = {"model": folder_fingerprint(job.base.pipe.folder.path), "settings": job.base.settings.to_dict(),
                "image": None if job.base.pixels is None else hashlib.sha256(job.base.pixels.tobytes()).hexdigest(),
                "init_latents": None if job.base.init_latents is None else
                hashlib.sha256(np.ascontiguousarray(job.base.init_latents).tobytes()).hexdigest()}
        upscaled = {"base": base, "model": folder_fingerprint(job.sr.folder.path), "settings": job.settings.to_dict()}
        self.keys = {name: hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
                     for name, key in (("base", base), ("upscaled", upscaled))}

    def load(self, stage: str):
        """(latents, timings) kept for `stage` by this same run, or None."""
        import json

        try:
            with np.load(self.folder / f"{stage}.npz", allow_pickle=False) as data:
                if str(data["key"]) != self.keys[stage]:
                    return None
                return data["latents"], json.loads(str(data["timings"]))
        except (OSError, ValueError, KeyError):
            return None

    def save(self, stage: str, latents: np.ndarray, timings: dict) -> None:
        import json

        from .io.atomic import atomic_file

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / f"{stage}.npz", overwrite=True, now=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, latents=latents, key=np.array(self.keys[stage]), timings=np.array(json.dumps(timings)))

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def run_stage(store: StageStore, stage: str, make, echo) -> tuple[np.ndarray, dict]:
    """A stage's (latents, timings): read back from `store` when this run kept them, else made and kept."""
    kept = store.load(stage)
    if kept is not None:
        if echo is not None:
            echo(f"resuming: the {stage} latents read back from {store.folder}")
        return kept
    latents, timings = make()
    store.save(stage, latents, timings)
    return latents, timings


def run_upscaled(job: UpscaleJob, echo=click.echo, hooks=()) -> dict:
    """The base run, its SR stage and the output at the high resolution (decoded, delivered, written with its
    sidecar), each stage kept until the output is written (`StageStore`)."""
    base, quiet = job.base, job.base.quiet
    if not quiet:
        echo(job.summary())
    store = StageStore(job)
    say = None if quiet else echo

    def make_base():
        result = base.generate(echo, hooks)  # with the run's preview, if asked
        return result.latents, result.timings

    low, timings = run_stage(store, "base", make_base, say)
    high, sr_timings = run_stage(store, "upscaled", lambda: upscale_stage(job, low, hooks), say)
    timings = {**timings, **{f"upscale_{k}": v for k, v in sr_timings.items()}}
    record = job.record()
    high_res = base.pipe.resolve(replace(base.settings, width=job.settings.width, height=job.settings.height))
    written = replace(base, settings=high_res).finish(high, record, timings, echo)  # decoded at the high size
    store.remove()
    return {"settings": base.settings, "outputs": written, "timings": timings, "record": record, "pipe": base.pipe,
            "latents": high}


def upscale_stage(job: UpscaleJob, low: np.ndarray, hooks=()) -> tuple[np.ndarray, dict]:
    """The SR stage on the base run's latents: the prompt (and an I2V run's image, at the high resolution) encoded by
    the base model's folder, then the SR model, its steps running `hooks` (told first, where they have
    `begin_stage`, that stage "upscaling" starts)."""
    from .pipelines.base import GenerationSettings

    for hook in hooks:
        if hasattr(hook, "begin_stage"):
            hook.begin_stage("upscaling")
    base, sr, s = job.base, job.sr, job.settings
    quiet = base.quiet
    start = time.perf_counter()
    context = base.pipe.encode(base.pipe.resolve(GenerationSettings.from_dict(
        dict(base.settings.to_dict(), guidance=s.guidance))), progress=not quiet)
    states = None if job.reference is None else sr.encode_reference(base.pipe, job.reference, s, progress=not quiet)
    encoded = time.perf_counter() - start
    result = sr.upscale(s, low, progress=not quiet, context=context, image_states=states, hooks=hooks)
    return np.asarray(result.latents, dtype=np.float32), {"encoding": encoded, **result.timings}
