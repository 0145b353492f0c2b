"""T5 v1.1 encoder (T5-v1.1-XXL for Mochi), built from the UMT5 encoder's layers.

T5 v1.1 and UMT5 differ only in the relative-position bias: T5 learns one table, in its first layer, and every
layer adds the same bias; UMT5 learns one table per layer. The attention, the gated tanh-GELU feed-forward
network, the norms and the precision rules are those of `umt5.py`, imported from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .umt5 import T5RMSNorm, UMT5Attention, UMT5Config, UMT5FeedForward, relative_position_buckets


@dataclass(frozen=True)
class T5Config(UMT5Config):
    """google/t5-v1_1-xxl: vocab 32128, d 4096, 64 heads x 64, FFN 10240, 24 layers."""

    vocab_size: int = 32128


class T5Block(nn.Module):
    """A UMT5 block without its own position table: the bias comes from the encoder."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = UMT5Attention(config)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = UMT5FeedForward(config)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        compute_dtype = self.norm1.weight.dtype  # not a linear weight: those may be quantized integers
        x = x + self.attn(self.norm1(x).astype(compute_dtype), bias.astype(compute_dtype))
        x = x + self.ffn(self.norm2(x).astype(compute_dtype))
        return x


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.pos_bias = nn.Embedding(config.num_buckets, config.num_heads)
        self.blocks = [T5Block(config) for _ in range(config.num_layers)]
        self.norm = T5RMSNorm(config.dim, config.eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """input_ids (B, L) int and attention_mask (B, L) of 0/1 -> last hidden state (B, L, dim) float32."""
        input_ids = mx.array(input_ids)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids).astype(mx.float32)
        buckets = relative_position_buckets(length, self.config.num_buckets, self.config.max_distance)
        # (L, L, heads) -> (1, heads, L, L), computed once and shared by every layer; float32 until each block casts.
        bias = self.pos_bias(buckets).astype(mx.float32).transpose(2, 0, 1)[None]
        if attention_mask is not None:
            # A finite minimum of the compute dtype, as in the reference, so a row with every key padded stays
            # defined; clipped so that the blocks' cast cannot turn it into -inf.
            lowest = mx.finfo(self.norm.weight.dtype).min
            keep = mx.array(attention_mask)[:, None, None, :] > 0
            bias = mx.maximum(bias + mx.where(keep, 0.0, lowest), lowest)
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)
