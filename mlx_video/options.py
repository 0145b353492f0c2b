"""The generation options, typed, in one table: `mlxvid generate`'s command line, `decode`'s shared options,
batch manifests, `--from-sidecar` replay, the sidecar's record and a job server's request bodies all come from
`GENERATE_OPTIONS`, and one validator (`validate`) checks a dict of them with the same words everywhere.

    from mlx_video.options import validate
    options = validate({"model": "wan2.2-ti2v-5b", "prompt": "a corgi surfing", "frames": 121})

Values may be JSON values (a manifest, a request body) or the command line's strings; `validate` returns them
converted (numbers as numbers, a list option as a tuple) and refuses, naming the option (`--frames`) and what
it takes, anything of the wrong type, out of range, not among the choices, or not an option at all. What needs
the model (its frame rule, text length, sizes) is checked when the settings are settled against it
(`mlx_video.run.prepare`), with the bounds below.

This module imports no command-line library: a server validates a request with it alone.

A new option is one `Option` entry here (plus the `GenerationSettings` field it sets, when a pipeline reads it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MlxVideoError

# ---- bounds: each option's limit, refused before any work (and named in the message) ----

MAX_STEPS = 1000  # the flow-matching models are trained on 1000 timesteps; more steps repeat them
MAX_VIDEO_SECONDS = 3600  # one hour: a chain of clips longer than that is refused (frames = seconds x the model's fps)
MAX_FPS = 120
MAX_FRAMES = MAX_VIDEO_SECONDS * MAX_FPS  # without the model; with it, MAX_VIDEO_SECONDS at the model's fps
MAX_PROMPT_CHARS = 20_000  # before tokenizing; the model's text length (tokens) is checked against the prompt
MAX_OVERLAY_CHARS = 500  # per --overlay (and a text --watermark): lines on a frame, not a document
MAX_MANIFEST_LINE_BYTES = 1 << 20  # one job of a batch manifest (a JSON Lines line or a list entry)
SEED_MAX = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
QUALITIES = ("high", "medium", "low")


def flag_name(name: str) -> str:
    """The command-line spelling of an option: guidance_2 -> --guidance-2."""
    return "--" + name.replace("_", "-")


# ---- the one number check (options, settings resolved against a model, LoRA strengths) ----

def check_number(label: str, value, *, minimum=None, maximum=None, positive: bool = False, integer: bool = False,
                 why: str | None = None):
    """`value` as an int (integer) or float, or MlxVideoError naming `label` and the rule it breaks.
    Strings of numbers (the command line's) are taken, and a message shows a number the same way whether it
    came as text or as a JSON number."""
    if isinstance(value, str):
        value = _number_from_text(label, value, integer)
    if isinstance(value, bool) or not _is_number(value):
        raise MlxVideoError(f"{label} takes a {'whole ' if integer else ''}number, not {value!r}")
    shown = _show(value)
    if not math.isfinite(value):
        raise MlxVideoError(f"{label} must be a finite number, got {shown}")
    if integer and int(value) != value:
        raise MlxVideoError(f"{label} must be a whole number, got {shown}")
    if positive and value <= 0:
        raise MlxVideoError(f"{label} must be positive, got {shown}")
    reason = f" ({why})" if why else ""
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise MlxVideoError(f"{label} must be {'a whole number ' if integer else ''}from {minimum} to {maximum}{reason}, "
                            f"got {shown}")
    if minimum is not None and value < minimum:
        raise MlxVideoError(f"{label} must be at least {minimum}, got {shown}")
    if maximum is not None and value > maximum:
        raise MlxVideoError(f"{label} must be at most {maximum}{reason}, got {shown}")
    return int(value) if integer else float(value)


def _number_from_text(label: str, text: str, integer: bool):
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        return float(text.strip())
    except ValueError:
        raise MlxVideoError(f"{label} takes a {'whole ' if integer else ''}number, not {text!r}") from None


def _show(value) -> str:
    """-1.0 and -1 both as -1, 2.5 as 2.5: the same text for a number typed or sent as JSON."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def _is_number(value) -> bool:
    import numbers

    return isinstance(value, numbers.Real)


def check_text(label: str, value, max_length: int | None = None, what: str = "characters") -> str:
    if not isinstance(value, str):
        raise MlxVideoError(f"{label} takes text, not {value!r}")
    if max_length is not None and len(value) > max_length:
        raise MlxVideoError(f"{label} is {len(value)} {what} long, more than the {max_length} it takes")
    return value


# ---- converters of the kinds of values ----

def _size(label: str, value) -> str:
    try:
        w, h = str(value).lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise MlxVideoError(f"{label} takes WIDTHxHEIGHT, e.g. 1280x720, not {value!r}") from None
    if w <= 0 or h <= 0:
        raise MlxVideoError(f"{label} takes a positive width and height, not {value!r}")
    return f"{w}x{h}"


def parse_size(value) -> tuple[int | None, int | None]:
    """A validated --size as (width, height); (None, None) when not given."""
    if value is None:
        return None, None
    w, h = _size("--size", value).split("x")
    return int(w), int(h)


def _numbers(label: str, value) -> list[float]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [v for v in str(value).replace(" ", "").split(",") if v]
    if not items:
        raise MlxVideoError(f"{label} takes comma-separated numbers, e.g. 1000,750,500,250, not {value!r}")
    if len(items) > MAX_STEPS:
        raise MlxVideoError(f"{label} takes at most {MAX_STEPS} values (one a step), got {len(items)}")
    try:
        return [check_number(label, v) for v in items]
    except MlxVideoError:
        raise MlxVideoError(f"{label} takes comma-separated numbers, e.g. 1000,750,500,250, not {value!r}") from None


def parse_sigmas(sigmas, timesteps) -> list[float] | None:
    """--sigmas, or --timesteps (sigma x 1000), as a list of noise levels; None when neither is given."""
    if sigmas is not None and timesteps is not None:
        raise MlxVideoError("give --sigmas or --timesteps, not both")
    if sigmas is not None:
        return _numbers("--sigmas", sigmas)
    return None if timesteps is None else [v / 1000.0 for v in _numbers("--timesteps", timesteps)]


def _overlay(label: str, value) -> str:
    from .overlay import parse_overlay

    parse_overlay(check_text(label, value, MAX_OVERLAY_CHARS + 16))  # the text plus its @START-END
    text = value.rpartition("@")[0] if "@" in value else value
    check_text(label, text, MAX_OVERLAY_CHARS)
    return value


def _watermark(label: str, value) -> str:
    value = str(value) if isinstance(value, Path) else value
    return check_text(label, value, MAX_OVERLAY_CHARS)


def _lora(label: str, value):
    if isinstance(value, dict):
        unknown = set(value) - {"path", "scale"}
        if unknown or "path" not in value:
            raise MlxVideoError(f"{label} takes PATH[:SCALE] or {{\"path\", \"scale\"}}, not {value!r}")
        if "scale" in value:
            check_number(f"the strength of LoRA {value['path']}", value["scale"])
        return dict(value)
    from .lora import parse_lora_option

    parse_lora_option(check_text(label, str(value) if isinstance(value, Path) else value), label)
    return str(value)


def _segment_prompt(label: str, value) -> dict:
    if isinstance(value, str):
        check_text(label, value, MAX_PROMPT_CHARS)
    elif isinstance(value, dict) and isinstance(value.get("prompt"), str):
        check_text(label, value["prompt"], MAX_PROMPT_CHARS)
    return parse_segment_prompt(value)


def _interpolate(label: str, value) -> str:
    text = f"{value}x" if isinstance(value, int) and not isinstance(value, bool) else str(value).strip().lower()
    if text not in ("2x", "4x"):
        raise MlxVideoError(f"{label} must be 2x or 4x, not {value!r}")
    return text


_SEGMENT_KEYS = ("at", "prompt", "seed")


def parse_segment_prompt(value) -> dict:
    """A --segment-prompt value as {"prompt", "at" (seconds or None), "seed" (or None)}: TEXT, TEXT@SECONDS, or a
    manifest's {"at": ..., "prompt": ..., "seed": ...}."""
    import re

    if isinstance(value, dict):
        unknown = set(value) - set(_SEGMENT_KEYS)
        if unknown:
            raise MlxVideoError(f"a segment prompt takes at, prompt and seed, not {', '.join(sorted(unknown))}")
        entry = {"prompt": value.get("prompt"), "at": value.get("at"), "seed": value.get("seed")}
    elif isinstance(value, str):
        match = re.match(r"^(?P<prompt>.*\S)\s*@\s*(?P<at>\d+(?:\.\d*)?)\s*$", value, re.S)
        entry = ({"prompt": match["prompt"], "at": float(match["at"]), "seed": None} if match
                 else {"prompt": value, "at": None, "seed": None})
    else:
        raise MlxVideoError(f"a segment prompt is TEXT, TEXT@SECONDS or {{\"at\", \"prompt\"}}, not {value!r}")
    if not isinstance(entry["prompt"], str) or not entry["prompt"].strip():
        raise MlxVideoError(f"a segment prompt needs a non-empty prompt, got {value!r}")
    at = entry["at"]
    if at is not None and (isinstance(at, bool) or not _is_number(at) or not math.isfinite(at) or at < 0):
        raise MlxVideoError(f"a segment prompt's time must be a number of seconds >= 0, got {at!r}")
    seed = entry["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise MlxVideoError(f"a segment prompt's seed must be a whole number >= 0, got {seed!r}")
    return entry


# ---- the table ----

@dataclass(frozen=True)
class Option:
    """One generation option. `kind`: text, int, float, flag, path, choice, or a named value (size, numbers,
    overlay, watermark, lora, segment_prompt, interpolate)."""

    name: str  # the key in a dict of options (a manifest's, a request's); the flag is flag_name(name)
    kind: str
    help: str | Callable[[], str]  # a callable builds the text from the registry when the CLI is made
    default: Any = None
    short: str | None = None  # -m, -p, ...
    metavar: str | None = None
    choices: tuple | Callable[[], tuple] = ()
    aliases: Callable[[], dict] | None = None  # choice: other names taken for a choice, {name: choice}
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    why: str | None = None  # why the maximum (said when it is passed)
    max_length: int | None = None  # text: characters
    multiple: bool = False  # repeatable; a list in a manifest
    exists: bool = False  # path: must exist now
    file_only: bool = False  # path: not a folder
    recorded: bool = True  # in the sidecar's record of the options (resume and replay compare it)
    pinned: bool = False  # a replay takes the resolved value the sidecar records, not the option given
    invalidates: tuple[str, ...] = ()  # recorded options derived from this one, dropped when a replay changes it
    needs: str | None = None  # the pipeline capability (a key of CAPABILITIES) a model must have to take it
    commands: tuple[str, ...] = ("generate",)  # the commands taking it besides batch and the API
    setting: str | None = None  # the GenerationSettings field it fills, where the names differ

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    def choice_list(self) -> tuple:
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices)

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help

    def convert(self, value):
        """The value checked and converted; a list option converts each item and returns a tuple."""
        if value is None:
            return None
        if self.multiple:
            items = [value] if isinstance(value, (str, dict, Path)) else value
            if not isinstance(items, (list, tuple)):
                raise MlxVideoError(f"{self.flag} takes a list, not {value!r}")
            return tuple(self.convert_one(v) for v in items)
        return self.convert_one(value)

    def convert_one(self, value):
        label = self.flag
        kind = self.kind
        if kind == "flag":
            if not isinstance(value, bool):
                raise MlxVideoError(f"{label} is true or false, not {value!r}")
            return value
        if kind in ("int", "float"):
            return check_number(label, value, minimum=self.minimum, maximum=self.maximum, positive=self.positive,
                                integer=kind == "int", why=self.why)
        if kind == "choice":
            choices = self.choice_list()
            value = self.aliases().get(value, value) if self.aliases and isinstance(value, str) else value
            if value not in choices:
                raise MlxVideoError(f"{label} must be one of {', '.join(map(str, choices))}, not {value!r}")
            return value
        if kind == "path":
            return _path(label, value, self.exists, self.file_only)
        if kind == "text":
            return check_text(label, value, self.max_length)
        return _NAMED[kind](label, value)


def _path(label: str, value, exists: bool, file_only: bool) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise MlxVideoError(f"{label} takes a path, not {value!r}")
    path = Path(value)
    if exists and not path.exists():
        raise MlxVideoError(f"{label} {path}: no such file")
    if file_only and path.is_dir():
        raise MlxVideoError(f"{label} {path} is a folder; it takes a file")
    return path


def _output(label: str, value):
    """A path; written with a trailing / (a folder of PNG frames whose name has a dot: `frames-1.0/`), it is kept
    as that text, since a Path drops the slash."""
    path = _path(label, value, False, False)
    return str(value) if str(value).endswith(("/", os.sep)) else path


_NAMED = {"output": _output, "size": _size, "numbers": _numbers, "overlay": _overlay, "watermark": _watermark, "lora": _lora,
          "segment_prompt": _segment_prompt, "interpolate": _interpolate}


# ---- help texts built from the registry ----

def _by_value(name: str, unit: str = "") -> str:
    """`81 (wan2.2-t2v-a14b, wan2.2-i2v-a14b), 121 (wan2.2-ti2v-5b), ...`: a default of every registry model."""
    from .registry import MODELS

    groups: dict = {}
    for spec in MODELS.values():
        groups.setdefault(spec.default(name), []).append(spec.id)
    return ", ".join(f"{value}{unit} ({', '.join(ids)})" for value, ids in groups.items() if value is not None)


def _frames_help() -> str:
    from .registry import MODELS

    rules: dict = {}
    for spec in MODELS.values():
        rules.setdefault(spec.frame_rule, []).append(spec.id)
    rule_text = "; ".join(f"{rule} for {', '.join(ids)}" for rule, ids in rules.items())
    return (f"Number of frames, of the model's form ({rule_text}). Default: the model's: {_by_value('frames')}. "
            f"Beyond one clip, any number up to {MAX_VIDEO_SECONDS} s at the model's fps: a chain of clips. For "
            "audio-driven models: frames per clip.")


def _size_help() -> str:
    from .registry import MODELS

    groups: dict = {}
    for spec in MODELS.values():
        groups.setdefault(", ".join(f"{w}x{h}" for w, h in spec.sizes), []).append(spec.id)
    sizes = "; ".join(f"{', '.join(ids)}: {text}" for text, ids in groups.items())
    return ("Video size WxH, a multiple of the model's size step. Default: the model's first published size "
            f"(published: {sizes}); for audio-driven models the portrait's aspect ratio within the model's area.")


def _models_with(task: str) -> str:
    from .registry import models_with_task

    return ", ".join(models_with_task(task)) or "none here"


def _upscale_choices() -> tuple:
    """The resolutions of the registry's super-resolution models, and none."""
    from .registry import sr_models

    found = {s.extra["output_resolution"] for s in sr_models()}
    return tuple(sorted(found, key=lambda r: int(r.rstrip("p")))) + ("none",)


def _upscale_help() -> str:
    from .registry import sr_models

    stages = "; ".join(f"{s.extra['output_resolution']} for {', '.join(s.extra['upscales'])} ({s.id})"
                       for s in sr_models())
    return ("After the run, its super-resolution stage; the video is decoded at the higher resolution ("
            f"{stages or 'no model here has one'}). With --preset and --quality high the model's stage is picked when "
            "the delivery is at least its size; none turns that off.")


def _radial_defaults_help() -> str:
    """Each family's default dense steps and blocks for --attention radial, from the registry ("ours" where the
    reference repository publishes none)."""
    from .families import get_family
    from .registry import MODELS
    from .speedup import radial_parameters

    found: dict[str, tuple[list, list, bool]] = {}
    for spec in MODELS.values():
        radial = radial_parameters(spec)[0]
        if radial is not None:
            steps, blocks, _ = found.setdefault(get_family(spec.family).title, ([], [], radial.source.startswith("ours")))
            steps += [radial.dense_steps] if radial.dense_steps not in steps else []
            blocks += [radial.dense_blocks] if radial.dense_blocks not in blocks else []
    return "; ".join(f"{title}{', ours' if ours else ''}: {' or '.join(map(str, steps))} and "
                     f"{' or '.join(map(str, blocks))}" for title, (steps, blocks, ours) in found.items())


def _attention_help() -> str:
    return ("Self-attention: dense (the default) or radial[:DENSE_STEPS[:DENSE_BLOCKS]], Radial Attention's static "
            "block-sparse mask of the video tokens; the first DENSE_STEPS steps (over the whole run) and DENSE_BLOCKS "
            f"blocks (of each expert) stay dense, by default the family's published numbers ({_radial_defaults_help()}).")


def _cache_help() -> str:
    from .pipelines.cache import mag_tables
    from .registry import MODELS

    own = sorted({s.id for s in MODELS.values() if s.extra.get("cache_settings", {}).get("taylorseer")})
    calibrated = sorted({key.partition(":")[0] for key in mag_tables()})
    return ("Skip transformer evaluations that earlier steps predict: easycache (default 0.05), fbcache (0.05) or "
            f"magcache (published ratios: {', '.join(calibrated) or 'none here'}; default 0.06); threshold 0 "
            "changes nothing. Or forecast them: taylorseer[:KEY=VALUE,...] with diffusers' TaylorSeerCacheConfig keys "
            "and defaults (cache_interval=5, disable_cache_before_step=3, disable_cache_after_step=none, max_order=1, "
            "taylor_factors_dtype=bfloat16) except use_lite_mode, on by default (diffusers' default mode forecasts no "
            "module of most of our transformers): after 3 steps per expert, one step in 5 runs the transformer and the "
            "others are forecast. A model whose release publishes a schedule of its own starts from it ("
            f"{', '.join(own) or 'none here'}); the keys given override it.")


def _samplers() -> tuple:
    from .samplers import SAMPLERS

    return tuple(sorted(SAMPLERS))


def _schedules() -> tuple:
    from .samplers import SCHEDULES

    return tuple(sorted(SCHEDULES))


def _schedule_names() -> dict:
    from .families import schedule_names

    return schedule_names()


GENERATE_OPTIONS: tuple[Option, ...] = (
    Option("model", "text", "A converted model folder, or a registry id (see `mlxvid models`). Required unless "
           "--from-sidecar.", short="-m", commands=("generate", "decode"), invalidates=()),
    Option("prompt", "text", "What the video shows. Required unless --from-sidecar.", short="-p",
           max_length=MAX_PROMPT_CHARS, pinned=True),
    Option("image", "path", lambda: f"Image to animate ({_models_with('i2v')} need one; {_models_with('ti2v')} take "
           f"one optionally; {_models_with('s2v')}: the portrait). Resized to the video size as --image-fit says.",
           short="-i", file_only=True),
    Option("last_image", "path", lambda: "First-last frame: the image the video ends on, with --image as its "
           f"first frame ({_models_with_need('takes_last_image')}); resized like --image.", file_only=True,
           needs="takes_last_image"),
    Option("video", "path", lambda: "Video-to-video: the clip to restyle, an .mp4/.mov or a folder of PNG frames "
           f"({_models_with_need('takes_video')}); each frame is resized like --image. The video has its frame "
           "count, cut down to the model's frame form, unless --frames is given (its first N frames). On VACE "
           "models: the clip to inpaint (with --mask), outpaint (--outpaint) or extend (fewer frames than --frames).",
           needs="takes_video"),
    Option("strength", "float", "Video-to-video: the fraction of the schedule re-noised (0 < S <= 1; default 0.8, as "
           "diffusers): the last int(steps x S) steps run from the --video's latents mixed with noise at that level.",
           metavar="S", positive=True, maximum=1, why="a fraction of the schedule", needs="takes_video"),
    Option("control_video", "path", lambda: "VACE: a control video to follow (depth, pose, edges, greyscale... made "
           f"with a tool of your choice) ({_models_with_need('takes_vace')}); frames as --video's.", needs="takes_vace"),
    Option("mask", "path", "VACE: a mask image for every frame of the --video / --control-video: white = generate, "
           "black = keep; the video's size.", file_only=True, needs="takes_vace"),
    Option("mask_video", "path", "VACE: a mask per frame (a video or PNG folder of the video's size, at least "
           "--frames frames): white = generate, black = keep. Wan2.2-Animate's replace mode: where the character "
           "goes (white) and the background stays (black), as long as --pose-video.", needs="takes_mask_video"),
    Option("reference_image", "path", "VACE: an image to keep in view (a face, a product, a logo); repeatable. Fitted "
           "inside the video size on a white canvas.", file_only=True, multiple=True, needs="takes_vace",
           setting="reference_images"),
    Option("control_scale", "float", "VACE: the strength of the conditioning's hints (default 1.0, as diffusers).",
           metavar="S", minimum=0, maximum=10, why="hints far above 1 break the video", needs="takes_vace"),
    Option("outpaint", "text", "VACE outpainting: LEFT,TOP,RIGHT,BOTTOM pixels of new content around the --video, "
           "which is fitted into the rest of the --size frame.", metavar="L,T,R,B", needs="takes_vace"),
    Option("image_fit", "choice", "How the image meets the video size: crop (cover, then centre-crop, as the "
           "official TI2V code; the default), stretch (ignore the aspect ratio, as diffusers' Wan I2V pipeline), fit "
           "(letterbox in black) or short-side (the shorter side to the video's, bilinear, then centre-crop, black "
           "where it does not cover: the official S2V fit, and S2V's default).",
           choices=("crop", "stretch", "fit", "short-side")),
    Option("audio", "path", lambda: "Voice track driving an audio-to-video model (" + _models_with("s2v") + "): wav, "
           "mp3, m4a, flac. The video lasts as long as the audio (in whole clips) and the track is muxed into the "
           "output.", short="-a", file_only=True, needs="takes_audio"),
    Option("pose_video", "path", "A pose video (or PNG folder) to follow: for an audio-driven model, read from its "
           "start at the video's fps; for Wan2.2-Animate, the preprocessed pose video, whose length sets the "
           "video's.", needs="takes_pose_video"),
    Option("face_video", "path", "Wan2.2-Animate: the performer's preprocessed face crops (a video or PNG folder, "
           "square; as long as --pose-video).", needs="takes_animate"),
    Option("background_video", "path", "Wan2.2-Animate replace mode: the video the character is put into (as long "
           "as --pose-video).", needs="takes_animate"),
    Option("animate_mode", "choice", "Wan2.2-Animate: animate (the character follows the pose and face videos) or "
           "replace (the character takes the performer's place in --background-video, where --mask-video is white). "
           "Default: replace when --background-video or --mask-video is given, else animate.",
           choices=("animate", "replace"), needs="takes_animate"),
    Option("clips", "int", "Audio-driven models: stop after N clips (of --frames frames each) even if the audio goes "
           "on.", metavar="N", minimum=1, maximum=1000, needs="takes_audio"),
    Option("start_from_portrait", "flag", "Audio-driven models: start the first clip from the portrait as motion "
           "context (the official --start_from_ref), so the video opens on the portrait; all of its frames are "
           "kept.", needs="takes_audio", setting="start_from_image"),
    Option("negative_prompt", "text", "What to steer away from. Default: the official release's.",
           max_length=MAX_PROMPT_CHARS, pinned=True),
    Option("size", "size", _size_help, metavar="WxH"),
    Option("frames", "int", _frames_help, minimum=1, maximum=MAX_FRAMES, pinned=True, invalidates=("duration",),
           why=f"{MAX_VIDEO_SECONDS} s at {MAX_FPS} fps"),
    Option("fps", "int", lambda: f"Frame rate of the written video. Default: the model's: {_by_value('fps')}.",
           positive=True, maximum=MAX_FPS, pinned=True),
    Option("steps", "int", lambda: f"Denoising steps. Default: the model's: {_by_value('steps')}.", minimum=1,
           maximum=MAX_STEPS, why="the models' 1000 training timesteps", invalidates=("sigmas", "timesteps")),
    Option("guidance", "float", "Guidance scale (of the high-noise expert on two-expert models; the embedded scale "
           "of guidance-distilled models).", pinned=True),
    Option("guidance_2", "float", lambda: "Guidance scale of the low-noise expert (two-expert models: "
           + _models_with_experts() + ").", pinned=True, needs="uses_guidance_2"),
    Option("true_cfg", "float", "Classifier-free guidance scale with --negative-prompt, on top of a model's embedded "
           "--guidance (guidance-distilled models: HunyuanVideo).", pinned=True, needs="takes_true_cfg"),
    Option("shift", "float", lambda: f"Noise schedule shift. Default: the model's: {_by_value('shift')}.",
           positive=True, pinned=True),
    Option("sampler", "choice", "Step rule. Default: the model's (unipc for Wan, as the official release).",
           choices=_samplers, pinned=True),
    Option("schedule", "choice", lambda: "Sigma schedule. Default: the model's, else the sampler's own (unipc: "
           "unipc-grid, euler: shifted-linear)." + "".join(f" {name}: {schedule}." for name, schedule
                                                           in sorted(_schedule_names().items())),
           choices=_schedules, aliases=_schedule_names, pinned=True),
    Option("sigmas", "numbers", "An explicit, decreasing list of noise levels in (0, 1] (distilled checkpoints); "
           "sets the step count.", metavar="S1,S2,...", invalidates=("steps", "timesteps")),
    Option("timesteps", "numbers", "The same as --sigmas in timesteps (sigma x 1000), as distilled recipes publish "
           "them.", metavar="T1,T2,...", invalidates=("steps", "sigmas")),
    Option("lora", "lora", "A LoRA .safetensors (diffusers/PEFT, ComfyUI/lightx2v or kohya names) fused into every "
           "expert at load, with an optional strength (default 1); repeatable.", metavar="PATH[:SCALE]",
           multiple=True),
    Option("lora_high", "lora", "A LoRA for the high-noise expert only (two-expert models); repeatable.",
           metavar="PATH[:SCALE]", multiple=True),
    Option("lora_low", "lora", "A LoRA for the low-noise expert only (two-expert models); repeatable.",
           metavar="PATH[:SCALE]", multiple=True),
    Option("recipe", "text", "Published few-step settings (steps, shift, sampler, timesteps, guidance 1) of a "
           "distillation LoRA: lightning, lightx2v (`mlxvid models` lists them); options given too win.",
           metavar="NAME", max_length=100),
    Option("cache", "text", _cache_help,
           metavar="NAME[:THRESHOLD or KEY=VALUE,...]", max_length=300),
    Option("attention", "text", _attention_help,
           metavar="dense|radial[:DENSE_STEPS[:DENSE_BLOCKS]]", max_length=100),
    Option("guidance_mode", "choice", "batched runs the conditional and unconditional passes as one batch; "
           "sequential runs them one after the other: the same result with about half the activation memory.",
           default="batched", choices=("batched", "sequential"), pinned=True),
    Option("seed", "int", "Seed of the starting noise.", default=0, minimum=0, maximum=SEED_MAX, pinned=True),
    Option("init_latents", "path", "Start from these latents instead of noise: a float32 .npy of shape "
           "(1, C, T, H, W).", file_only=True),
    Option("save_latents", "path", "Write the final latents (before decoding) to this .npy, same layout; a .json "
           "sidecar goes beside it.", file_only=True),
    Option("output", "output", "Video to write: a .mp4/.mov file (H.264), or a folder for lossless PNG frames (a "
           "name with a dot ends in /: frames-1.0/). A .json "
           "sidecar goes beside it. Default (without --save-latents): PROMPT-WORDS-seedN.mp4 here, never replacing "
           "a file.", short="-o", commands=("generate", "decode")),
    Option("vae_tiling", "choice", "Decode in overlapping spatial tiles to bound memory; auto tiles when one frame "
           "chunk would not fit.", default="auto", choices=("auto", "on", "off")),
    Option("max_memory", "float", "Memory the run may use. Default: what is available now; a run estimated to need "
           "more is refused before it starts.", metavar="GB", positive=True),
    Option("preset", "text", "Delivery format: linkedin-square (1080x1080, 24 fps), linkedin-wide (1920x1080, 24 "
           "fps), youtube-short (1080x1920, 30 fps), or one of yours in presets.toml. Renders at the model's nearest "
           "published size, then scales and retimes the frames (see the README); also for a chain of clips.",
           metavar="NAME", max_length=100, invalidates=("size",), commands=("generate", "decode")),
    Option("quality", "choice", "Size class and steps for the model (`mlxvid models` lists them). Default: the "
           "published settings.", choices=QUALITIES, invalidates=("size", "steps")),
    Option("upscale", "choice", _upscale_help, choices=_upscale_choices, metavar="RESOLUTION"),
    Option("upscale_model", "text", "The super-resolution model folder (or registry id) --upscale runs. Default: "
           "the registry's model for the run's model, converted under the models home ($MLXVID_HOME/models/ID).",
           metavar="PATH|ID", max_length=4096),
    Option("duration", "float", "Clip length instead of --frames: the nearest frame count of the model's rule at "
           "its fps. Longer than one clip: a chain of clips, each continuing the last (see the README's Longer "
           f"videos), up to {MAX_VIDEO_SECONDS} s.", metavar="SECONDS", positive=True, maximum=MAX_VIDEO_SECONDS,
           invalidates=("frames",)),
    Option("segment_prompt", "segment_prompt", "Prompt of the next segment of a chain (--prompt is the first; the "
           "last repeats), or with @SECONDS from that time on; repeatable.", metavar="TEXT[@SECONDS]", multiple=True),
    Option("segment_frames", "int", lambda: "Frames each segment of a chain renders (of the model's frame form: "
           + "; ".join(f"{r} for {ids}" for r, ids in _rules().items()) + "), enough to leave the next segment's "
           "cross-fade. Default: the model's longest clip.", metavar="N", minimum=1, maximum=MAX_FRAMES),
    Option("interpolate", "interpolate", "After decoding, RIFE 4.25 frame interpolation: n frames become (n - 1) x 2 "
           "or x 4 + 1, written at the model's fps x 2 or x 4 (16 -> 32), streamed into the output. With --preset its "
           "fps wins: interpolation, then nearest-frame retiming (16 -> 32 -> 30). Also for a chain of clips, "
           "streamed across its segments.", metavar="[2x|4x]"),
    Option("rife_weights", "path", "RIFE 4.25 flownet.pkl or its converted folder for --interpolate [default: "
           "$MLXVID_HOME/models/rife].", metavar="PATH"),
    Option("overlay", "overlay", f"Text burned into the video, from START to END seconds (default: all of it), at "
           f"most {MAX_OVERLAY_CHARS} characters; repeatable.", metavar="TEXT[@START-END]", multiple=True,
           commands=("generate", "decode")),
    Option("watermark", "watermark", "A text or image watermark in a corner.", metavar="TEXT|IMAGE",
           commands=("generate", "decode")),
    Option("watermark_corner", "choice", "Default: the preset's (bottom-right; top-left for youtube-short).",
           choices=CORNERS, commands=("generate", "decode")),
    Option("font", "path", "A TrueType/OpenType font file for --overlay and --watermark. Default: Noto Sans (Latin, "
           "Greek, Cyrillic).", file_only=True, commands=("generate", "decode")),
    Option("preview_every", "int", "Every N steps, write NAME.preview.png beside the output: an approximate picture "
           "of the clip.", metavar="N", minimum=1, maximum=MAX_STEPS, recorded=False),
    Option("from_sidecar", "path", "Repeat the run a .json sidecar records (the same latents); options given too "
           "override it.", exists=True, file_only=True, recorded=False),
    Option("overwrite", "flag", "Replace output files that exist.", recorded=False, commands=("generate", "decode")),
    Option("quiet", "flag", "No progress bars.", short="-q", recorded=False, commands=("generate", "decode")),
)

OPTIONS: dict[str, Option] = {o.name: o for o in GENERATE_OPTIONS}
NOT_RECORDED = frozenset(o.name for o in GENERATE_OPTIONS if not o.recorded)
REQUIRED = ("model", "prompt")  # unless a sidecar is replayed


def _rules() -> dict:
    from .registry import MODELS

    rules: dict = {}
    for spec in MODELS.values():
        rules.setdefault(spec.frame_rule, []).append(spec.id)
    return {rule: ", ".join(ids) for rule, ids in rules.items()}


def _models_with_experts() -> str:
    from .registry import MODELS

    return ", ".join(spec.id for spec in MODELS.values() if spec.experts > 1) or "none here"


@dataclass
class Problems:
    """Every problem of a dict of options, for a report that lists them all at once (a batch manifest)."""

    messages: list[str] = field(default_factory=list)

    def raise_any(self) -> None:
        if self.messages:
            raise MlxVideoError("; ".join(self.messages))


def validate(options: dict, *, require: bool = True, all_problems: bool = False) -> dict:
    """The options checked against the schema and converted (see the module docstring). Unknown keys, wrong
    types, values out of range or not among the choices raise MlxVideoError naming the option; with
    `all_problems`, every problem of the dict is named in one message. `require`: model and prompt must be
    there (not for a replay, whose sidecar supplies them)."""
    if not isinstance(options, dict):
        raise MlxVideoError(f"the options are a JSON object of option names, not {type(options).__name__}")
    problems, out = Problems(), {}
    for key, value in options.items():
        option = OPTIONS.get(key)
        if option is None:
            hint = f" (did you mean {key.replace('-', '_')}?)" if str(key).replace("-", "_") in OPTIONS else ""
            problems.messages.append(f"unknown key {key!r}{hint}")
            continue
        try:
            out[key] = option.convert(value)
        except MlxVideoError as e:
            if not all_problems:
                raise
            problems.messages.append(str(e))
    if require and not options.get("from_sidecar"):
        for key in REQUIRED:
            if not (isinstance(out.get(key), (str, Path)) and str(out[key]).strip()):
                problems.messages.append(f"{flag_name(key)} is required")
    problems.raise_any()
    return out


def given(options: dict, name: str) -> bool:
    """Whether an option holds a value (not None, not an empty list, not a false flag)."""
    return options.get(name) not in (None, (), [], False)


def recorded_options(options: dict) -> dict:
    """The options as the sidecar records them (JSON values, no None, nothing that leaves the output alone)."""
    from .io.sidecar import to_jsonable

    return to_jsonable({k: v for k, v in sorted(options.items())
                        if v is not None and k not in NOT_RECORDED and v != () and v != []})


# What each `Option.needs` means: (who takes it, what the others lack, the registry ids that take it).
def _ids_with_pipeline_flag(attr: str) -> list[str]:
    from .families import pipeline_class
    from .registry import MODELS

    return [s.id for s in MODELS.values() if pipeline_class(s.family, s.task).capable(s, attr)]


def _models_with_need(attr: str) -> str:
    return ", ".join(_ids_with_pipeline_flag(attr)) or "none here"


def _ids_with_experts() -> list[str]:
    from .registry import MODELS

    return [s.id for s in MODELS.values() if s.experts > 1]


CAPABILITIES = {
    "takes_audio": ("audio-driven models", "audio", lambda: _ids_with_pipeline_flag("takes_audio")),
    "uses_guidance_2": ("models with two experts", "second expert", _ids_with_experts),
    "takes_true_cfg": ("models with embedded guidance", "true CFG", lambda: _ids_with_pipeline_flag("takes_true_cfg")),
    "takes_last_image": ("first-last-frame models", "last image",
                         lambda: _ids_with_pipeline_flag("takes_last_image")),
    "takes_video": ("video-to-video and VACE models", "input video", lambda: _ids_with_pipeline_flag("takes_video")),
    "takes_vace": ("VACE models", "VACE conditioning", lambda: _ids_with_pipeline_flag("takes_vace")),
    "takes_pose_video": ("models that follow a pose video", "pose video",
                         lambda: _ids_with_pipeline_flag("takes_pose_video")),
    "takes_mask_video": ("VACE and character-replacement models", "mask video",
                         lambda: _ids_with_pipeline_flag("takes_mask_video")),
    "takes_animate": ("character animation models", "face or background video",
                      lambda: _ids_with_pipeline_flag("takes_animate")),
}


def check_capabilities(options: dict, pipe) -> None:
    """Refuse options the model's pipeline cannot take (an `Option.needs` it lacks), naming the models that can."""
    for need, (who, what, ids) in CAPABILITIES.items():
        if getattr(pipe, need, False):
            continue
        flags = [o.flag for o in GENERATE_OPTIONS if o.needs == need and given(options, o.name)]
        if flags:
            raise MlxVideoError(f"{', '.join(flags)}: for {who} ({', '.join(ids())}); {pipe.spec.id} takes no {what}")
