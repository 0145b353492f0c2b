"""Wan2.1 I2V-14B and FLF2V-14B transformer: the Wan 14B backbone (`transformer.py`) whose cross-attention also
reads the CLIP image tokens (`image_context.py`): 257 of the first image for I2V, 2 x 257 of the first and the
last image for FLF2V (with a learned position embedding over them).

Published configurations: Wan-Video/Wan2.1 `wan/configs/wan_i2v_14B.py` and `wan_flf2v_14B.py` (40 layers of 40
heads x 128, FFN 13824, in_dim 36: noise 16 + mask 4 + image latents 16) and `wan/modules/model.py`
(`model_type` 'i2v' / 'flf2v', `MLPProj(1280, dim, flf_pos_emb=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.image_context import ImageContext, ImageContextBlock, ImageEmbedding
from mlx_video.families.wan.transformer import WanTransformer


@dataclass(frozen=True)
class WanImageConfig(WanTransformerConfig):
    in_channels: int = 36
    out_channels: int = 16
    image_dim: int = 1280  # CLIP ViT-H/14 width
    image_positions: int | None = None  # FLF2V: 514 learned positions over the two images' tokens


WAN21_I2V_14B = WanImageConfig()
WAN21_FLF2V_14B = WanImageConfig(image_positions=2 * 257)


class WanImageTransformer(WanTransformer):
    def __init__(self, config: WanImageConfig, dtype: mx.Dtype = mx.float32):
        super().__init__(config, dtype)
        self.blocks = [ImageContextBlock(config) for _ in range(config.num_layers)]
        self.image_embedding = ImageEmbedding(config.image_dim, config.dim, positions=config.image_positions)
        self.set_compute_dtype(dtype)

    def __call__(self, x: mx.array, timestep: mx.array, context, image: mx.array | None = None) -> mx.array:
        """x: (B, T, H, W, in_channels); context: (B, L, text_dim) zero-padded text with `image` (B, N, image_dim)
        CLIP features (N = 257, FLF2V 514: the first image's tokens, then the last's), or an ImageContext from
        `prepare_context`. Returns (B, T, H, W, out_channels) float32."""
        return self.unembed(self.run_blocks(self.embed(x, timestep, context, image)))

    def embed_context(self, text: mx.array, image: mx.array) -> ImageContext:
        """The embedded text and image tokens, keys and values projected per call."""
        return ImageContext(self.text_embedding(text), None, self.image_embedding(image))

    def prepare_context(self, context: mx.array, image: mx.array | None = None) -> ImageContext:
        """The text and image embeddings and every block's keys and values, computed once (`ImageContext.of`)."""
        self.check_image(image)
        return ImageContext.of(self, context, image)

    def check_image(self, image: mx.array | None) -> None:
        if image is None:
            raise ValueError("this transformer reads CLIP image features beside the text (give the image)")
        if image.ndim != 3 or image.shape[-1] != self.config.image_dim:
            raise ValueError(f"expected CLIP features (B, tokens, {self.config.image_dim}), got {image.shape}")

    def embed(self, x, timestep, context, image=None):
        if not isinstance(context, ImageContext):
            self.check_image(image)
            context = self.embed_context(context, image)
        state = super().embed(x, timestep, context)
        state.context = context  # the blocks' cross-attention reads the image tokens beside the text
        return state
