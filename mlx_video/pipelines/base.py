"""What every family's pipeline shares: settings, their resolution against the model's defaults, validation
before any weights are read, the sampler, the memory preflight, and loading a pipeline for any model folder.

A family's pipeline subclasses `Pipeline`, whose abstract methods are the contract every family fulfils:
`latent_channels`, `encode` (the run's conditioning), `make_predict` (the `predict(latents, i, t)` function the
shared loop calls), `decode`, `vae_tile` (one `DecodeTiling` type for every family), `estimate_memory`; task
support is `image_mode` / `check_image_use` (image conditioning) and `takes_audio`. `generate` is shared by the
families that run one transformer over every step; a family with more (Wan's two experts, image conditioning)
overrides it. The CLI and the Python API only ever see this interface.
"""

from __future__ import annotations

import gc
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..errors import MlxVideoError
from ..model_folder import ModelFolder, resolve_model
from ..options import OPTIONS, check_capabilities, check_number
from ..samplers import Schedule, explicit_schedule, make_sampler
from .loop import NonFiniteGuard, ProgressHook, denoise

DEFAULT_STRENGTH = 0.8  # video-to-video, as diffusers' WanVideoToVideoPipeline


def kept_steps(steps: int, strength: float) -> int:
    """The steps a video-to-video run keeps: int(steps x strength), as diffusers' `get_timesteps`."""
    return min(int(steps * strength), steps)


# How to pass each setting on the command line, for messages about missing defaults.
OPTION_NAMES = {"steps": "--steps N", "guidance": "--guidance SCALE", "guidance_2": "--guidance-2 SCALE",
                "shift": "--shift S", "sampler": "--sampler NAME", "fps": "--fps N", "frames": "--frames N",
                "width": "--size WxH", "height": "--size WxH", "negative_prompt": "--negative-prompt TEXT"}


@dataclass
class GenerationSettings:
    """Everything that decides a generation. `None` fields take the model's published default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None  # the second expert's guidance (Wan A14B)
    true_cfg: float | None = None  # classifier-free guidance on top of embedded guidance (HunyuanVideo)
    shift: float | None = None
    sampler: str | None = None
    schedule: str | None = None  # sigma schedule; default: the model's, else the sampler's own
    sigmas: list[float] | None = None  # an explicit noise-level list (distilled checkpoints); overrides steps
    seed: int = 0
    fps: int | None = None
    guidance_mode: str = "batched"  # batched | sequential (same result, half the activation memory)
    image: str | None = None  # the conditioning image's path, for the record; its pixels are passed to generate()
    last_image: str | None = None  # first-last frame: the last frame's image path (its pixels go to generate())
    video: str | None = None  # video-to-video: the input clip's path (its frames go to generate())
    strength: float | None = None  # video-to-video: the fraction of the schedule re-noised (default 0.8)
    # VACE: a control video, a mask (a still or a video; white = generate), reference images, the hint scale,
    # and LEFT,TOP,RIGHT,BOTTOM pixels to outpaint around the --video (paths; their pixels go to generate())
    control_video: str | None = None
    mask_video: str | None = None  # also Wan Animate's replace mode: white where the character goes
    mask: str | None = None
    reference_images: list[str] | None = None
    control_scale: float | None = None
    outpaint: str | None = None
    # LoRAs fused at load: [{"path", "scale", "target": all|high|low}]; resolve() adds name, sha256, format
    loras: list[dict] | None = None
    recipe: str | None = None  # a few-step recipe (mlx_video.recipes): fills the settings left unset
    cache: str | None = None  # step cache NAME[:THRESHOLD], taylorseer[:KEY=VALUE,...] (mlx_video.pipelines.cache)
    attention: str | None = None  # dense | radial[:DENSE_STEPS[:DENSE_BLOCKS]] (mlx_video.pipelines.attention_mode)
    audio: str | None = None  # the driving voice track's path (audio-driven models: Wan S2V)
    pose_video: str | None = None  # a pose video to follow (Wan S2V, Wan Animate)
    face_video: str | None = None  # Wan Animate: the performer's face crops
    background_video: str | None = None  # Wan Animate replace mode: the video the character is put into
    animate_mode: str | None = None  # Wan Animate: animate | replace (default: replace when a background is given)
    clips: int | None = None  # at most this many clips of an audio-driven video (default: as long as the audio)
    start_from_image: bool = False  # S2V: the portrait is the first clip's motion context (official --start_from_ref)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class GenerationResult:
    latents: np.ndarray  # (1, C, T, H, W) float32, the layout the reference pipelines use
    settings: GenerationSettings
    timings: dict = field(default_factory=dict)
    experts: list = field(default_factory=list)  # which transformer ran at each step
    parallel: dict | None = None  # ranks, backend and split when run on several processes
    stats: dict = field(default_factory=dict)  # transformer_evals, reused steps (step cache), LoRA layers fused
    # Pipelines that decode as they go (a chain of clips each conditioned on the last one's pixels) return the
    # video itself: (frames, H, W, 3) uint8; `latents` then holds every clip's latents one after the other.
    video: np.ndarray | None = None


# What a family's `make_predict` returns and the shared loop calls: the model's velocity for latents at step i, time t.
Predict = Callable[[mx.array, int, Any], mx.array]


@dataclass(frozen=True)
class DecodeTiling:
    """How a family's VAE decodes (`Pipeline.vae_tile`), one type for every family: whether it cuts the frames into
    spatial tiles, whether it walks the latent frames in chunks, and the family's own plan that its decoder takes
    (`plan`: Wan's tile sizes or None, HunyuanVideo's `VAETiling`, Mochi's `VAEChunking`)."""

    spatial: bool
    temporal: bool
    plan: Any = None


class Pipeline(ABC):
    """Shared behaviour and the contract (the abstract methods) every family's pipeline fulfils."""

    uses_guidance_2 = False  # whether a second expert has its own guidance scale
    takes_true_cfg = False
    takes_audio = False  # driven by a voice track (--audio)
    takes_last_image = False  # first-last frame: --image opens the video, --last-image ends it
    takes_video = False  # video-to-video: --video re-noised by --strength
    takes_vace = False  # VACE: --control-video, --mask / --mask-video, --reference-image, --control-scale, --outpaint
    takes_pose_video = False  # follows a --pose-video (Wan S2V, Wan Animate)
    takes_animate = False  # a character driven by --pose-video and --face-video (Wan Animate)
    takes_mask_video = False  # a --mask-video (VACE; Wan Animate's replace mode)
    radial_defaults = None  # the family's RadialDefaults (mlx_video.nn.radial) where it runs --attention radial
    default_image_fit = "crop"  # how --image meets the video size without --image-fit (io.image.FIT_MODES)

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self.spec = folder.spec
        self.dtype = folder.dtype
        self._lora_cache: dict = {}  # (path, size, mtime) -> LoraFile, read once per pipeline
        self._lora_shapes: dict = {}  # component -> {our parameter key: shape}
        self._run_loras: list[dict] = []  # the current run's LoRA records (set by generate)

    @classmethod
    def from_pretrained(cls, model: str) -> "Pipeline":
        """`model` is a converted folder or a registry id whose converted folder is in the models home. Called on
        `Pipeline` itself it returns the pipeline of the folder's family."""
        folder = resolve_model(model)
        if cls is Pipeline:
            return load_pipeline(folder)
        return cls(folder)

    @classmethod
    def capable(cls, spec, need: str) -> bool:
        """Whether this class takes `need` (a key of `mlx_video.options.CAPABILITIES`) for the model `spec`,
        without a model folder: a class serving several tasks says per task."""
        return bool(getattr(cls, need, False))

    # ---- settings and validation: all of it happens before any weights are read ----

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latents the transformer denoises."""

    # ---- the stages: the contract ----

    @abstractmethod
    def encode(self, s: GenerationSettings, progress: bool = False) -> Any:
        """The run's conditioning from its resolved settings: the prompt's (and, when guided, the negative
        prompt's) text embeddings, in whatever form the family's `make_predict` takes."""

    @abstractmethod
    def make_predict(self, s: GenerationSettings, *args, **kwargs) -> Predict:
        """`predict(latents, i, t)` for the shared loop: the model at step i, guided."""

    @abstractmethod
    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, C, T, H, W) latents -> (frames, height, width, 3) uint8 video, and decoding statistics. A run's
        latents are decoded as `decode(video_latents(latents, settings))`: decoding depends on its arguments only."""

    def video_latents(self, latents: np.ndarray, s: GenerationSettings) -> np.ndarray:
        """The part of the latents of a run with settings `s` that decodes to its video: all of them, unless the
        family keeps conditioning frames in front of the video's (`latent_shape`), which it drops here."""
        return latents

    @abstractmethod
    def vae_tile(self, mode: str, latent_hw: tuple[int, int], frames: int | None = None) -> DecodeTiling:
        """How the VAE decodes latents of `latent_hw` (and `frames` output frames) for --vae-tiling `mode` (auto, on,
        off); refuses another mode."""

    @abstractmethod
    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes per stage: {"stages": {stage: bytes}, "peak_stage", "peak_bytes", "detail"}."""

    def load_transformer(self):
        raise NotImplementedError(f"{type(self).__name__} loads its transformers in its own generate")

    def generate(self, settings: GenerationSettings, init_latents: np.ndarray | None = None, progress: bool = False,
                 image: np.ndarray | None = None, hooks=()) -> GenerationResult:
        """One transformer over every step: encoding, then the shared denoising loop with the family's `predict`;
        (1, C, T, H, W) float32 latents in diffusers' layout. `hooks`: extra per-step callables `(i, t, latents)`
        run after each step."""
        from .cache import make_step_cache

        s = self.resolve(settings)
        self.check_image_use(image is not None)
        if init_latents is not None:
            init_latents = self.check_init_latents(s, init_latents)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        context = self.encode(s, progress)
        timings["text_encoding"] = time.perf_counter() - start

        latents = self.initial_latents(s, init_latents)
        sampler = self.make_sampler(s)
        schedule = ["transformer"] * s.steps
        step_cache = make_step_cache(s.cache, s.steps, schedule, self.spec.id)
        self._run_loras = s.loras or []
        model = self.load_transformer()
        predict = self.make_predict(s, model, context, sampler=sampler, step_cache=step_cache)
        radial, predict = self.with_radial(s, model, *self.token_grid(latents.shape), predict)
        start = time.perf_counter()
        try:
            latents = self.run_denoising(sampler, latents, predict, s.steps, progress, hooks)
        finally:
            del model, predict
            release()
        timings["denoising"] = time.perf_counter() - start
        result = GenerationResult(reference_layout(latents), s, timings, schedule)
        result.stats = step_cache.stats()
        if radial is not None:
            result.stats.update(radial.stats())
        return result

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        """(latent frames, tokens per frame) of the transformer's patched grid over latents (B, T, H, W, C)."""
        raise NotImplementedError(f"{type(self).__name__} patches its latents in its own generate")

    def default(self, name: str):
        value = self.spec.default(name)
        if value is None:
            raise MlxVideoError(
                f"{self.folder.path} has no default {name} (its manifest model {self.spec.id!r} is not in the registry "
                f"and its mlxvid.json 'defaults' lacks it): pass {OPTION_NAMES.get(name, name)}, or add \"{name}\" to "
                "the defaults in its mlxvid.json"
            )
        return value

    def position_limit(self) -> tuple[int, tuple[int, int, int]] | None:
        """(positions per axis the transformer's RoPE table covers, its patch size (t, h, w)), or None where the
        positions are unbounded (computed on the fly)."""
        return None

    def check_positions(self, s: GenerationSettings) -> None:
        """Refuse, before any weights are read, a size or frame count whose latent grid the RoPE table does not
        cover (a preset's render size, say), rather than fail at the first step."""
        limit = self.position_limit()
        if limit is None:
            return
        positions, patch = limit
        st, sh, sw = self.spec.vae_stride
        latent = ((s.frames - 1) // st + 1, s.height // sh, s.width // sw)
        grid = tuple(-(-n // p) for n, p in zip(latent, patch))
        if max(grid) > positions:
            raise MlxVideoError(f"{s.width}x{s.height}, {s.frames} frames is a latent grid of {grid} (frames, height, "
                                f"width) after patching; {self.spec.id}'s RoPE covers {positions} positions per axis. "
                                "Choose a smaller --size (or --preset / --quality) or fewer --frames")

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """The settings with the model's defaults filled in, checked (by the option schema's rules) against
        the model: all of it before any weights are read."""
        s = GenerationSettings.from_dict(settings.to_dict())
        check_capabilities({"audio": s.audio, "pose_video": s.pose_video, "face_video": s.face_video,
                            "background_video": s.background_video, "animate_mode": s.animate_mode, "clips": s.clips,
                            "start_from_portrait": s.start_from_image, "guidance_2": s.guidance_2,
                            "true_cfg": s.true_cfg, "last_image": s.last_image, "video": s.video,
                            "strength": s.strength, "control_video": s.control_video, "mask_video": s.mask_video,
                            "mask": s.mask, "reference_image": s.reference_images, "control_scale": s.control_scale,
                            "outpaint": s.outpaint}, self)
        self._fill_defaults(s)
        self._check_settings(s)
        if s.loras:
            s.loras = self.resolve_loras(s.loras)
        return s

    def _fill_defaults(self, s: GenerationSettings) -> None:
        spec = self.spec
        if s.recipe is not None:
            from ..recipes import apply_recipe

            apply_recipe(s, spec)
        if s.negative_prompt is None:
            s.negative_prompt = spec.default("negative_prompt", "")
        if s.width is None and s.height is None:
            if not spec.sizes:
                self.default("width")
            s.width, s.height = spec.default_size
        if s.width is None or s.height is None:
            raise MlxVideoError("give both width and height (--size WxH)")
        for name in ("frames", "guidance", "fps", "sampler"):
            if getattr(s, name) is None:
                setattr(s, name, self.default(name))
        s.steps = len(s.sigmas) if s.sigmas is not None else s.steps if s.steps is not None else self.default("steps")
        if s.schedule is None:
            s.schedule = spec.default("schedule")
        if s.shift is None:
            s.shift = spec.default("shift", 1.0) if s.schedule == "linear-quadratic" else self.default("shift")
        if self.uses_guidance_2 and s.guidance_2 is None:
            s.guidance_2 = spec.default("guidance_2", s.guidance)
        if s.video is not None and s.strength is None:
            s.strength = DEFAULT_STRENGTH

    def _check_settings(self, s: GenerationSettings) -> None:
        """Every resolved setting by its option's rule (mlx_video.options), then the model's own rules."""
        self.spec.check_geometry(s.width, s.height, s.frames)
        self.check_positions(s)
        for name in ("steps", "guidance", "guidance_2", "true_cfg", "shift", "fps", "sampler", "schedule",
                     "guidance_mode", "clips"):
            OPTIONS[name].convert(getattr(s, name))
        if s.sigmas is not None:
            try:
                explicit_schedule(sigmas=s.sigmas)
            except ValueError as e:
                raise MlxVideoError(f"--sigmas: {e}") from None
        self._check_video_settings(s)
        if s.last_image is not None and s.image is None:
            raise MlxVideoError("--last-image is the video's last frame: give the first one with --image too")
        self.check_image_use(s.image is not None)
        if s.cache is not None:
            from .cache import parse_cache

            parse_cache(s.cache, self.spec.id)
        if s.attention is not None:
            from .attention_mode import check_attention

            check_attention(s.attention, self.radial_defaults, self.spec.id)

    def _check_video_settings(self, s: GenerationSettings) -> None:
        """Video-to-video: a --strength needs a --video, takes no --image, and keeps at least one step."""
        if s.strength is None:
            return
        OPTIONS["strength"].convert(s.strength)
        if s.video is None:
            raise MlxVideoError("--strength is how much of a --video is re-noised: give the --video too")
        if s.image is not None:
            raise MlxVideoError("give --video (video-to-video) or --image (image-to-video), not both")
        if s.cache is not None:
            raise MlxVideoError("--cache decides by the step of a whole schedule; it does not run with --video yet")
        if kept_steps(s.steps, s.strength) < 1:
            raise MlxVideoError(f"--strength {s.strength:g} of {s.steps} steps keeps no step (int(steps x strength) "
                                "= 0): raise --strength or --steps")

    # ---- LoRAs: checked in resolve(), fused when a transformer loads ----
    #
    # A family supplies its converter's key tables (`lora_keymaps`), a weightless model of a component
    # (`lora_model`) and, where its layers fuse what the key tables split, the slice sizes (`lora_parts`);
    # a family with several experts says which take a LoRA of each target (`lora_experts`).

    transformer_components = ("transformer",)

    def lora_keymaps(self) -> list | None:
        """The key tables of the family's transformer checkpoints (diffusers and official naming); None: the
        family takes no LoRAs."""
        return None

    def lora_model(self, component: str):
        """The transformer `component` built without reading weights (for its parameter shapes)."""
        raise NotImplementedError

    def lora_parts(self, component: str) -> dict[str, tuple[int, ...]]:
        """Our fused layers that the key tables fill slice by slice: layer name -> slice sizes (output axis)."""
        return {}

    def lora_splits(self) -> list[tuple[str, tuple[str, ...]]]:
        """Layers a LoRA file may hold fused that our model keeps separate: (pattern on the file's module name,
        the names of our layers it splits into, in row order) for `lora.read_lora`."""
        return []

    def lora_experts(self, target: str) -> list[str]:
        """The components a LoRA with `target` (all | high | low) is fused into."""
        if target == "all":
            return list(self.transformer_components)
        raise MlxVideoError(f"--lora-{target} is for a model with two experts; {self.spec.id} has one (use --lora)")

    def expert_label(self, component: str) -> str:
        return "model"

    def resolve_loras(self, loras: list[dict]) -> list[dict]:
        """Check the LoRAs against the model (files, keys, shapes) before any weights are read; returns the records
        the sidecar keeps."""
        from mlx.utils import tree_flatten

        from ..lora import TARGETS, check_lora, lora_record, read_lora

        keymaps = self.lora_keymaps()
        if keymaps is None:
            raise MlxVideoError(f"{self.spec.id}: LoRAs are not supported for the {self.spec.family} family yet")
        records = []
        for entry in loras:
            path, scale, target = str(entry.get("path")), entry.get("scale", 1.0), entry.get("target", "all")
            check_number(f"the strength of LoRA {path}", scale)
            if target not in TARGETS:
                raise MlxVideoError(f"LoRA {path}: target must be one of {', '.join(TARGETS)}, not {target!r}")
            experts = self.lora_experts(target)
            if not Path(path).is_file():
                raise MlxVideoError(f"LoRA file {path} does not exist")
            key = _file_key(path)
            if key not in self._lora_cache:
                self._lora_cache[key] = read_lora(path, keymaps, splits=self.lora_splits())
            lora = self._lora_cache[key]
            for name in experts:
                if name not in self._lora_shapes:  # built lazily: no weights are materialised
                    params = tree_flatten(self.lora_model(name).parameters())
                    self._lora_shapes[name] = {k: tuple(v.shape) for k, v in params}
                check_lora(lora, self._lora_shapes[name], f"{self.spec.id} ({self.expert_label(name)})",
                           self.lora_parts(name))
            records.append(lora_record(lora, float(scale), target))
        return records

    def loras_for(self, component: str) -> list:
        """(LoraFile, strength) pairs that apply to `component` in the current run."""
        pairs = []
        for record in self._run_loras or []:
            if component in self.lora_experts(record["target"]):
                pairs.append((self._lora_cache[_file_key(record["path"])], record["scale"]))
        return pairs

    def fuse_run_loras(self, model, component: str) -> int:
        """Fuse the current run's LoRAs for `component` into its freshly loaded `model`; the layers changed."""
        pairs = self.loras_for(component)
        if not pairs:
            return 0
        from ..lora import fuse_loras

        return fuse_loras(model, pairs, self.lora_parts(component))

    @property
    def image_mode(self) -> str | None:
        return None

    def check_image_use(self, has_image: bool) -> None:
        if has_image and self.image_mode is None:
            raise MlxVideoError(f"{self.spec.id} is a text-to-video model: it takes no --image")
        if not has_image and self.spec.task == "i2v":
            raise MlxVideoError(f"{self.spec.id} animates an image: pass --image PATH")
        if has_image and not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no VAE (vae/), which encoding the --image needs")

    def source_inputs(self, o: dict, s: GenerationSettings, image_fit: str, source: np.ndarray | None) -> dict:
        """generate()'s arrays from the input video (`source`, (F, H, W, 3) uint8, already cut to the run's
        frames) and any other input files the options name; read before any weights load."""
        if source is None:
            return {}
        from ..io.source_video import fit_frames_to

        return {"video": fit_frames_to(source, s.width, s.height, image_fit)}

    def make_sampler(self, s: GenerationSettings):
        """The run's step rule over its schedule; video-to-video keeps its last int(steps x strength) steps, a
        fresh multistep history from there (diffusers' `get_timesteps`)."""
        if s.sigmas is not None:
            sampler = make_sampler(s.sampler, schedule=explicit_schedule(sigmas=s.sigmas))
        else:
            sampler = make_sampler(s.sampler, s.steps, s.shift, schedule=s.schedule)
        if s.strength is None:
            return sampler
        total = len(sampler.timesteps)
        start = total - kept_steps(total, s.strength)
        return make_sampler(s.sampler, schedule=Schedule(sampler.sigmas[start:-1], sampler.timesteps[start:]))

    @staticmethod
    def renoise(encoded: mx.array, noise: mx.array, sampler) -> mx.array:
        """Video-to-video's starting latents: the encoded video mixed with noise at the first kept sigma,
        (1 - sigma) x0 + sigma noise, in float32 (diffusers' `add_noise` / `scale_noise` for flow sigmas)."""
        sigma = np.float32(sampler.sigmas[0])
        return encoded.astype(mx.float32) * float(np.float32(1.0) - sigma) + noise * float(sigma)

    def latent_shape(self, s: GenerationSettings) -> tuple[int, int, int, int, int]:
        """(1, C, T, H, W): the reference pipelines' layout."""
        return (1, self.latent_channels, *self.spec.latent_grid(s.width, s.height, s.frames))

    def check_init_latents(self, s: GenerationSettings, latents: np.ndarray) -> np.ndarray:
        expected = self.latent_shape(s)
        st, sh, sw = self.spec.vae_stride
        if latents.ndim != 5 or tuple(latents.shape) != expected:
            raise MlxVideoError(
                f"--init-latents has shape {tuple(latents.shape)}; {s.width}x{s.height} with {s.frames} frames needs "
                f"{expected} (batch, channels, latent frames, height/{sh}, width/{sw})"
            )
        if not np.issubdtype(latents.dtype, np.floating):
            raise MlxVideoError(f"--init-latents must hold floats, not {latents.dtype}")
        if not np.isfinite(latents).all():
            raise MlxVideoError("--init-latents contains NaN or infinite values")
        return latents.astype(np.float32)

    def initial_latents(self, s: GenerationSettings, init_latents: np.ndarray | None) -> mx.array:
        """Seeded noise, or the given latents, channels-last (1, T, H, W, C) float32."""
        if init_latents is None:
            latents = mx.random.normal(self.latent_shape(s), key=mx.random.key(s.seed))
        else:
            latents = mx.array(init_latents)
        return latents.transpose(0, 2, 3, 4, 1)

    def radial_run(self, s: GenerationSettings, latent_frames: int, tokens_per_frame: int):
        """The run's radial attention (`--attention`, mlx_video.pipelines.attention_mode), None when dense."""
        from .attention_mode import make_radial_run

        return make_radial_run(s.attention, self.radial_defaults, latent_frames, tokens_per_frame)

    def attention_estimate(self, s: GenerationSettings):
        """The run's self-attention as the memory preflight counts it: the `sparse=` a family's cost model passes
        to `mlx_video.nn.attention.blocked_score_bytes` (the radial run over this run's token grid), None when
        dense."""
        if s.attention is None:
            return None
        _, channels, frames, height, width = self.latent_shape(s)
        return self.radial_run(s, *self.token_grid((1, frames, height, width, channels)))

    def with_radial(self, s: GenerationSettings, model, latent_frames: int, tokens_per_frame: int, predict):
        """Attach the run's attention (radial, or dense) to `model`; returns (the radial run or None, `predict`
        telling the run each step's index)."""
        from .attention_mode import prepare_model

        radial = self.radial_run(s, latent_frames, tokens_per_frame)
        prepare_model(model, radial)
        return radial, (predict if radial is None else radial.wrap(predict))

    def run_denoising(self, sampler, latents: mx.array, predict, steps: int, progress: bool, hooks=(),
                      label=None) -> mx.array:
        """The shared loop with what every family puts around it: the NaN guard (naming `label(i)`, the model that
        ran at step i), a progress bar, then the caller's hooks."""
        from tqdm.auto import tqdm

        guard = NonFiniteGuard(steps) if label is None else NonFiniteGuard(steps, label)
        bar = tqdm(total=steps, desc="denoising", disable=not progress)
        try:
            return denoise(sampler, latents, predict, [guard, ProgressHook(bar, label), *hooks])
        finally:
            bar.close()

    # ---- memory preflight ----

    @property
    def can_decode(self) -> bool:
        return self.folder.has("vae")

    def component_bytes(self, component: str) -> int:
        if not self.folder.has(component):
            return 0
        return sum(p.stat().st_size for p in (self.folder.path / component).glob("*.safetensors"))

    def check_memory(self, s: GenerationSettings, limit_bytes: int | None, tiling: str = "auto",
                     has_image: bool = False) -> dict:
        """Refuse, before any weights are read, a run whose estimated peak exceeds `limit_bytes` (default: the
        memory available now). Returns the estimate, for the record."""
        estimate = self.estimate_memory(s, tiling, has_image)
        limit = available_memory_bytes() if limit_bytes is None else limit_bytes
        estimate["limit_bytes"] = limit
        if limit is not None and estimate["peak_bytes"] > limit:
            stages = ", ".join(f"{k} {format_bytes(v)}" for k, v in estimate["stages"].items())
            hints = ["a smaller --size or fewer --frames"]
            if self.folder.manifest.get("quantization") is None:
                hints.append("a quantized conversion (mlxvid convert ... --quantize q8 or q4)")
            if estimate["peak_stage"] == "decoding":
                hints.append("--vae-tiling on")
            if estimate["peak_stage"] == "denoising" and s.guidance_mode == "batched":
                hints.append("--guidance-mode sequential")
            raise MlxVideoError(
                f"this run needs about {format_bytes(estimate['peak_bytes'])} at its peak ({estimate['peak_stage']}; "
                f"per stage: {stages}) but {format_bytes(limit)} are available. Try "
                + ", or ".join(hints) + "; --max-memory GB overrides the limit (the figures are estimates)"
            )
        return estimate


def reference_layout(latents: mx.array) -> np.ndarray:
    """Channels-last (1, T, H, W, C) latents as the reference pipelines' (1, C, T, H, W) float32 numpy array."""
    return np.array(latents.transpose(0, 4, 1, 2, 3).astype(mx.float32))


def _file_key(path) -> tuple:
    """(resolved path, size, mtime) of a file, so that a LoRA replaced on disk is read again."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def load_pipeline(folder: ModelFolder) -> Pipeline:
    """The pipeline of the folder's family (mlx_video.families)."""
    from ..families import pipeline_class

    return pipeline_class(folder.spec.family, folder.spec.task)(folder)


def format_bytes(n: float) -> str:
    if n < 1024**3:
        return f"{n / 1024**2:.0f} MiB"
    return f"{n / 1024**3:.1f} GiB"


def available_memory_bytes() -> int | None:
    """Memory a run can count on: the GPU's working set on a Mac, MemAvailable elsewhere (None if unknown)."""
    try:
        if mx.metal.is_available():
            info = mx.metal.device_info()
            return int(info.get("max_recommended_working_set_size", info.get("memory_size")))
    except Exception:  # device_info is missing on some builds; fall through to the OS figure
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release() -> None:
    gc.collect()
    mx.clear_cache()
