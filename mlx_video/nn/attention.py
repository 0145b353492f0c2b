"""Multi-head attention over (batch, tokens, heads, head_dim) tensors."""

from __future__ import annotations

import math

import mlx.core as mx


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float | None = None,
    mask: mx.array | str | None = None,
) -> mx.array:
    """Scaled dot-product attention.

    q: (B, Lq, heads, D); k, v: (B, Lk, heads, D). `mask` is anything `mx.fast.scaled_dot_product_attention`
    accepts: an additive or boolean array broadcastable to (B, heads, Lq, Lk), or "causal".
    Returns (B, Lq, heads * D) in the dtype of q.
    """
    batch, q_len, heads, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        scale=scale,
        mask=mask,
    )
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * head_dim)
