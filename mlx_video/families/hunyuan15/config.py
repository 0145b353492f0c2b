"""HunyuanVideo 1.5 transformer configuration: the published numbers (Tencent-Hunyuan/HunyuanVideo-1.5 README and
`hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py`; diffusers' `HunyuanVideo15Transformer3DModel`
defaults, which the diffusers conversion script uses for every variant)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mlx_video.json_config import JsonConfig
from mlx_video.nn.radial import RadialDefaults


@dataclass(frozen=True)
class Hunyuan15Config(JsonConfig):
    num_heads: int = 16
    head_dim: int = 128
    mlp_ratio: float = 4.0
    num_blocks: int = 54  # double-stream blocks; the 1.5 model has no single-stream ones
    num_refiner_blocks: int = 2
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 256.0
    patch_size: tuple[int, int, int] = (1, 1, 1)
    in_channels: int = 65  # noisy latents 32 + condition latents 32 + mask 1 (SR models: 98, + low-res 32 + mask 1)
    out_channels: int = 32
    text_dim: int = 3584  # Qwen2.5-VL-7B's hidden size (txt_in)
    glyph_dim: int = 1472  # ByT5-small's d_model (byt5_in)
    glyph_hidden: int = 2048  # byt5_in's inner width (fixed in the release, not tied to the model width)
    image_dim: int = 1152  # SigLIP's hidden size (vision_in)
    freq_dim: int = 256
    use_meanflow: bool = False  # the step-distilled model's time_r_in (MeanFlow)
    target_size: int = 640  # the resolution bucket base in pixels (480p: 640, 720p: 960, 1080p: 1440)
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "rope_axes", tuple(self.rope_axes))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if sum(self.rope_axes) != self.head_dim or any(d % 2 for d in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")
        c = self.out_channels
        if self.in_channels not in (2 * c + 1, 3 * c + 2):
            raise ValueError(f"in_channels {self.in_channels} must be 2 x out_channels + 1 (noisy latents, "
                             "condition latents, mask) or, for the super-resolution models, 3 x out_channels + 2 "
                             f"(also the low-resolution latents and their mask); out_channels is {c}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


HUNYUAN15_480P = Hunyuan15Config()
HUNYUAN15_720P = Hunyuan15Config(target_size=960)
HUNYUAN15_480P_MEANFLOW = Hunyuan15Config(use_meanflow=True)
# the super-resolution transformers: [noisy, condition + mask, low-resolution latents + mask] (the official
# hyvideo/pipelines/hunyuan_video_sr_pipeline.py concatenates 32 + 33 + 33 channels)
HUNYUAN15_SR_720P = Hunyuan15Config(in_channels=98, target_size=960)
HUNYUAN15_SR_1080P = Hunyuan15Config(in_channels=98, target_size=1440)


# Radial attention (`--attention radial`). The reference repository (mit-han-lab/radial-attention 72788d4) has no
# HunyuanVideo 1.5 script; our rule: HunyuanVideo 1.0's settings, the reference's own for that model
# (radial_attn/models/hunyuan/attention.py: 128-token tiles, model_type "hunyuan", i.e. no first-frame rule, the
# text after the video kept whole; scripts/hunyuan_t2v_inference.sh: decay 0.95, 12 dense steps of 50, no dense
# layer). Why they carry over:
# - the same joint attention: every block attends over [video; text] with the text after the video (diffusers'
#   HunyuanVideo15AttnProcessor2_0 concatenates the text after the video), so the text rows and columns are kept
#   whole as for 1.0. 1.5's text is three sources, [SigLIP image tokens (I2V), ByT5 glyph tokens, Qwen tokens],
#   all after the video: every one of them is kept whole, as 1.0's Llama tokens are;
# - the same tokens per latent frame at a given resolution: 720p is 45 x 80 = 3,600 tokens a frame in both (1.5:
#   a 16x VAE and patch 1; 1.0: 90 x 160 latents of an 8x VAE, patch 2), so the band widths and thinning are
#   the same functions of the frame distance;
# - the I2V image is a condition beside the noise on latent frame 0 (channels, not tokens), so the token grid
#   is the T2V one.
# What differs: 1.5 has no single-stream blocks; its 54 double-stream blocks are the attention sites, counted in
# order (1.0 counts its 20 double-stream blocks, then the single-stream ones). Dense steps: 12 of 50, as 1.0,
# and the same share of a model with fewer default steps (the step-distilled I2V, 8 steps: ceil(12 x 8 / 50)
# = 2). The super-resolution transformers have none (`radial_defaults` gives None, so --attention radial is
# refused for them): the reference has no such model, and their 6-8 steps are fewer than the dense ones.
RADIAL_HUNYUAN = RadialDefaults(block=128, decay=0.95, dense_steps=12, dense_blocks=0, first_frame_dense=False,
                                source="ours: HunyuanVideo 1.0's parameters (mit-han-lab/radial-attention 72788d4 "
                                       "has no HunyuanVideo 1.5 setting)")
RADIAL_REFERENCE_STEPS = 50  # the run length of the reference's 12 dense steps


def radial_defaults(spec) -> RadialDefaults | None:
    """The radial-attention parameters of a registry model of this family (None for the super-resolution
    models): HunyuanVideo 1.0's, with 12 of 50 dense steps scaled to the model's default steps."""
    if spec.task == "sr":
        return None
    dense = math.ceil(RADIAL_HUNYUAN.dense_steps * spec.steps / RADIAL_REFERENCE_STEPS)
    return replace(RADIAL_HUNYUAN, dense_steps=min(dense, RADIAL_HUNYUAN.dense_steps))
