"""The models mlxvid knows, with the defaults their authors publish.

A variant is one entry here, not a code path: the pipeline reads everything it needs from the entry (and
from the converted folder's own config for the network's shape).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxVideoError
from .models.wan.config import WAN_A14B_I2V, WAN_A14B_T2V, WAN_TI2V_5B, WanTransformerConfig

# The official release's default negative prompt (Wan2.2 wan/configs/shared_config.py), used when none is given.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str
    task: str  # "t2v", "i2v" or "ti2v"
    transformer: WanTransformerConfig
    two_experts: bool  # A14B: a high-noise and a low-noise expert
    boundary: float | None  # fraction of the 1000 training timesteps where the low-noise expert takes over
    vae_stride: tuple[int, int, int]  # (t, h, w) compression of the VAE
    steps: int
    shift: float
    guidance: float  # the high-noise expert's (or the only model's) guidance scale
    guidance_2: float | None  # the low-noise expert's
    fps: int
    frames: int
    sizes: tuple[tuple[int, int], ...]  # published (width, height) pairs; the first is the default
    hf_repo: str
    per_frame_timesteps: bool = False  # TI2V-5B gives each latent frame its own timestep
    sampler: str = "unipc"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    text_len: int = 512

    @property
    def size_multiple(self) -> int:
        return self.vae_stride[1] * self.transformer.patch_size[1]

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]


_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))

MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in [
        ModelSpec(
            id="wan2.2-t2v-a14b", family="wan", task="t2v", transformer=WAN_A14B_T2V, two_experts=True,
            boundary=0.875, vae_stride=(4, 8, 8), steps=40, shift=12.0, guidance=4.0, guidance_2=3.0,
            fps=16, frames=81, sizes=_A14B_SIZES, hf_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        ),
        ModelSpec(
            id="wan2.2-i2v-a14b", family="wan", task="i2v", transformer=WAN_A14B_I2V, two_experts=True,
            boundary=0.900, vae_stride=(4, 8, 8), steps=40, shift=5.0, guidance=3.5, guidance_2=3.5,
            fps=16, frames=81, sizes=_A14B_SIZES, hf_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        ),
        ModelSpec(
            id="wan2.2-ti2v-5b", family="wan", task="ti2v", transformer=WAN_TI2V_5B, two_experts=False,
            boundary=None, vae_stride=(4, 16, 16), steps=50, shift=5.0, guidance=5.0, guidance_2=None,
            fps=24, frames=121, sizes=((1280, 704), (704, 1280)), hf_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            per_frame_timesteps=True,
        ),
    ]
}


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        raise MlxVideoError(f"unknown model {model_id!r}; known models: {', '.join(MODELS)}") from None


def models_home() -> Path:
    """Where `mlxvid convert` puts a registry model by default and `generate --model ID` looks for it."""
    return Path(os.environ.get("MLXVID_HOME", Path.home() / ".cache" / "mlxvid")) / "models"
