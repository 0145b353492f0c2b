"""Wan 2.2 transformer configuration, with the published numbers of each size."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_video.json_config import JsonConfig
from mlx_video.nn.radial import RadialDefaults


@dataclass(frozen=True)
class WanTransformerConfig(JsonConfig):
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 40
    num_layers: int = 40
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_positions: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# Published sizes (Wan2.2 wan/configs): the A14B experts (T2V: 16 channels in, I2V: 36) and TI2V-5B.
WAN_A14B_T2V = WanTransformerConfig()
WAN_A14B_I2V = WanTransformerConfig(in_channels=36)
WAN_TI2V_5B = WanTransformerConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48)


# Radial attention (`--attention radial`) for Wan 2.2, from the reference repository's Wan 2.2 code and script
# (mit-han-lab/radial-attention 72788d4: radial_attn/models/wan2_2/attention.py uses 64-token tiles and the
# first-frame rule; scripts/wan_22_t2v_inference.sh runs decay 0.8 with 11 dense steps and 1 dense block).
RADIAL_DEFAULTS = RadialDefaults(block=64, decay=0.8, dense_steps=11, dense_blocks=1, first_frame_dense=True,
                                 source="mit-han-lab/radial-attention 72788d4, Wan 2.2 processor and script")
