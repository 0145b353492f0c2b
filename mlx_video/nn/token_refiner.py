"""The timestep embedding and the token refiner shared by the HunyuanVideo transformers (1.0 and 1.5).

`TokenRefiner` is the official `SingleTokenRefiner` (`txt_in`): the text encoder's states projected to the model
width and refined by a few self-attention blocks, each gated by a conditioning vector made of the timestep and
the (masked) mean of the states. `MLPEmbedder` is the official `TimestepEmbedder` / `MLPEmbedder` (Linear, SiLU,
Linear); `timestep_frequencies` / `timestep_sinusoid` the [cos, sin] timestep features both feed it.

Precision: the residual stream, the conditioning vector and the gates are float32; the linear layers run in the
`dtype` passed to each call.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.kernels import gated_residual
from mlx_video.nn.attention import attention
from mlx_video.nn.norms import layer_norm_fp32


def timestep_frequencies(freq_dim: int, max_period: float = 10000.0) -> mx.array:
    """exp(-ln(max_period) * i / half) as the reference gets it in float32.

    The exponent is formed in float32 in the reference's order of operations and exp is rounded correctly from
    float64 (torch's float32 exp agrees on all but a couple of entries; numpy's float32 exp differs on ~40%).
    At t = 6000 (guidance 6.0) one ulp of a frequency moves the angle by up to ~4e-4 rad, so this matters.
    """
    half = freq_dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))


def timestep_sinusoid(t: mx.array, freqs: mx.array) -> mx.array:
    """[cos, sin] embedding of t (B,) in float32, shape (B, 2 * len(freqs))."""
    angles = t.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear; used for the timestep, guidance and pooled-text embeddings."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x.astype(dtype)))).astype(mx.float32)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


def split_qkv(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """(B, L, 3 * heads * D) laid out (qkv, heads, D) -> q, k, v each (B, L, heads, D)."""
    qkv = qkv.reshape(*qkv.shape[:-1], 3, num_heads, -1)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def gated_add(x: mx.array, gate_values: mx.array, y: mx.array) -> mx.array:
    """x + gate * y with a per-sample gate (B, dim), in float32."""
    return gated_residual(x, gate_values[:, None, :], y.astype(mx.float32))


class RefinerBlock(nn.Module):
    """Self-attention over the text (no qk-norm) and a SiLU MLP, both gated by the conditioning vector."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), nn.silu)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)

    def __call__(self, x: mx.array, c: mx.array, mask: mx.array | None, dtype: mx.Dtype) -> mx.array:
        gate_msa, gate_mlp = mx.split(self.adaLN_modulation(nn.silu(c).astype(dtype)).astype(mx.float32), 2, -1)
        h = layer_norm_fp32(x, self.norm1.weight, self.norm1.bias, self.eps).astype(dtype)
        q, k, v = split_qkv(self.self_attn_qkv(h), self.num_heads)
        x = gated_add(x, gate_msa, self.self_attn_proj(attention(q, k, v, mask=mask)))
        h = layer_norm_fp32(x, self.norm2.weight, self.norm2.bias, self.eps).astype(dtype)
        return gated_add(x, gate_mlp, self.mlp(h))


class TokenRefiner(nn.Module):
    """`txt_in` (SingleTokenRefiner): projects the LLM states and refines them, conditioned on t and their mean."""

    def __init__(self, text_dim: int, dim: int, num_heads: int, num_blocks: int, mlp_ratio: float = 4.0,
                 freq_dim: int = 256, eps: float = 1e-6):
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, dim)
        self.t_embedder = MLPEmbedder(freq_dim, dim)
        self.c_embedder = MLPEmbedder(text_dim, dim)
        self.blocks = [RefinerBlock(dim, num_heads, mlp_ratio, eps) for _ in range(num_blocks)]

    def __call__(self, text: mx.array, mask: mx.array | None, t_sinusoid: mx.array, dtype: mx.Dtype) -> mx.array:
        """text: (B, L, text_dim); mask: (B, L) bool or None. Returns (B, L, dim) float32; the rows of padding
        tokens are finite and meaningless (what the models do with them is theirs to say)."""
        if mask is None:
            pooled = text.astype(mx.float32).mean(axis=1)
            attn_mask = None
        else:
            weights = mask.astype(mx.float32)[..., None]
            pooled = (text.astype(mx.float32) * weights).sum(axis=1) / weights.sum(axis=1)
            # A valid token sees the valid tokens; a padding token sees only token 0 (so no row is empty).
            attn_mask = mask[:, None, :, None] & mask[:, None, None, :]
            attn_mask = attn_mask | (mx.arange(mask.shape[1]) == 0)[None, None, None, :]
        c = self.t_embedder(t_sinusoid, dtype) + self.c_embedder(pooled, dtype)
        x = self.input_embedder(text.astype(dtype)).astype(mx.float32)
        for block in self.blocks:
            x = block(x, c, attn_mask, dtype)
        return x
