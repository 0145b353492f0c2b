"""What a model family declares: its published models (`ModelSpec`) and where its code lives (`Family`).

Each family package (`mlx_video/families/<name>/__init__.py`) builds one `Family` from these; the registry and
the family table are collected from the packages (`mlx_video.families`). This module imports no family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import MlxVideoError

@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str  # a key of mlx_video.families.FAMILIES
    task: str  # "t2v", "i2v" or "ti2v" (text, image, or text with an optional image)
    vae_stride: tuple[int, int, int]  # (t, h, w) compression of the VAE: frames are of the form t*n + 1
    size_multiple: int  # width and height must be multiples of it (VAE stride x transformer patch)
    sizes: tuple[tuple[int, int], ...]  # published (width, height) pairs; the first is the default
    defaults: dict[str, Any]  # published generation settings (steps, guidance, sampler, shift, fps, frames, ...)
    hf_repo: str | None = None  # the diffusers-layout repository `mlxvid download` fetches
    experts: int = 1  # transformers run in turn over the steps (Wan A14B: 2, a high- and a low-noise expert)
    transformer: Any = None  # the family's published transformer config, for shape checks at conversion
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # family facts that are not settings
    # Frames are stride*n + frame_offset: 1 for a whole video (the first latent frame stands for one frame),
    # 0 for a clip of a chain whose first frames come from the previous clip (Wan S2V's 80-frame clips).
    frame_offset: int = 1

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]

    @property
    def frame_stride(self) -> int:
        return self.vae_stride[0]

    def default(self, name: str, fallback: Any = None) -> Any:
        return self.defaults.get(name, fallback)

    # The most used defaults, by name.
    @property
    def steps(self) -> int:
        return self.defaults["steps"]

    @property
    def frames(self) -> int:
        return self.defaults["frames"]

    @property
    def fps(self) -> int:
        return self.defaults["fps"]

    @property
    def cfg_by_default(self) -> bool:
        """Whether the published settings run classifier-free guidance (two passes a step): a guidance scale other
        than 1, unless the model embeds it (`extra["embedded_guidance"]`: the scale is an input of one pass)."""
        return float(self.default("guidance", 1.0)) != 1.0 and not self.extra.get("embedded_guidance", False)

    def check_geometry(self, width: int, height: int, frames: int) -> None:
        """Refuse a size or frame count the model cannot take, naming the rule."""
        m = self.size_multiple
        if width <= 0 or height <= 0 or width % m or height % m:
            raise MlxVideoError(
                f"size {width}x{height} is not supported by {self.id}: width and height must be positive multiples "
                f"of {m} (published sizes: {', '.join(f'{w}x{h}' for w, h in self.sizes)})"
            )
        t, k = self.frame_stride, self.frame_offset
        if frames < max(1, k + (t if k == 0 else 0)) or (frames - k) % t:
            lo = max(t if k == 0 else 1, (frames - k) // t * t + k)
            raise MlxVideoError(f"--frames must be of the form {self.frame_rule} (e.g. {lo} or {lo + t}), got {frames}")

    @property
    def frame_rule(self) -> str:
        return f"{self.frame_stride}n" + (f"+{self.frame_offset}" if self.frame_offset else "")

    def latent_grid(self, width: int, height: int, frames: int) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) of a video: the one place video geometry is computed."""
        self.check_geometry(width, height, frames)
        st, sh, sw = self.vae_stride
        k = self.frame_offset
        return (frames - k) // st + k, height // sh, width // sw



@dataclass(frozen=True)
class Family:
    """A model family: its published models and its code, as modules of its own package ("module" or
    "module:attribute", relative to the package), imported only when used.

    pipeline        the pipeline class (`from_folder(ModelFolder)`, see `mlx_video.pipelines.base.Pipeline`)
    task_pipelines  (task, class) for tasks whose generation differs in kind (e.g. a chain of audio-driven clips)
    converter       the conversion planner: `claims(src, components)`, `plan(...)`, `SIGNATURES`, `LOOKALIKES`
    cost            the FLOP and memory model used by the preflight and the benchmarks
    bench           the benchmark cases (a step, a VAE decode, the references as data; see mlx_video/bench_case.py),
                    if the family has them
    latent_rgb      a module with `FACTORS = {channels: (weights, bias)}` for live previews, if the family has one
    mag_tables      a {model id: MagTable} of published MagCache calibrations, if any
    recipes         a list of few-step `Recipe`s published for the family's models, if any
    catch_all       the planner that explains a source no family claims (one family at most)
    order           where the family comes in listings
    official_layout the official release layout its planner reads, in words (for `mlxvid convert --help`)
    schedule_names  (name, schedule): the family's own name for a shared sigma schedule, which --schedule also
                    takes (and sidecars written before the schedule had a shared name hold)
    """

    name: str
    title: str
    models: tuple[ModelSpec, ...]
    pipeline: str = "pipeline:Pipeline"
    converter: str = "planner"
    cost: str = "cost_model"
    bench: str | None = None
    task_pipelines: tuple[tuple[str, str], ...] = ()
    latent_rgb: str | None = None
    mag_tables: str | None = None
    recipes: str | None = None
    catch_all: bool = False
    order: int = 100  # position in listings (`mlxvid models`, the registry): lower first, ties by name
    text_encoders: str = ""  # what `convert --text-encoder` (and --text-encoder-2) take, for the help
    tokenizer: str = ""  # what `convert --tokenizer` takes, for the help
    official_layout: str = ""  # the official release's folder layout, for `mlxvid convert --help` (if it converts one)
    schedule_names: tuple[tuple[str, str], ...] = ()  # (name, a key of samplers.SCHEDULES)
    package: str = ""  # the family's package, filled in when it is discovered
