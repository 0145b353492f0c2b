"""Mochi 1 preview configurations, with the published numbers as defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_video.json_config import JsonConfig
from mlx_video.nn.radial import RadialDefaults


def _swiglu_hidden(dim: int) -> int:
    # int(2/3 * 4 * dim), rounded up to a multiple of 256 in the official code; diffusers writes (8 * dim) // 3.
    # They agree at the published widths (3072 -> 8192, 1536 -> 4096).
    return (8 * dim) // 3


@dataclass(frozen=True)
class MochiTransformerConfig(JsonConfig):
    num_layers: int = 48
    num_heads: int = 24
    head_dim: int = 128
    text_dim: int = 1536  # width of the text stream ("hidden_size_y", diffusers' pooled_projection_dim)
    in_channels: int = 12
    out_channels: int = 12
    patch_size: int = 2  # spatial only; no temporal patching
    t5_dim: int = 4096
    t5_length: int = 256
    freq_dim: int = 256  # timestep sinusoid width
    pool_heads: int = 8  # heads of the attention pool over T5 tokens
    ffn_dim: int = 8192  # SwiGLU hidden width of the visual stream
    text_ffn_dim: int = 4096  # ... and of the text stream
    eps: float = 1e-6  # modulated RMSNorms and the final LayerNorm
    qk_norm_eps: float = 1e-5
    rope_base_area: int = 192 * 192  # positions are scaled so that H'*W' tokens span this area

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def with_widths(cls, **kwargs) -> "MochiTransformerConfig":
        """A config whose SwiGLU widths follow from dim and text_dim (diffusers' rule) unless given."""
        base = cls(**{k: v for k, v in kwargs.items() if k not in ("ffn_dim", "text_ffn_dim")})
        return cls(
            **{
                **base.to_dict(),
                "ffn_dim": kwargs.get("ffn_dim", _swiglu_hidden(base.dim)),
                "text_ffn_dim": kwargs.get("text_ffn_dim", _swiglu_hidden(base.text_dim)),
            }
        )


# Per-channel statistics of the VAE latents (genmo vae_stats.py; diffusers' latents_mean / latents_std).
# The DiT works on (z - mean) / std.
MOCHI_LATENTS_MEAN = (
    -0.06730895953510081,
    -0.038011381506090416,
    -0.07477820912866141,
    -0.05565264470995561,
    0.012767231469026969,
    -0.04703542746246419,
    0.043896967884726704,
    -0.09346305707025976,
    -0.09918314763016893,
    -0.008729793427399178,
    -0.011931556316503654,
    -0.0321993391887285,
)
MOCHI_LATENTS_STD = (
    0.9263795028493863,
    0.9248894543193766,
    0.9393059390890617,
    0.959253732819592,
    0.8244560132752793,
    0.917259975397747,
    0.9294154431013696,
    1.3720942357788521,
    0.881393668867029,
    0.9168315692124348,
    0.9185249279345552,
    0.9274757570805041,
)


@dataclass(frozen=True)
class MochiVAEConfig(JsonConfig):
    in_channels: int = 15  # RGB + Fourier features (3 + 3 * 2 * 2)
    out_channels: int = 3
    latent_channels: int = 12
    encoder_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_channels: tuple[int, ...] = (128, 256, 512, 768)
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    encoder_attention: tuple[bool, ...] = (False, True, True, True, True)
    num_groups: int = 32
    attention_head_dim: int = 32
    fourier_start: int = 6
    fourier_stop: int = 8
    latents_mean: tuple[float, ...] = MOCHI_LATENTS_MEAN
    latents_std: tuple[float, ...] = MOCHI_LATENTS_STD
    scaling_factor: float = 1.0

    @property
    def temporal_compression(self) -> int:
        out = 1
        for t in self.temporal_expansions:
            out *= t
        return out

    @property
    def spatial_compression(self) -> int:
        out = 1
        for s in self.spatial_expansions:
            out *= s
        return out


MOCHI_1_PREVIEW = MochiTransformerConfig()
MOCHI_VAE = MochiVAEConfig()


# Radial attention (`--attention radial`). The reference repository lists Mochi as to-do, so these are our
# choice: Mochi is, like HunyuanVideo, a joint video+text transformer with the text after the video, so it
# takes HunyuanVideo's published parameters (128-token tiles, decay 0.95, no first-frame rule, no dense block)
# with the same share of dense steps as HunyuanVideo's 12 of 50, here of Mochi's 64 default steps: 16.
RADIAL_DEFAULTS = RadialDefaults(block=128, decay=0.95, dense_steps=16, dense_blocks=0, first_frame_dense=False,
                                 source="ours: HunyuanVideo's parameters (the reference has no Mochi setting)")
