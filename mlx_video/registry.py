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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlxVideoError

# The official release's default negative prompt (Wan2.2 wan/configs/shared_config.py), used when none is given.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Wan2.2-S2V's own negative prompt (wan/configs/wan_s2v_14B.py sample_neg_prompt).
WAN_S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

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


def _wan_specs() -> list[ModelSpec]:
    from mlx_video.families.wan.config import WAN_A14B_I2V, WAN_A14B_T2V, WAN_TI2V_5B
    from mlx_video.families.wan.s2v_model import WAN_S2V_14B

    a14b_sizes = ((1280, 720), (720, 1280), (832, 480), (480, 832))
    common = dict(sampler="unipc", negative_prompt=WAN_NEGATIVE_PROMPT, text_len=512)
    return [
        ModelSpec(
            id="wan2.2-t2v-a14b", family="wan", task="t2v", vae_stride=(4, 8, 8), size_multiple=16, sizes=a14b_sizes,
            defaults=dict(common, steps=40, shift=12.0, guidance=4.0, guidance_2=3.0, fps=16, frames=81, boundary=0.875),
            hf_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers", experts=2, transformer=WAN_A14B_T2V,
            description="Wan 2.2 text-to-video, two 14B experts",
        ),
        ModelSpec(
            id="wan2.2-i2v-a14b", family="wan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16, sizes=a14b_sizes,
            defaults=dict(common, steps=40, shift=5.0, guidance=3.5, guidance_2=3.5, fps=16, frames=81, boundary=0.900),
            hf_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers", experts=2, transformer=WAN_A14B_I2V,
            description="Wan 2.2 image-to-video, two 14B experts",
        ),
        ModelSpec(
            id="wan2.2-ti2v-5b", family="wan", task="ti2v", vae_stride=(4, 16, 16), size_multiple=32,
            sizes=((1280, 704), (704, 1280)),
            defaults=dict(common, steps=50, shift=5.0, guidance=5.0, fps=24, frames=121, per_frame_timesteps=True),
            hf_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers", transformer=WAN_TI2V_5B,
            description="Wan 2.2 text- and image-to-video, 5B",
        ),
        ModelSpec(
            # frames: per clip (4n; the video follows the audio, clip after clip); sizes are multiples of 64 (the
            # 4x frame-pack projection) and, without --size, the portrait's aspect ratio within max_area sets it
            id="wan2.2-s2v-14b", family="wan", task="s2v", vae_stride=(4, 8, 8), size_multiple=64,
            sizes=((1024, 704), (704, 1024)), frame_offset=0,
            defaults=dict(common, negative_prompt=WAN_S2V_NEGATIVE_PROMPT, steps=40, shift=3.0, guidance=4.5, fps=16,
                          frames=80, max_area=1024 * 704, drop_first_motion=True),
            hf_repo="Wan-AI/Wan2.2-S2V-14B", transformer=WAN_S2V_14B,
            description="Wan 2.2 speech-to-video: a portrait and a voice track to a talking video, 14B",
        ),
    ]


def _hunyuan_specs() -> list[ModelSpec]:
    from mlx_video.families.hunyuan.config import HUNYUAN_T2V_720P

    return [
        ModelSpec(
            id="hunyuanvideo-t2v", family="hunyuan", task="t2v", vae_stride=(4, 8, 8), size_multiple=16,
            sizes=((1280, 720), (720, 1280), (960, 544), (544, 960)),
            # guidance is the embedded (distilled) scale; --true-cfg adds real CFG with a negative prompt
            defaults=dict(steps=50, shift=7.0, guidance=6.0, sampler="euler", schedule="shifted-linear", fps=24,
                          frames=129, negative_prompt="", text_len=256),
            hf_repo="hunyuanvideo-community/HunyuanVideo", transformer=HUNYUAN_T2V_720P,
            description="HunyuanVideo text-to-video, 13B (720p, guidance-distilled)",
        ),
    ]


def _mochi_specs() -> list[ModelSpec]:
    from mlx_video.families.mochi.config import MOCHI_1_PREVIEW

    return [
        ModelSpec(
            id="mochi-1-preview", family="mochi", task="t2v", vae_stride=(6, 8, 8), size_multiple=16,
            sizes=((848, 480), (480, 848)),
            # guidance is classifier-free (diffusers' MochiPipeline and the official README: 4.5; genmo's demo
            # CLI defaults to 6.0); the schedule is Mochi's linear-quadratic one, without shift
            defaults=dict(steps=64, shift=1.0, guidance=4.5, sampler="euler", schedule="linear-quadratic", fps=30,
                          frames=163, negative_prompt="", text_len=256, zero_empty_prompt=False),
            hf_repo="genmo/mochi-1-preview", transformer=MOCHI_1_PREVIEW,
            description="Genmo Mochi 1 preview text-to-video, 10B (480p)",
        ),
    ]


MODELS: dict[str, ModelSpec] = {spec.id: spec for spec in _wan_specs() + _hunyuan_specs() + _mochi_specs()}


def models_with_task(task: str) -> list[str]:
    """The registry ids of one task (e.g. "s2v", the audio-driven models), for messages."""
    return [spec.id for spec in MODELS.values() if spec.task == task]


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        raise MlxVideoError(f"unknown model {model_id!r}; known models: {', '.join(MODELS)}") from None


def models_home() -> Path:
    """Where `mlxvid convert` puts a registry model by default and `generate --model ID` looks for it."""
    return Path(os.environ.get("MLXVID_HOME", Path.home() / ".cache" / "mlxvid")) / "models"
