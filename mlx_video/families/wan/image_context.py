"""The CLIP image context of the Wan 14B models that read one (Wan2.1 I2V-14B and FLF2V-14B, Wan2.2-Animate-14B):
an MLP from the CLIP ViT-H/14 features to the model width, and a cross-attention that attends to the text and,
through its own keys and values, to the image tokens, the two summed before the output projection.

Sources (the published models): Wan-Video/Wan2.1 `wan/modules/model.py` (`MLPProj`, `WanI2VCrossAttention`;
FLF2V's `emb_pos` over the first and last images' 2 x 257 tokens) and diffusers 0.42.1
`models/transformers/transformer_wan.py` (`WanImageEmbedding`, the added key/value projections), which our
parity tests run as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_video.families.wan.transformer import PreparedContext, TextKV, WanAttention, WanBlock
from mlx_video.nn.attention import attention, fold_zero_padding
from mlx_video.nn.norms import FP32LayerNorm


class ImageEmbedding(nn.Module):
    """CLIP features -> dim: LayerNorm, Linear, GELU (exact), Linear, LayerNorm (all affine, float32).

    With `positions` (FLF2V: 514), a learned position embedding is added first to the tokens of the images given
    together (the first and the last image's 257 tokens each, side by side)."""

    def __init__(self, image_dim: int, dim: int, eps: float = 1e-5, positions: int | None = None):
        super().__init__()
        self.compute_dtype = mx.float32
        if positions is not None:
            self.position_embedding = mx.zeros((positions, image_dim))
        self.norm1 = FP32LayerNorm(image_dim, eps=eps)
        self.linear_1 = nn.Linear(image_dim, image_dim)
        self.linear_2 = nn.Linear(image_dim, dim)
        self.norm2 = FP32LayerNorm(dim, eps=eps)

    def __call__(self, image: mx.array) -> mx.array:
        """image: (B, N, image_dim) features; with a position embedding of P rows, N must be P."""
        position = self.get("position_embedding")
        if position is not None:
            if image.shape[1] != position.shape[0]:
                raise ValueError(f"the image context takes {position.shape[0]} CLIP tokens (the first and the last "
                                 f"image's), got {image.shape[1]}")
            image = image.astype(mx.float32) + position.astype(mx.float32)
        h = self.norm1(image).astype(self.compute_dtype)
        h = self.linear_2(nn.gelu(self.linear_1(h)))
        return self.norm2(h)


@dataclass
class ImageContext(PreparedContext):
    """The embedded text (B, L, dim) and image tokens (B, N, dim) a block's cross-attention reads; `kv` holds each
    block's prepared keys and values (`ImageKV`), or is None (projected per call)."""

    image: mx.array | None = None

    @classmethod
    def of(cls, model, context: mx.array, image: mx.array) -> "ImageContext":
        """Prepared for `model` (its text and image embeddings and blocks' `cross_attn`) from zero-padded text
        `context` (B, L, text_dim) and CLIP features `image` (B, N, image_dim), evaluated now."""
        context, bias = fold_zero_padding(context)
        text = model.text_embedding(context)
        image = model.image_embedding(image)
        kv = [ImageKV(TextKV(*block.cross_attn.project_kv(text), bias), *block.cross_attn.project_image_kv(image))
              for block in model.blocks]
        mx.eval(text, image, kv)
        return cls(text, kv, image)


class ImageKV(NamedTuple):
    """One block's prepared keys and values of the text (with its padding bias) and of the image tokens."""

    text: TextKV
    k_img: mx.array  # (B, N, heads, head_dim)
    v_img: mx.array


class ImageTextAttention(WanAttention):
    """Cross-attention to the text plus, through its own keys and values, to the image tokens; the two attentions
    share the query and are summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__(dim, num_heads, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = nn.RMSNorm(dim, eps=eps)

    def project_image_kv(self, image: mx.array) -> tuple[mx.array, mx.array]:
        image = image.astype(self.compute_dtype)
        batch, tokens, _ = image.shape
        k = self.norm_k_img(self.k_img(image)).reshape(batch, tokens, self.num_heads, -1)
        v = self.v_img(image).reshape(batch, tokens, self.num_heads, -1)
        return k, v

    def __call__(self, x: mx.array, context: ImageContext = None, rope=None, kv: ImageKV | None = None) -> mx.array:
        """x: the video tokens; context: an ImageContext; kv: this block's prepared keys and values (else projected
        from `context`)."""
        x = x.astype(self.compute_dtype)
        batch, q_len, _ = x.shape
        q = self.norm_q(self.q(x)).reshape(batch, q_len, self.num_heads, -1)
        if kv is not None:
            (k, v, bias), k_img, v_img = kv
        else:
            (k, v), bias = self.project_kv(context.text), None
            k_img, v_img = self.project_image_kv(context.image)
        text = attention(q, k, v, mask=None if bias is None else bias.astype(q.dtype))
        return self.o(text + attention(q, k_img, v_img))


class ImageContextBlock(WanBlock):
    """A Wan block whose cross-attention also reads the image tokens."""

    def __init__(self, config):
        super().__init__(config)
        self.cross_attn = ImageTextAttention(config.dim, config.num_heads, config.eps)
