"""HunyuanVideo 1.5 transformer configuration: the published numbers (Tencent-Hunyuan/HunyuanVideo-1.5 README and
`hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py`; diffusers' `HunyuanVideo15Transformer3DModel`
defaults, which the diffusers conversion script uses for every variant)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_video.json_config import JsonConfig


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
