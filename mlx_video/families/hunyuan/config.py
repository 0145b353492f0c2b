"""HunyuanVideo (HYVideo-T/2-cfgdistill, 720p T2V) transformer and VAE configurations, published defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_video.json_config import JsonConfig
from mlx_video.nn.radial import RadialDefaults


IMAGE_CONDITIONS = (None, "token_replace", "latent_concat")


@dataclass(frozen=True)
class HunyuanTransformerConfig(JsonConfig):
    num_heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    num_double_blocks: int = 20
    num_single_blocks: int = 40
    num_refiner_blocks: int = 2
    refiner_mlp_ratio: float = 4.0  # the token refiner's own, not tied to mlp_ratio
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 256.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 256
    pooled_dim: int = 768
    freq_dim: int = 256
    guidance_embed: bool = True
    eps: float = 1e-6
    # HunyuanVideo-I2V: None (T2V), "token_replace" (the first latent frame is the clean image, modulated as at
    # timestep 0) or "latent_concat" (the image's latents and a first-frame mask beside the noise)
    image_condition: str | None = None

    def __post_init__(self):
        if self.image_condition not in IMAGE_CONDITIONS:
            raise ValueError(f"image_condition {self.image_condition!r} is not one of {IMAGE_CONDITIONS}")
        if self.image_condition == "latent_concat" and self.in_channels != 2 * self.out_channels + 1:
            raise ValueError(f"latent_concat takes noise, image latents and a mask: in_channels must be "
                             f"{2 * self.out_channels + 1}, not {self.in_channels}")
        object.__setattr__(self, "rope_axes", tuple(self.rope_axes))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if sum(self.rope_axes) != self.head_dim or any(d % 2 for d in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class HunyuanVAEConfig(JsonConfig):
    """The "884-16c-hy" causal video VAE: 8x8 spatial and 4x temporal compression, 16 latent channels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # the decoder uses one more per level
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression: int = 8
    temporal_compression: int = 4
    mid_block_attention: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        levels = len(self.block_out_channels)
        if self.temporal_compression != 4:
            raise ValueError("only 4x temporal compression is supported (as in the released VAE)")
        spatial_levels = self.spatial_compression.bit_length() - 1
        if 2**spatial_levels != self.spatial_compression or spatial_levels > levels - 1:
            raise ValueError(f"spatial_compression {self.spatial_compression} needs a power of two <= 2**{levels - 1}")
        if levels < 3:
            raise ValueError("at least 3 levels are needed for 4x temporal compression")

    def spatial_down(self, level: int) -> bool:
        """Whether encoder level `level` halves H and W (the decoder's level i mirrors it)."""
        return level < self.spatial_compression.bit_length() - 1

    def temporal_down(self, level: int) -> bool:
        """Whether encoder level `level` halves T: the two levels before the last."""
        levels = len(self.block_out_channels)
        return levels - 3 <= level < levels - 1


HUNYUAN_T2V_720P = HunyuanTransformerConfig()
# HunyuanVideo-I2V (diffusers hunyuanvideo-community/HunyuanVideo-I2V): the T2V architecture whose first latent
# frame's tokens are the clean image's (token replace), with the guidance embedding.
HUNYUAN_I2V_720P = HunyuanTransformerConfig(image_condition="token_replace")
HUNYUAN_VAE = HunyuanVAEConfig()


# Radial attention (`--attention radial`), from the reference repository's HunyuanVideo code and script
# (mit-han-lab/radial-attention 72788d4: radial_attn/models/hunyuan/attention.py uses 128-token tiles, text
# after the video kept whole, no first-frame rule; scripts/hunyuan_t2v_inference.sh runs decay 0.95 with 12
# dense steps and no dense block). Blocks count double-stream first, then single-stream, as there.
RADIAL_DEFAULTS = RadialDefaults(block=128, decay=0.95, dense_steps=12, dense_blocks=0, first_frame_dense=False,
                                 source="mit-han-lab/radial-attention 72788d4, HunyuanVideo processor and script")
