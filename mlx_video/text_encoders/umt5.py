"""UMT5-XXL text encoder (encoder only), as used by Wan 2.2 for its prompts.

A T5 v1.1-style encoder: pre-norm blocks with T5 RMSNorm, self-attention without 1/sqrt(d) scaling and with a
learned relative-position bias in every layer (UMT5 does not share the table across layers), and a gated
GELU-tanh feed-forward network. The output is the final-norm hidden state.

Matmuls run in the parameter dtype (bf16 or fp32); the residual stream, the norms and the softmax stay in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from ..json_config import JsonConfig

# transformers spells the gated tanh-GELU of UMT5 in these ways; all three are the same function.
_GATED_TANH_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")


@dataclass(frozen=True)
class UMT5Config(JsonConfig):
    vocab_size: int = 256384
    dim: int = 4096
    head_dim: int = 64
    num_heads: int = 64
    ffn_dim: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_transformers(cls, config_json: dict) -> "UMT5Config":
        """Read a transformers UMT5 (or T5 v1.1) config.json."""
        # A missing field takes transformers' UMT5Config default, which is gated-gelu.
        ffn_kind = config_json.get("feed_forward_proj", "gated-gelu")
        if ffn_kind not in _GATED_TANH_GELU:
            raise ValueError(
                f"UMT5 needs a gated tanh-GELU feed-forward network (feed_forward_proj 'gated-gelu'); "
                f"this config.json has feed_forward_proj {ffn_kind!r}"
            )
        return cls(
            vocab_size=config_json["vocab_size"],
            dim=config_json["d_model"],
            head_dim=config_json["d_kv"],
            num_heads=config_json["num_heads"],
            ffn_dim=config_json["d_ff"],
            num_layers=config_json["num_layers"],
            num_buckets=config_json.get("relative_attention_num_buckets", 32),
            max_distance=config_json.get("relative_attention_max_distance", 128),
            eps=config_json.get("layer_norm_epsilon", 1e-6),
        )


def relative_position_bucket(offset: int, num_buckets: int, max_distance: int) -> int:
    """T5's bidirectional bucket of one key-minus-query offset.

    Half of the buckets are for keys after the query. Within each half, offsets below half of it are exact and
    the rest are log-spaced up to max_distance, beyond which everything shares the last bucket.
    """
    half = num_buckets // 2
    bucket = half if offset > 0 else 0
    distance = abs(offset)
    max_exact = half // 2
    if distance < max_exact:
        return bucket + distance
    # The reference truncates toward zero; at exact powers of two the quotient is exact in double precision.
    log_step = int(math.log(distance / max_exact) / math.log(max_distance / max_exact) * (half - max_exact))
    return bucket + min(max_exact + log_step, half - 1)


@lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """(length, length) int32 bucket of key j relative to query i."""
    by_offset = mx.array(
        [relative_position_bucket(d, num_buckets, max_distance) for d in range(-(length - 1), length)],
        dtype=mx.int32,
    )
    positions = mx.arange(length)
    offsets = positions[None, :] - positions[:, None]
    return by_offset[offsets + (length - 1)]


class T5RMSNorm(nn.Module):
    """Scale-only RMS norm (no mean subtraction, no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)


class UMT5Attention(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q = nn.Linear(config.dim, config.attn_dim, bias=False)
        self.k = nn.Linear(config.dim, config.attn_dim, bias=False)
        self.v = nn.Linear(config.dim, config.attn_dim, bias=False)
        self.o = nn.Linear(config.attn_dim, config.dim, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) factor into its initialisation, so the scores are not scaled.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class UMT5FeedForward(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.fc1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.gate(x)) * self.fc1(x))


class UMT5Block(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = UMT5Attention(config)
        self.pos_bias = nn.Embedding(config.num_buckets, config.num_heads)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = UMT5FeedForward(config)

    def __call__(self, x: mx.array, buckets: mx.array, key_mask: mx.array) -> mx.array:
        compute_dtype = self.norm1.weight.dtype  # not a linear weight: those may be quantized integers
        # (L, L, heads) -> (1, heads, L, L), plus the padding mask over keys.
        bias = self.pos_bias(buckets).transpose(2, 0, 1)[None] + key_mask
        x = x + self.attn(self.norm1(x).astype(compute_dtype), bias)
        x = x + self.ffn(self.norm2(x).astype(compute_dtype))
        return x


class UMT5Encoder(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = [UMT5Block(config) for _ in range(config.num_layers)]
        self.norm = T5RMSNorm(config.dim, config.eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """input_ids (B, L) int and attention_mask (B, L) of 0/1 -> last hidden state (B, L, dim) float32."""
        input_ids = mx.array(input_ids)
        length = input_ids.shape[1]
        compute_dtype = self.blocks[0].norm1.weight.dtype if self.blocks else mx.float32

        x = self.token_embedding(input_ids).astype(mx.float32)
        buckets = relative_position_buckets(length, self.config.num_buckets, self.config.max_distance)
        if attention_mask is None:
            key_mask = mx.zeros((1, 1, 1, length), dtype=compute_dtype)
        else:
            # A finite minimum, as in the reference, so a row with every key padded stays defined.
            keep = mx.array(attention_mask)[:, None, None, :] > 0
            key_mask = mx.where(keep, 0.0, mx.finfo(compute_dtype).min).astype(compute_dtype)

        for block in self.blocks:
            x = block(x, buckets, key_mask)
        return self.norm(x)
