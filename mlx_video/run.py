"""The core of `mlxvid generate`, as functions: `generate`, `batch`, `decode` and the Python API call them.

    result = run_generation({"model": "wan2.2-ti2v-5b", "prompt": "a corgi surfing", "preset": "youtube-short",
                             "quality": "medium", "duration": 4, "overlay": ["Hook@0-2"]})

`options` is a dict keyed by generate's option names (long name, `-` as `_`). `prepare` checks everything and
settles the settings before any weights are read; `execute` runs the work and writes the outputs. Options this
module does not know are carried into the sidecar's "options" record untouched (a replay passes them back).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from .errors import MlxVideoError
from .interpolate import SCENE_THRESHOLD
from .options import given, parse_sigmas, parse_size, recorded_options, validate

def default_output(prompt: str, seed: int, folder: Path | None = None, suffix: str = ".mp4") -> Path:
    """`<first words of the prompt>-seed<N>.mp4` in `folder` (default: the current one), with -2, -3, ... added
    rather than clobbering a file (or its sidecar) that exists."""
    folder = Path.cwd() if folder is None else Path(folder)
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = "-".join(words)[:48].strip("-") or "video"
    stem = f"{slug}-seed{seed}"
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def check_output_writable(path: Path, overwrite: bool, option: str = "--output") -> None:
    """Refuse, before any work, an output that exists (without --overwrite) or whose folder cannot be written."""
    from .io.atomic import check_writable

    try:
        check_writable(path, overwrite)
        fd, probe = tempfile.mkstemp(prefix=".mlxvid-probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MlxVideoError(f"cannot write {option} {path}: {e.strerror or e}") from None


def check_output_kind(value) -> None:
    """A video output ends in .mp4 or .mov; anything else is a folder of PNG frames if it is written as one (a
    trailing slash: `frames-1.0/`), is an existing folder, or has no suffix."""
    from .io.video import is_video_file

    text = str(value)
    path = Path(text)
    as_folder = text.endswith(("/", os.sep))
    if as_folder and is_video_file(path):
        raise MlxVideoError(f"--output {text} ends in / (a folder of PNG frames) but is named like a video file; "
                            f"give {path.name} without the / for a video, or another folder name")
    if not (as_folder or is_video_file(path) or not path.suffix or path.is_dir()):
        raise MlxVideoError(f"--output takes a .mp4 or .mov file, or a folder for PNG frames, not {path.name} (a folder "
                            f"whose name has a dot: end it with /, e.g. {path.name}/)")


@dataclass
class Delivery:
    """What happens to the decoded frames: scaling to a preset's size, a new frame rate, text, a watermark."""

    width: int
    height: int
    fps: float
    preset: str | None = None
    fit: str = "crop"
    margins: dict | None = None
    overlays: list = field(default_factory=list)
    watermark: str | None = None
    watermark_corner: str = "bottom-right"
    font: str | None = None

    def record(self, render_size, render_fps) -> dict:
        return {"preset": self.preset, "width": self.width, "height": self.height, "fps": self.fps,
                "render_size": list(render_size), "render_fps": render_fps, "fit": self.fit,
                "frame_rate_conversion": "none" if self.fps == render_fps else "nearest frame in time",
                "overlays": [[o.text, o.start, o.end] for o in self.overlays], "watermark": self.watermark,
                "watermark_corner": self.watermark_corner if self.watermark else None}

    def apply(self, video: np.ndarray, render_fps: float) -> np.ndarray:
        from .overlay import burn
        from .presets import fit_frames, retime

        if (video.shape[2], video.shape[1]) != (self.width, self.height):
            video = fit_frames(video, self.width, self.height, self.fit)
        video = retime(video, render_fps, self.fps)  # a new array: drawn on in place
        return burn(video, self.fps, self.overlays, self.watermark, self.watermark_corner, self.margins, self.font,
                    in_place=True)


class DeliveryStream:
    """`Delivery.apply` one rendered frame at a time, for a video whose frames arrive in order (a chain of clips):
    `push(frame)` returns the delivered frames it becomes (none, one, or several: the frame-rate change repeats or
    drops frames, nearest in time over the whole video of `total` rendered frames). Same frames as `apply` on the
    whole video."""

    def __init__(self, delivery: Delivery, total: int, render_fps: float):
        from .presets import retime_indices

        self.delivery = delivery
        self.shows = retime_indices(total, render_fps, delivery.fps)  # rendered frame shown at each output frame
        self.rendered = self.delivered = 0

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        from .overlay import burn
        from .presets import fit_frames

        d, out, fitted = self.delivery, [], None
        while self.delivered < len(self.shows) and self.shows[self.delivered] == self.rendered:
            if fitted is None:
                fitted = frame[None] if (frame.shape[1], frame.shape[0]) == (d.width, d.height) else \
                    fit_frames(frame[None], d.width, d.height, d.fit)
            out.append(burn(fitted.copy(), d.fps, d.overlays, d.watermark, d.watermark_corner, d.margins, d.font,
                            in_place=True, first_index=self.delivered)[0])
            self.delivered += 1
        self.rendered += 1
        return out


INTERPOLATE_FACTORS = {"2x": 2, "4x": 4}


@dataclass
class Interpolation:
    """RIFE frame interpolation of the decoded frames (`--interpolate`), before any delivery step."""

    factor: int
    weights: Path  # a flownet.pkl or its converted folder, found (not read) while preparing
    scale: float = 1.0
    scene_threshold: float = SCENE_THRESHOLD

    def record(self, frames_before: int, frames_after: int, fps_before: float, fps_after: float,
               scene_cuts: list[int]) -> dict:
        return {"factor": self.factor, "model": "RIFE 4.25", "scale": self.scale, "weights": str(self.weights),
                "scene_threshold": self.scene_threshold, "frames_before": frames_before,
                "frames_after": frames_after, "fps_before": fps_before, "fps_after": fps_after,
                "scene_cuts": list(scene_cuts)}

    def interpolator(self):
        """The RIFE model loaded, as an `Interpolator` (frames in, frames out, streamed)."""
        from mlx_video.rife.weights import load_rife
        from .interpolate import Interpolator

        return Interpolator(load_rife(self.weights), self.factor, self.scale, self.scene_threshold)


def parse_interpolation(o: dict) -> Interpolation | None:
    """--interpolate 2x|4x with --rife-weights (default $MLXVID_HOME/models/rife); the weights are only found."""
    from mlx_video.rife.weights import find_weights
    from .registry import models_home

    value, weights = o.get("interpolate"), o.get("rife_weights")
    if value is None:
        if weights is not None:
            raise MlxVideoError("--rife-weights is for --interpolate 2x|4x")
        return None
    path = find_weights(Path(weights) if weights is not None else models_home() / "rife")
    return Interpolation(INTERPOLATE_FACTORS[value], path)


@dataclass
class Job:
    """A generation settled and checked, ready to run."""

    options: dict
    pipe: object
    settings: object
    output: Path | None
    save_latents: Path | None
    overwrite: bool
    quiet: bool
    vae_tiling: str
    image_fit: str
    pixels: np.ndarray | None
    init_latents: np.ndarray | None
    init_latents_path: Path | None
    estimate: dict
    delivery: Delivery | None
    quality: str | None = None
    duration: float | None = None
    preview_every: int | None = None
    interpolation: Interpolation | None = None
    inputs: dict = field(default_factory=dict)  # generate()'s other input arrays by keyword (last_image, ...)
    own_sidecar: bool = False  # the sidecar beside the output records this job (batch resume): replace it

    @property
    def frame_rate(self) -> float:
        """The rate of the frames that reach delivery: the model's, times the interpolation factor."""
        return self.settings.fps * (self.interpolation.factor if self.interpolation else 1)

    def summary(self) -> str:
        return summary_line(self)

    def execute(self, echo=click.echo, hooks=()) -> dict:
        return execute_clip(self, echo, hooks)

    def generate(self, echo=click.echo, hooks=()):
        """The pipeline's run of this job (its GenerationResult), with the step `hooks` and the preview's."""
        hooks = list(hooks)
        if self.preview_every:
            from .preview import make_preview_hook

            hooks.append(make_preview_hook(self.pipe, self.settings, self.init_latents, self.output or self.save_latents,
                                           self.preview_every, None if self.quiet else echo))
        kwargs = {"hooks": hooks, **self.inputs} if hooks else dict(self.inputs)
        return self.pipe.generate(self.settings, init_latents=self.init_latents, progress=not self.quiet,
                                  image=self.pixels, **kwargs)

    def finish(self, latents, record: dict, timings: dict, echo=click.echo, video=None) -> list[Path]:
        """Write the outputs of finished latents (`finish_clip`)."""
        return finish_clip(self, latents, record, timings, echo, video)

    def deliver(self, frames, total: int, fps: float, size_and_rate: tuple):
        """The frames through this job's delivery step (see `deliver`)."""
        return deliver(frames, self.delivery, total, fps, size_and_rate)

    def record(self, options: dict | None = None) -> dict:
        """The sidecar's record; `options`: the options to record when they are not this job's own (a chain's)."""
        s = self.settings
        record = s.to_dict()
        pipe = self.pipe
        record.update(model=pipe.spec.id, model_folder=str(pipe.folder.path), dtype=pipe.folder.manifest["dtype"],
                      init_latents=str(self.init_latents_path) if self.init_latents_path else None,
                      memory_estimate=self.estimate, image_fit=self.image_fit if s.image is not None else None,
                      quality=self.quality, duration=self.duration, render_size=[s.width, s.height],
                      options=recorded_options(self.options if options is None else options),
                      input_files=input_files(self.options if options is None else options))
        if self.delivery is not None:
            record["delivery"] = self.delivery.record((s.width, s.height), self.frame_rate)
            record["delivery_size"] = [self.delivery.width, self.delivery.height]
        return record


INPUT_OPTIONS = ("image", "last_image", "video", "control_video", "mask", "mask_video", "reference_image", "audio",
                 "pose_video", "face_video", "background_video", "init_latents")


def input_files(o: dict) -> dict:
    """Each input file of a run by option: its file name and sha256 (a folder of PNG frames: of its frames); a
    repeatable option's files as a list."""
    from .io.source_video import input_sha256

    def described(path) -> dict:
        return {"name": Path(path).name, "sha256": input_sha256(path)}

    return {name: [described(p) for p in o[name]] if isinstance(o[name], (list, tuple)) else described(o[name])
            for name in INPUT_OPTIONS if o.get(name) is not None}


def lora_options(o: dict) -> list[dict] | None:
    """--lora / --lora-high / --lora-low (PATH[:SCALE], repeatable) as settings records."""
    from .lora import parse_lora_option

    loras = []
    for option, target in (("lora", "all"), ("lora_high", "high"), ("lora_low", "low")):
        values = o.get(option) or ()
        for value in [values] if isinstance(values, str) else values:
            entry = parse_lora_option(value, "--" + option.replace("_", "-")) if isinstance(value, str) else dict(value)
            loras.append({**entry, "target": target})
    return loras or None


def load_pipeline(model: str, pipelines: dict | None = None):
    from .pipelines.base import Pipeline

    if pipelines is None:
        return Pipeline.from_pretrained(model)
    if model not in pipelines:
        pipelines[model] = Pipeline.from_pretrained(model)
    return pipelines[model]


def prepare(options: dict, pipe=None, pipelines: dict | None = None, output_folder: Path | None = None,
            check_memory: bool = True, own_sidecar: bool = False) -> Job:
    """Check every option (`mlx_video.options.validate`) and settle the settings against the model, before any
    weights are read. `own_sidecar`: the sidecar beside the output records this job (a batch resuming a job
    whose video was deleted) and is replaced."""
    from .chains import chain_job, extension_frames, plan_chain
    from .options import check_capabilities
    from .upscale_stage import planned_upscale, upscale_job

    o = validate(options)
    output, save_latents = _outputs(o, output_folder, own_sidecar)
    interpolation = parse_interpolation(o)
    if interpolation is not None and output is None:
        raise MlxVideoError("--interpolate works on the decoded video: give --output (not only --save-latents)")
    preset, overlays = _delivery_inputs(o)
    if pipe is None:
        pipe = load_pipeline(str(o["model"]), pipelines)
    check_capabilities(o, pipe)
    upscale = planned_upscale(o, pipe.spec, preset)
    if upscale is not None:  # the run, then its super-resolution stage (mlx_video.upscale_stage)
        return upscale_job(o, upscale, pipe, lambda base: prepare(base, pipe, output_folder=output_folder,
                                                                  check_memory=False, own_sidecar=own_sidecar))
    if o.get("upscale_model") is not None:
        raise MlxVideoError("--upscale-model names the model of --upscale: give --upscale too")
    if pipe.takes_audio:
        _check_audio_run(o, pipe.spec, output)
    elif pipe.takes_animate:
        _check_animate_run(o, pipe.spec)
    else:
        chain = extension_frames(o, pipe.spec)
        if chain is not None and given(o, "last_image"):
            raise MlxVideoError("--last-image ends one clip: give at most one clip's --frames (no chain of clips)")
        for name in ("video", "control_video"):
            if chain is not None and given(o, name):
                raise MlxVideoError(f"--{name.replace('_', '-')} makes one clip: give at most one clip's --frames "
                                    "(no chain of clips)")
        if chain is not None:  # longer than one clip, or prompts per segment: a chain of clips (mlx_video.chains)
            segments, method, first = plan_chain(o, pipe, *chain)
            base = prepare(first, pipe, output_folder=output_folder, check_memory=check_memory, own_sidecar=own_sidecar)
            return chain_job(o, base, segments, method, *chain)
    source = _source_frames(o, pipe.spec, pipe.takes_vace)
    if source is not None and o.get("frames") is None:
        o["frames"] = source.shape[0]  # the video's length (recorded, so a replay takes the same frames)
    settings = pipe.resolve(_settings(o, pipe, preset))
    delivery = _delivery(o, settings, preset, overlays, interpolation) if output is not None else None
    image_fit = o.get("image_fit") or pipe.default_image_fit
    pixels = _image_pixels(o, settings, image_fit)
    inputs = {} if o.get("last_image") is None else {"last_image": _image_pixels(o, settings, image_fit, "last_image")}
    inputs.update(pipe.source_inputs(o, settings, image_fit, None if source is None else source[:settings.frames]))
    if pipe.takes_animate and output is not None:  # its segments are kept beside the output until it is written
        inputs["segments_beside"] = output
    if output is not None and not pipe.can_decode:
        raise MlxVideoError(f"{pipe.folder.path} has no VAE (vae/), so it cannot write video; use --save-latents")
    vae_tiling = o.get("vae_tiling") or "auto"
    pipe.vae_tile(vae_tiling, (1, 1))  # validates the option before the long work
    latents = _init_latents(o, pipe, settings)
    encodes = pixels is not None or source is not None  # an approximation for a video: the image's encoding stage
    estimate = _estimate(o, pipe, settings, vae_tiling, encodes, output is not None, check_memory)
    return Job(o, pipe, settings, output, save_latents, bool(o.get("overwrite")), bool(o.get("quiet")), vae_tiling,
               image_fit, pixels, latents, o.get("init_latents"), estimate, delivery,
               o.get("quality"), o.get("duration"), o.get("preview_every"), interpolation, inputs, own_sidecar)


def _outputs(o: dict, output_folder: Path | None, own_sidecar: bool = False) -> tuple[Path | None, Path | None]:
    """(--output, --save-latents), the output named from the prompt when neither is given; both checked
    writable (with their sidecars; `own_sidecar`: the one there is this job's record, replaced) now. An output
    written with a trailing / is a folder of PNG frames (`check_output_kind`)."""
    from .distributed import rank as process_rank
    from .io.sidecar import sidecar_path

    output, save_latents = o.get("output"), o.get("save_latents")
    if output is None and save_latents is None:
        output = default_output(o["prompt"], o.get("seed") or 0, output_folder)
        o["output"] = output
    if save_latents is not None and save_latents.suffix != ".npy":
        raise MlxVideoError(f"--save-latents writes a .npy file, not {save_latents.name}")
    if output is not None:
        check_output_kind(output)
        output = Path(output)
    for path, option in ((save_latents, "--save-latents"), (output, "--output")):
        if path is not None and process_rank() == 0:  # on several processes, rank 0 alone writes
            check_output_writable(path, bool(o.get("overwrite")), option)
            check_output_writable(sidecar_path(path), bool(o.get("overwrite")) or own_sidecar,
                                  option + " (its .json sidecar)")
    return output, save_latents


def _delivery_inputs(o: dict):
    """(the preset, the parsed overlays), with every delivery input opened and checked (watermark image, font,
    overlay timings); characters the font cannot draw are warned about."""
    from .overlay import check_delivery, parse_overlay
    from .presets import get_preset

    overlays = [parse_overlay(v) if isinstance(v, str) else v for v in (o.get("overlay") or [])]
    for warning in check_delivery(overlays, o.get("watermark"), o.get("font")):
        click.echo(f"warning: {warning}", err=True)
    if o.get("duration") is not None and o.get("frames") is not None:
        raise MlxVideoError("give --duration or --frames, not both")
    return (get_preset(o["preset"]) if o.get("preset") else None), overlays


# options an audio-driven run cannot take, and why
_NOT_FOR_AUDIO = {"duration": "its length follows the --audio (stop earlier with --clips N)",
                  "save_latents": "it decodes each clip as it goes",
                  "init_latents": "each clip starts from its own seeded noise",
                  "segment_prompt": "its length follows the --audio", "segment_frames": "use --frames"}


# options a character-animation run (Wan2.2-Animate) cannot take, and why
_NOT_FOR_ANIMATE = {"frames": "the --pose-video's length sets it (--segment-frames sets each segment's)",
                    "duration": "the --pose-video's length sets it", "segment_prompt": "one prompt drives every segment",
                    "last_image": "the pose video drives the ending", "video": "it takes --pose-video and --face-video"}


def _check_animate_run(o: dict, spec) -> None:
    """Animate's segments are its own (the pipeline makes them): --segment-frames is the per-segment length, which
    the settings hold as their frames (a recorded run has both, equal, and replays)."""
    for name, why in _NOT_FOR_ANIMATE.items():
        if given(o, name) and not (name == "frames" and o["frames"] == o.get("segment_frames")):
            raise MlxVideoError(f"--{name.replace('_', '-')} is not supported for {spec.id}: {why}")
    if o.get("segment_frames") is not None:
        o["frames"] = o["segment_frames"]


def _check_audio_run(o: dict, spec, output) -> None:
    for name, why in _NOT_FOR_AUDIO.items():
        if given(o, name):
            raise MlxVideoError(f"--{name.replace('_', '-')} is not supported for {spec.id}: {why}")
    if output is None:
        raise MlxVideoError(f"{spec.id} writes a video: give --output")


def _settings(o: dict, pipe, preset):
    """The GenerationSettings the options ask for, before the model's defaults fill the rest (`Pipeline.resolve`):
    --size, else the preset's or the quality's size; --steps, else the quality's; --duration as frames."""
    from .pipelines.base import GenerationSettings
    from .presets import frames_for_duration, pick_render_size, quality_profiles

    spec, quality = pipe.spec, o.get("quality")
    width, height = parse_size(o.get("size"))
    steps, sigma_list = o.get("steps"), parse_sigmas(o.get("sigmas"), o.get("timesteps"))
    if sigma_list is not None and steps is not None and steps != len(sigma_list):
        raise MlxVideoError(f"--steps {steps} disagrees with the {len(sigma_list)} values of --sigmas/--timesteps; give one")
    profile = quality_profiles(spec)[quality] if quality else None
    if width is None and height is None:
        if preset is not None:
            (width, height), _ = pick_render_size(spec, preset.width, preset.height, quality or "high")
        elif profile is not None and not pipe.takes_audio:  # S2V: the portrait sets the size
            width, height = profile["sizes"][0]
    if steps is None and sigma_list is None and profile is not None and not o.get("recipe"):  # a recipe sets its own
        steps = profile["steps"]
    frames = o.get("frames")
    if o.get("duration") is not None:
        frames = frames_for_duration(spec, o["duration"], o.get("fps") or spec.default("fps"))
    return GenerationSettings(**dict(settings_from_options(o), width=width, height=height, frames=frames,
                                     steps=steps, sigmas=sigma_list, loras=lora_options(o)))


def settings_from_options(o: dict) -> dict:
    """The GenerationSettings fields that options set one to one (`Option.setting`, else the same name; paths
    as text); the derived ones (size, steps, frames, sigmas, LoRAs) are `_settings`'."""
    from dataclasses import fields

    from .options import GENERATE_OPTIONS
    from .pipelines.base import GenerationSettings

    names = {f.name: f for f in fields(GenerationSettings)}
    out = {}
    for option in GENERATE_OPTIONS:
        name, value = option.setting or option.name, o.get(option.name)
        if name not in names:
            continue
        if value is None:
            value = option.default if option.default is not None else names[name].default
        if isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[name] = str(value) if isinstance(value, Path) else value
    return out


def _delivery(o: dict, settings, preset, overlays, interpolation) -> Delivery | None:
    """The delivery step (preset size and rate, overlays, watermark), or None when there is nothing to do."""
    watermark = o.get("watermark")
    if preset is None and not overlays and watermark is None:
        return None
    corner = o.get("watermark_corner") or (preset.watermark_corner if preset else "bottom-right")
    rate = settings.fps * (interpolation.factor if interpolation else 1)
    w, h, fps = (preset.width, preset.height, preset.fps) if preset else (settings.width, settings.height, rate)
    return Delivery(w, h, fps, preset.name if preset else None, preset.fit if preset else "crop",
                    preset.margins if preset else None, overlays, watermark, corner,
                    str(o["font"]) if o.get("font") else None)


def _source_frames(o: dict, spec, extends: bool = False) -> np.ndarray | None:
    """--video's (or --control-video's) frames (uint8), as many as the run takes: --frames, else the video's, of
    the model's form. `extends`: a --video shorter than --frames is extended by the model (VACE)."""
    names = [name for name in ("video", "control_video") if o.get(name) is not None]
    if not names:
        return None
    if len(names) > 1:
        raise MlxVideoError("give --video (the clip to inpaint, outpaint or extend) or --control-video, not both")
    from .io.source_video import read_frames, settle_frame_count

    name, flag = names[0], "--" + names[0].replace("_", "-")
    if o.get("duration") is not None:
        raise MlxVideoError(f"{flag} sets the length: give --frames (its first N frames), not --duration")
    longest = int(spec.default("max_frames") or spec.default("frames"))
    frames = read_frames(o[name], (o.get("frames") or longest) + 1, flag)
    count = settle_frame_count(len(frames), o.get("frames"), spec.frame_stride, longest, o[name], spec.id, flag,
                               shorter=extends and name == "video")
    return frames[:count]


def _image_pixels(o: dict, settings, image_fit: str, name: str = "image") -> np.ndarray | None:
    if o.get(name) is None:
        return None
    from .io.image import fit_image, load_image

    return fit_image(load_image(o[name]), settings.width, settings.height, mode=image_fit)


def _init_latents(o: dict, pipe, settings) -> np.ndarray | None:
    path = o.get("init_latents")
    if path is None:
        return None
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MlxVideoError(f"cannot read --init-latents {path}: {e}") from None
    return pipe.check_init_latents(settings, latents)


def _estimate(o: dict, pipe, settings, vae_tiling: str, has_image: bool, decodes: bool, check_memory: bool) -> dict:
    """The memory preflight (refusing a run that would not fit), or an empty estimate when not checked; a run
    that only saves latents has no decoding stage."""
    if not check_memory:
        return {"stages": {}, "peak_stage": None, "peak_bytes": 0}
    limit = None if o.get("max_memory") is None else int(o["max_memory"] * 1024**3)
    estimate = pipe.check_memory(settings, limit, vae_tiling if decodes else "off", has_image)
    if not decodes:
        estimate["stages"].pop("decoding", None)
    return estimate


def summary_line(job: Job) -> str:
    from .pipelines.base import format_bytes

    s, pipe = job.settings, job.pipe
    guidance_text = f"guidance {s.guidance}" + (f" / {s.guidance_2} (high / low noise)" if s.guidance_2 is not None else "")
    text = (f"{pipe.spec.id} ({pipe.folder.manifest['dtype']}): {s.width}x{s.height}, {s.frames} frames at {s.fps} fps, "
            f"{s.steps} steps ({s.sampler}, shift {s.shift}), {guidance_text}, seed {s.seed}; estimated peak "
            f"{format_bytes(job.estimate['peak_bytes'])} ({job.estimate['peak_stage']})")
    if getattr(pipe, "takes_audio", False):
        clips = pipe.clip_count(s)
        text += f"; {clips} clip{'s' if clips > 1 else ''} following {Path(s.audio).name}: {pipe.output_frames(s, clips)} frames"
    if job.interpolation is not None:
        text += f"; interpolated {job.interpolation.factor}x with RIFE to {job.frame_rate:g} fps"
    if job.delivery is not None and (job.delivery.width, job.delivery.height, job.delivery.fps) != (s.width, s.height, job.frame_rate):
        d = job.delivery
        text += f"; delivered as {d.width}x{d.height} at {d.fps:g} fps" + (f" ({d.preset})" if d.preset else "")
    return text


def execute(job, echo=click.echo, hooks=()) -> dict:
    """Run a prepared job: one clip (`Job`) or a chain of clips (`mlx_video.chains.ChainJob`), each its own way."""
    return job.execute(echo, hooks)


def execute_clip(job: Job, echo=click.echo, hooks=()) -> dict:
    """Run a one-clip job and write its outputs atomically, each with its sidecar. If the video cannot be
    written at the end, the latents are kept (beside the output, else in the cache) with a way to decode them."""

    if not job.quiet:
        echo(summary_line(job))
    result = job.generate(echo, hooks)
    record = job.record()
    record["experts"] = result.experts
    record.update(getattr(result, "stats", None) or {})  # transformer_evals, reused steps (--cache)
    record["latents_sha256"] = latents_digest(result.latents)  # the same run gives the same digest, anywhere
    if result.parallel is not None:
        record["parallel"] = result.parallel  # ranks, backend, split
    written = []
    from .distributed import rank as process_rank

    if process_rank() != 0:  # several processes: rank 0 writes the outputs and the sidecar
        return {"settings": job.settings, "outputs": [], "timings": result.timings, "record": record,
                "pipe": job.pipe, "latents": result.latents}
    written = job.finish(result.latents, record, result.timings, echo, result.video)
    return {"settings": job.settings, "outputs": written, "timings": result.timings, "record": record,
            "pipe": job.pipe, "latents": result.latents}


def finish_clip(job: Job, latents: np.ndarray, record: dict, timings: dict, echo, video=None) -> list[Path]:
    """A job's outputs from its final latents: the --save-latents file, then the video (decoded unless `video` is
    given; if it cannot be written, the latents are kept); each with its sidecar. Returns the paths written."""
    record.setdefault("latents_sha256", latents_digest(latents))
    written = []
    if job.save_latents is not None:
        save_latents_file(job.save_latents, latents, record, timings, job.overwrite, job.overwrite or job.own_sidecar)
        written.append(job.save_latents)
        echo(f"wrote latents {tuple(latents.shape)} to {job.save_latents}")
    if job.output is not None:
        try:
            frames, height, width = write_video_output(job, latents, record, timings, video)
        except BaseException as e:  # Ctrl-C too: the denoising is done, its latents are kept
            raise kept_latents_error(job, latents, record, timings, e, echo) from None
        written.append(job.output)
        echo(f"wrote {frames} frames of {width}x{height} to {job.output}")
    return written


def latents_digest(latents) -> str:
    """sha256 of the final latents as float32 in the reference layout: two runs agree on it exactly when they
    made the same latents (H.264 output is not bit-reproducible, so the video cannot show it)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(latents, dtype=np.float32)).tobytes()).hexdigest()


def save_latents_file(path: Path, latents: np.ndarray, record: dict, timings: dict, overwrite: bool,
                      overwrite_sidecar: bool) -> None:
    """The latents and their sidecar, published together (atomically, never replacing a file unasked)."""
    from .io.atomic import atomic_file, publishing
    from .io.sidecar import write_sidecar

    with publishing():
        with atomic_file(path, overwrite=overwrite) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, latents)
        write_sidecar(path, record, timings, overwrite=overwrite_sidecar)


def kept_latents_error(job: Job, latents, record: dict, timings: dict, error: BaseException, echo) -> BaseException:
    """What to raise when the video could not be written after the denoising: the latents are kept (the
    --save-latents file, else a new file beside the output, else in the cache) and the message says where and
    how to decode them. A Ctrl-C stays a KeyboardInterrupt, after saying so."""
    interrupted = isinstance(error, KeyboardInterrupt)
    if not isinstance(error, (OSError, MlxVideoError, KeyboardInterrupt, MemoryError, RuntimeError, ValueError)):
        return error  # a bug: the CLI reports it
    if job.save_latents is not None and job.save_latents.is_file():
        kept = job.save_latents
    elif latents is None:
        return error if interrupted else MlxVideoError(f"could not write {job.output} ({error})")
    else:
        kept = rescue_latents(job, latents, record, timings)
    target = job.output if not (job.output.exists() or _sidecar_of(job.output).exists()) else free_name(job.output)
    how = f"the finished latents are saved at {kept}. Decode them with: mlxvid decode {kept} --output {target}"
    if interrupted:
        echo(f"interrupted while writing {job.output}; {how}", err=True)
        return error
    if job.output.exists():
        return MlxVideoError(f"{job.output} was not written by this run ({error}); {how}")
    return MlxVideoError(f"could not write {job.output} ({error}); {how}")


def _sidecar_of(path: Path) -> Path:
    from .io.sidecar import sidecar_path

    return sidecar_path(path)


def free_name(path: Path) -> Path:
    """`path` with -2, -3, ... added to its name until neither it nor its sidecar exists."""
    stem, suffix = (path.stem, path.suffix) if path.suffix.lower() in (".mp4", ".mov", ".npy") else (path.name, "")
    n = 2
    while True:
        candidate = path.with_name(f"{stem}-{n}{suffix}")
        if not (os.path.lexists(candidate) or os.path.lexists(_sidecar_of(candidate))):
            return candidate
        n += 1


def write_video_output(job: Job, latents: np.ndarray, record: dict, timings: dict,
                       video: np.ndarray | None = None) -> tuple[int, int, int]:
    """Decode (unless the pipeline returned the `video` itself), interpolate (--interpolate), deliver (preset,
    overlays), write, and mux the --audio track in; the video and its sidecar are published together at the end
    (`io.atomic.publishing`). Returns (frames, height, width)."""
    from .io.atomic import publishing

    with publishing():
        return _write_video_output(job, latents, record, timings, video)


def _write_video_output(job: Job, latents, record: dict, timings: dict, video) -> tuple[int, int, int]:
    from .io import video as video_io
    from .io.sidecar import write_sidecar

    if video is None:
        start = time.perf_counter()
        video, stats = job.pipe.decode(job.pipe.video_latents(latents, job.settings), tiling=job.vae_tiling,
                                       progress=not job.quiet)
        timings["decoding"] = time.perf_counter() - start
    else:
        stats = {}
    fps = job.settings.fps
    sidecar_overwrite = job.overwrite or job.own_sidecar
    if job.interpolation is not None:  # streamed into the output, through the delivery step
        written, height, width, fps = _interpolate_output(job, video, record, timings)
        record.update(stats, vae_tiling=job.vae_tiling, output_frames=written, output_fps=fps)
        _mux_voice(job, record, None, fps)
        write_sidecar(job.output, record, timings, overwrite=sidecar_overwrite)
        return written, height, width
    if job.delivery is not None:
        start = time.perf_counter()
        video = job.delivery.apply(video, fps)
        fps = job.delivery.fps
        timings["delivery"] = time.perf_counter() - start
    start = time.perf_counter()
    is_video = video_io.is_video_file(job.output)
    if is_video and job.settings.audio is not None:
        _mux_voice(job, record, video, fps)
    elif is_video:
        video_io.write_video(video, job.output, fps=fps, overwrite=job.overwrite)
    else:
        video_io.write_frames_png(video, job.output, overwrite=job.overwrite)
        if job.settings.audio is not None:
            record["audio_track"] = "not written: a PNG folder has no audio track"
    timings["writing"] = time.perf_counter() - start
    record.update(stats, vae_tiling=job.vae_tiling, output_frames=int(video.shape[0]), output_fps=fps)
    write_sidecar(job.output, record, timings, overwrite=sidecar_overwrite)
    return int(video.shape[0]), int(video.shape[1]), int(video.shape[2])


def _mux_voice(job: Job, record: dict, video: np.ndarray | None, fps) -> None:
    """Write `video` (or, when None, the video already written for job.output) with the --audio track as AAC,
    cut to the video's length."""
    from .io.video import is_video_file

    if job.settings.audio is None or not is_video_file(job.output):
        return
    from .io.atomic import atomic_file, pending
    from .io.audio import mux_audio, read_audio

    voice = read_audio(job.settings.audio)
    if video is not None:
        mux_audio(video, voice, job.output, fps=fps, overwrite=job.overwrite)
    else:  # interpolated frames were streamed into the output (not yet published): re-mux it with the audio
        silent = pending(job.output)
        with atomic_file(job.output, overwrite=job.overwrite) as tmp:
            tmp.unlink(missing_ok=True)
            mux_audio(silent, voice, tmp)
    record["audio_track"] = {"source": str(job.settings.audio), "codec": "aac", "channels": "mono",
                             "sample_rate": voice.sample_rate}


def _interpolate_output(job: Job, video: np.ndarray, record: dict, timings: dict) -> tuple[int, int, int, float]:
    """RIFE between the decoded frames, streamed into the output as they are made, through the delivery step
    (preset, overlays, watermark) frame by frame when there is one: nothing beyond the decoded clip is held.
    Records `interpolate`; returns (frames written, height, width, fps) of the output."""
    from tqdm.auto import tqdm

    from .interpolate import output_frame_count
    from .io.frames import CountedFrames, stream_frames

    spec = job.interpolation
    start = time.perf_counter()
    interpolator = spec.interpolator()
    n, height, width, _ = video.shape
    total = output_frame_count(n, spec.factor)
    fps = job.frame_rate
    made = CountedFrames(tqdm(interpolator(video), total=total, desc="interpolating", unit="frame", disable=job.quiet))
    frames, out, _ = deliver(made, job.delivery, total, fps, (width, height, fps))
    written = stream_frames(frames, job.output, job.overwrite, *out)
    timings["interpolating_and_writing"] = time.perf_counter() - start
    if made.count != total:
        raise MlxVideoError(f"internal error: interpolation made {made.count} frames, expected {total}")
    record["interpolate"] = spec.record(n, made.count, job.settings.fps, fps, interpolator.scene_cuts)
    return written, out[1], out[0], out[2]


def deliver(frames, delivery: "Delivery | None", total: int, fps: float, size_and_rate: tuple):
    """(the delivered frames, lazily; their (width, height, fps); how many there will be) for `total` frames at
    `fps` arriving in order; without a delivery step, the frames themselves, `size_and_rate` and `total`."""
    if delivery is None:
        return frames, size_and_rate, total
    stream = DeliveryStream(delivery, total, fps)
    return ((out for frame in frames for out in stream.push(frame)), (delivery.width, delivery.height, delivery.fps),
            len(stream.shows))


def rescue_dir() -> Path:
    from .registry import models_home

    return models_home().parent / "rescued"


def rescue_latents(job: Job, latents: np.ndarray, record: dict, timings: dict) -> Path:
    """Save the latents (and a sidecar naming the run) beside the output, or in the cache if that fails; under a
    new name, atomically, never replacing a file."""
    from .io.video import is_video_file

    stem = job.output.stem if is_video_file(job.output) else job.output.name
    candidates = [job.output.with_name(stem + ".latents.npy"), rescue_dir() / f"{stem}-{int(time.time())}.latents.npy"]
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path) or os.path.lexists(_sidecar_of(path)):
                path = free_name(path)
            save_latents_file(path, latents, {**record, "intended_output": str(job.output)}, timings, False, False)
            return path
        except (OSError, MlxVideoError):
            continue
    raise MlxVideoError(f"could not write {job.output}, nor keep the latents in {candidates[0].parent} or "
                        f"{candidates[1].parent}")


def run_generation(options: dict, pipe=None, echo=click.echo, explicit=None, hooks=()) -> dict:
    """Run one generation from generate's options; returns {"settings", "outputs", "timings", "record", ...}.
    With "from_sidecar", the sidecar's run is repeated; `explicit` names the options given on top of it."""
    if options.get("from_sidecar"):
        options = replay_options(options["from_sidecar"], options, explicit)
    job = prepare(options, pipe)
    return execute(job, echo, hooks)


# ---- replay ----

def read_sidecar(path) -> dict:
    """The "settings" record of an mlxvid sidecar (the .json written beside each output)."""
    path = Path(path)
    what = "an mlxvid sidecar (the .json written beside each output, with a \"settings\" record)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MlxVideoError(f"cannot read the sidecar {path}: {getattr(e, 'strerror', None) or e}") from None
    except (ValueError, RecursionError):
        raise MlxVideoError(f"{path} is not {what}: it is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise MlxVideoError(f"{path} is not {what}")
    return data["settings"]


def replay_options(sidecar, options: dict | None = None, explicit=None) -> dict:
    """generate's options repeating what a sidecar records (every resolved setting pinned, so the latents are
    the same), with the options in `explicit` taken from `options` instead."""
    from .options import GENERATE_OPTIONS, OPTIONS

    record = read_sidecar(sidecar)
    replay = dict(record.get("options") or {})
    folder = record.get("model_folder")
    replay["model"] = folder if folder and Path(folder).is_dir() else record.get("model")
    # the settings the run resolved, pinned (mlx_video.options: Option.pinned), so the latents are the same
    pinned = {o.name: record.get(o.setting or o.name) for o in GENERATE_OPTIONS if o.pinned}
    if not all(isinstance(record.get(k), int) for k in ("width", "height")):
        raise MlxVideoError(f"{sidecar} records no resolved size (width, height): not a sidecar of a finished run")
    pinned["size"] = f"{record['width']}x{record['height']}"
    if record.get("sigmas") is not None:
        pinned["sigmas"] = list(record["sigmas"])
        replay.pop("timesteps", None)
    else:
        pinned["steps"] = record.get("steps")
    replay.update({k: v for k, v in pinned.items() if v is not None})
    for name in ("output", "save_latents", "duration", "quality"):
        replay.pop(name, None)
    options = dict(options or {})
    overrides = set(explicit if explicit is not None else (k for k in options if given(options, k)))
    overrides.discard("from_sidecar")
    for name in overrides:
        for derived in OPTIONS[name].invalidates if name in OPTIONS else ():  # recorded values derived from it
            if derived not in overrides:
                replay.pop(derived, None)
        replay[name] = options.get(name)
    for name, value in options.items():  # what the command line left at its default: quiet, overwrite, ...
        replay.setdefault(name, value)
    replay.pop("from_sidecar", None)
    return replay


# ---- decode ----

def decode_latents(latents_path, output, model: str | None = None, overwrite: bool = False, quiet: bool = False,
                   echo=click.echo, delivery: dict | None = None) -> Path:
    """Decode saved latents into a video; the sidecar beside them (if any) supplies the model, the frame rate
    and the delivery (preset, overlays, watermark) of the run that made them. `delivery` replaces recorded
    delivery options (a value of None drops one: e.g. a watermark that cannot be read)."""
    from .io.sidecar import sidecar_path
    from .overlay import check_delivery, parse_overlay

    latents_path, output_text = Path(latents_path), str(output)
    check_output_kind(output_text)
    output = Path(output_text)
    record = {}
    if sidecar_path(latents_path).is_file() and latents_path.suffix.lower() == ".npy":
        record = read_sidecar(sidecar_path(latents_path))
    options = dict(record.get("options") or {})
    options.update(delivery or {})
    options = {k: v for k, v in options.items() if v not in (None, (), [])}
    if model is None:
        folder = record.get("model_folder")
        model = folder if folder and Path(folder).is_dir() else record.get("model")
    latents = read_latents(latents_path)
    if model is None:
        raise MlxVideoError(f"no sidecar beside {latents_path} names the model: pass --model")
    options.update(model=model, output=output_text, overwrite=overwrite, quiet=quiet)
    options.pop("save_latents", None)
    overlays = [parse_overlay(v) if isinstance(v, str) else v for v in (options.get("overlay") or [])]
    check_delivery(overlays, options.get("watermark"), options.get("font"))  # before any weights load
    check_output_writable(output, overwrite)
    check_output_writable(sidecar_path(output), overwrite, "--output (its .json sidecar)")
    pipe = load_pipeline(model)
    st, sh, sw = pipe.spec.vae_stride
    size = f"{latents.shape[4] * sw}x{latents.shape[3] * sh}"
    references = len(options.get("reference_image") or ())  # latent frames in front of the video's (VACE)
    frames = (latents.shape[2] - references - 1) * st + 1
    options.update(size=size, frames=frames, prompt=record.get("prompt") or "decoded latents", upscale="none")
    options.pop("upscale_model", None)  # the latents are decoded as they are (upscaled ones at their size)
    for name in ("duration", "init_latents", "preview_every", "lora", "lora_high", "lora_low", "cache", "attention",
                 "last_image", "video", "strength", "control_video", "mask_video", "mask", "control_scale",
                 "outpaint"):
        options.pop(name, None)  # none of them changes decoding
    if record.get("fps") is not None:
        options["fps"] = record["fps"]
    if pipe.latent_channels != latents.shape[1]:
        raise MlxVideoError(f"{latents_path} has {latents.shape[1]} channels; {pipe.spec.id} decodes {pipe.latent_channels}")
    job = prepare(options, pipe, check_memory=False)
    job.pixels, job.inputs = None, {}
    rec = job.record()
    rec["decoded_from"] = str(latents_path)
    frames, height, width = write_video_output(job, latents.astype(np.float32), rec, {})
    echo(f"wrote {frames} frames of {width}x{height} to {output}")
    return output


def read_latents(path: Path) -> np.ndarray:
    """Latents saved by --save-latents (or kept after a failed write): a .npy of shape (1, C, T, H, W)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise MlxVideoError(f"cannot read {path}: {e.strerror or e}") from None
    if head != b"\x93NUMPY":
        kind = " (a JSON file: the sidecar? give the .npy beside it)" if head.lstrip()[:1] in (b"{", b"[") else ""
        raise MlxVideoError(f"{path} is not a .npy file of latents{kind}; decode takes what --save-latents wrote")
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MlxVideoError(f"cannot read {path}: {e}") from None
    if latents.ndim != 5 or not np.issubdtype(latents.dtype, np.floating):
        raise MlxVideoError(f"{path} holds {latents.dtype} of shape {latents.shape}, not (1, C, T, H, W) float latents")
    return latents
