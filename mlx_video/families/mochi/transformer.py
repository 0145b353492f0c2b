"""Mochi 1 preview diffusion transformer (Genmo's AsymmDiT), channels-last.

Two token streams of different widths, visual (dim) and text (text_dim), share one joint attention per block.
Each stream has its own projections, modulated RMSNorms with tanh-gated residuals and SwiGLU MLP; the last block
updates only the visual stream. The conditioning vector is the timestep embedding plus an attention pool over
the T5 tokens. Visual queries and keys get a learned 3D RoPE with per-head frequencies.

Timestep convention: `timestep` is what diffusers' `MochiTransformer3DModel` receives from `MochiPipeline`,
i.e. 1000 * (1 - sigma) (the official code passes 1 - sigma and multiplies by its timestep_scale 1000 inside).
It is 0 at pure noise and 1000 at clean data, the reverse of Wan. The model predicts x0 - noise; a sampler step
from sigma_i to sigma_{i+1} is z += (sigma_i - sigma_{i+1}) * prediction.

Precision: the residual streams, the conditioning vector, all modulation, norm and RoPE arithmetic are float32;
the linear layers run in `compute_dtype` (a constructor argument; many Mochi linears have no bias, so the dtype
is not read from the weights). `pos_frequencies` and the q/k norm gains are used in float32 whatever dtype they are
loaded in; the converter stores them in float32 (as the official code keeps them), since bf16 copies cost accuracy.

Step caches can drive the parts separately: `state = embed(...)`, `state = run_blocks(state, start, stop)` (blocks
start..stop-1, all by default), then `unembed(state)`; `state.hidden` is the visual stream, the part of the
residual the output is read from. (By hand: `x, y = block(x, y, state)` for each of `blocks` starting from
(state.x, state.y), then `head(x, state)`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.families.mochi.config import MochiTransformerConfig
from mlx_video.nn.attention import attention

# 2*pi split as an 8-significant-bit head plus a float32 tail, for an accurate reduction of large angles.
_TWO_PI_HI = 6.28125
_TWO_PI_LO = float(np.float32(2 * np.pi - _TWO_PI_HI))


def timestep_from_sigma(sigma):
    """The model's timestep for noise level sigma (x_t = (1 - sigma) x0 + sigma noise)."""
    return 1000.0 * (1.0 - sigma)


def timestep_frequencies(freq_dim: int) -> mx.array:
    """exp(-ln(10000) * i / half) as diffusers builds it in float32 (exponent in float32, exp rounded)."""
    half = freq_dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))


def timestep_sinusoid(timestep: mx.array, freqs: mx.array) -> mx.array:
    """[cos, sin] of the float32 products timestep * freq, (B, freq_dim) float32.

    The product is rounded to float32 as the reference does; cos and sin are then taken of that float32 angle
    with an exact reduction modulo 2*pi, since angles reach 1000 radians.
    """
    angle = timestep.astype(mx.float32)[:, None] * freqs[None, :]
    turns = mx.round(angle * (1 / (2 * math.pi)))
    angle = (angle - turns * _TWO_PI_HI) - turns * _TWO_PI_LO
    return mx.concatenate([mx.cos(angle), mx.sin(angle)], axis=-1)


def rms(x: mx.array, eps: float) -> mx.array:
    """Weightless RMS norm in float32."""
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps)


def rope_positions(frames: int, height: int, width: int, base_area: int) -> np.ndarray:
    """(T*H*W, 3) float32 positions in (t, h, w) token order.

    t is the frame index; h and w are the centres of n equal bins spanning [-n*s/2, n*s/2], with s chosen so
    that the h*w grid covers `base_area`.
    """
    scale = math.sqrt(base_area / (height * width))

    def centres(n: int) -> np.ndarray:
        edges = np.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=np.float64)
        return (edges[:-1] + edges[1:]) / 2

    t, h, w = np.meshgrid(np.arange(frames, dtype=np.float64), centres(height), centres(width), indexing="ij")
    return np.stack([t, h, w], axis=-1).reshape(-1, 3).astype(np.float32)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, N, heads, D) by per-head tables (N, heads, D/2)."""
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


@dataclass
class MochiState:
    """What `embed` hands to the blocks and the head."""

    x: mx.array  # (B, N, dim) float32 visual tokens
    y: mx.array  # (B, L, text_dim) float32 text tokens
    c: mx.array  # (B, dim) float32 conditioning vector
    rope: tuple[mx.array, mx.array]  # cos, sin (N, heads, head_dim / 2) float32
    text_keep: mx.array | None  # (B, L) bool, None when every text token is kept
    grid: tuple[int, int, int, int]  # (batch, frames, height, width) of the latent input

    @property
    def hidden(self) -> mx.array:
        """The visual stream (the step cache's residual)."""
        return self.x

    @hidden.setter
    def hidden(self, value: mx.array) -> None:
        self.x = value


class TimestepEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class AttentionPool(nn.Module):
    """One query (from the masked mean of the tokens) attends over [mean; tokens] with the padding masked."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_kv = nn.Linear(in_dim, 2 * in_dim)
        self.to_q = nn.Linear(in_dim, in_dim)
        self.to_out = nn.Linear(in_dim, out_dim)

    def __call__(self, tokens: mx.array, keep: mx.array) -> mx.array:
        """tokens (B, L, in_dim), keep (B, L) bool -> (B, out_dim)."""
        batch, length, width = tokens.shape
        weights = keep.astype(tokens.dtype)[:, :, None]
        weights = weights / mx.maximum(weights.sum(axis=1, keepdims=True), 1)
        mean = (tokens * weights).sum(axis=1, keepdims=True)
        seq = mx.concatenate([mean, tokens], axis=1)
        k, v = mx.split(self.to_kv(seq), 2, axis=-1)
        q = self.to_q(mean)
        heads = lambda t: t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        mask = mx.concatenate([mx.ones((batch, 1), dtype=mx.bool_), keep], axis=1)[:, None, None, :]
        head_dim = width // self.num_heads
        out = mx.fast.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), scale=1 / math.sqrt(head_dim), mask=mask
        )
        return self.to_out(out.transpose(0, 2, 1, 3).reshape(batch, width))


class SwiGLU(nn.Module):
    """w2(h * silu(g)) with w1's output split as [h | g] (diffusers' order; the official checkpoint is [g | h])."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h, g = mx.split(self.w1(x), 2, axis=-1)
        return self.w2(h * nn.silu(g))


class JointAttention(nn.Module):
    """Attention over [visual; text] tokens with separate projections and q/k RMSNorms per stream."""

    def __init__(self, config: MochiTransformerConfig, update_text: bool):
        super().__init__()
        dim, text_dim = config.dim, config.text_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.update_text = update_text
        self.sparse = None  # a sparse joint attention (mlx_video.nn.attention.attention's `sparse`)
        # Fused q|k|v per stream, as in the official checkpoint.
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_y = nn.Linear(text_dim, 3 * dim, bias=False)
        self.norm_q_x = nn.RMSNorm(config.head_dim, eps=config.qk_norm_eps)
        self.norm_k_x = nn.RMSNorm(config.head_dim, eps=config.qk_norm_eps)
        self.norm_q_y = nn.RMSNorm(config.head_dim, eps=config.qk_norm_eps)
        self.norm_k_y = nn.RMSNorm(config.head_dim, eps=config.qk_norm_eps)
        self.proj_x = nn.Linear(dim, dim)
        if update_text:
            self.proj_y = nn.Linear(dim, text_dim)

    def _heads(self, t: mx.array) -> mx.array:
        return t.reshape(*t.shape[:2], self.num_heads, self.head_dim)

    def _qk_norm(self, norm: nn.RMSNorm, t: mx.array) -> mx.array:
        return mx.fast.rms_norm(t.astype(mx.float32), norm.weight.astype(mx.float32), norm.eps).astype(t.dtype)

    def __call__(self, x: mx.array, y: mx.array, state: MochiState) -> tuple[mx.array, mx.array | None]:
        """x (B, N, dim), y (B, L, text_dim) already normalised and in the compute dtype."""
        batch, n_visual, _ = x.shape
        cos, sin = state.rope
        q_x, k_x, v_x = map(self._heads, mx.split(self.qkv_x(x), 3, axis=-1))
        q_y, k_y, v_y = map(self._heads, mx.split(self.qkv_y(y), 3, axis=-1))
        q_x = apply_rope(self._qk_norm(self.norm_q_x, q_x), cos, sin)
        k_x = apply_rope(self._qk_norm(self.norm_k_x, k_x), cos, sin)
        k_y = self._qk_norm(self.norm_k_y, k_y)
        if self.update_text:
            q_y = self._qk_norm(self.norm_q_y, q_y)
            q = mx.concatenate([q_x, q_y], axis=1)
        else:
            q = q_x  # the text outputs of the last block are never used
        k = mx.concatenate([k_x, k_y], axis=1)
        v = mx.concatenate([v_x, v_y], axis=1)

        mask = None
        if state.text_keep is not None:
            keep = mx.concatenate([mx.ones((batch, n_visual), dtype=mx.bool_), state.text_keep], axis=1)
            mask = keep[:, None, None, :]
        out = attention(q, k, v, scale=1 / math.sqrt(self.head_dim), mask=mask, sparse=self.sparse)
        out_x = self.proj_x(out[:, :n_visual])
        if not self.update_text:
            return out_x, None
        out_y = out[:, n_visual:]
        if state.text_keep is not None:
            # Padding tokens attend to nothing in the reference (their attention output is zero).
            out_y = out_y * state.text_keep[:, :, None].astype(out_y.dtype)
        return out_x, self.proj_y(out_y)


class MochiBlock(nn.Module):
    def __init__(self, config: MochiTransformerConfig, last: bool, compute_dtype: mx.Dtype):
        super().__init__()
        self.eps = config.eps
        self.update_text = not last
        self.compute_dtype = compute_dtype
        # Modulation chunks: scale_msa, gate_msa, scale_mlp, gate_mlp (no shift). The last block only scales y.
        self.mod_x = nn.Linear(config.dim, 4 * config.dim)
        self.mod_y = nn.Linear(config.dim, (4 if self.update_text else 1) * config.text_dim)
        self.attn = JointAttention(config, update_text=self.update_text)
        self.mlp_x = SwiGLU(config.dim, config.ffn_dim)
        if self.update_text:
            self.mlp_y = SwiGLU(config.text_dim, config.text_ffn_dim)

    def _norm_scale(self, x: mx.array, scale: mx.array) -> mx.array:
        return (rms(x, self.eps) * (1 + scale[:, None, :])).astype(self.compute_dtype)

    def _gated(self, x: mx.array, out: mx.array, gate: mx.array) -> mx.array:
        return x + rms(out, self.eps) * mx.tanh(gate[:, None, :])

    def __call__(self, x: mx.array, y: mx.array, state: MochiState) -> tuple[mx.array, mx.array]:
        """x (B, N, dim), y (B, L, text_dim): float32 streams -> updated streams (y unchanged in the last block)."""
        dt = self.compute_dtype
        c = nn.silu(state.c).astype(dt)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.mod_x(c).astype(mx.float32), 4, axis=-1)
        mod_y = self.mod_y(c).astype(mx.float32)
        if self.update_text:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = mx.split(mod_y, 4, axis=-1)
        else:
            scale_msa_y = mod_y

        out_x, out_y = self.attn(self._norm_scale(x, scale_msa), self._norm_scale(y, scale_msa_y), state)
        x = self._gated(x, out_x, gate_msa)
        x = self._gated(x, self.mlp_x(self._norm_scale(x, scale_mlp)), gate_mlp)
        if self.update_text:
            y = self._gated(y, out_y, gate_msa_y)
            y = self._gated(y, self.mlp_y(self._norm_scale(y, scale_mlp_y)), gate_mlp_y)
        return x, y


class MochiHead(nn.Module):
    """LayerNorm (no affine) modulated by [scale, shift] from the conditioning vector, then a linear to patches."""

    def __init__(self, config: MochiTransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.mod = nn.Linear(config.dim, 2 * config.dim)
        self.linear = nn.Linear(config.dim, config.patch_size**2 * config.out_channels)

    def __call__(self, x: mx.array, c: mx.array, compute_dtype: mx.Dtype) -> mx.array:
        scale, shift = mx.split(self.mod(nn.silu(c).astype(compute_dtype)).astype(mx.float32), 2, axis=-1)
        h = mx.fast.layer_norm(x.astype(mx.float32), None, None, self.eps) * (1 + scale[:, None]) + shift[:, None]
        return self.linear(h.astype(compute_dtype)).astype(mx.float32)


class MochiTransformer(nn.Module):
    def __init__(self, config: MochiTransformerConfig, compute_dtype: mx.Dtype = mx.float32):
        super().__init__()
        if config.head_dim % 2:
            raise ValueError(f"head_dim {config.head_dim} must be even for RoPE")
        if config.t5_dim % config.pool_heads:
            raise ValueError(f"t5_dim {config.t5_dim} does not split into {config.pool_heads} pool heads")
        self.config = config
        self._compute_dtype = compute_dtype
        p = config.patch_size
        self.patch_embed = nn.Linear(p * p * config.in_channels, config.dim)
        self.time_embed = TimestepEmbedding(config.freq_dim, config.dim)
        self.text_pool = AttentionPool(config.t5_dim, config.dim, config.pool_heads)
        self.text_proj = nn.Linear(config.t5_dim, config.text_dim)
        self.pos_frequencies = mx.zeros((3, config.num_heads, config.head_dim // 2))
        self.blocks = [MochiBlock(config, i == config.num_layers - 1, compute_dtype) for i in range(config.num_layers)]
        self.final_layer = MochiHead(config)
        # Leading underscore: not a parameter.
        self._freqs = timestep_frequencies(config.freq_dim)

    @property
    def compute_dtype(self) -> mx.Dtype:
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: mx.Dtype) -> None:
        self._compute_dtype = dtype
        for block in self.blocks:
            block.compute_dtype = dtype

    def rope(self, frames: int, height: int, width: int) -> tuple[mx.array, mx.array]:
        """cos, sin (frames*height*width, heads, head_dim/2) float32 for a token grid (after patching)."""
        positions = mx.array(rope_positions(frames, height, width, self.config.rope_base_area))
        freqs = self.pos_frequencies.astype(mx.float32)
        angles = (positions @ freqs.reshape(3, -1)).reshape(positions.shape[0], *freqs.shape[1:])
        return mx.cos(angles), mx.sin(angles)

    def embed(self, x: mx.array, timestep: mx.array, text: mx.array, text_mask: mx.array | None = None) -> MochiState:
        """Tokens, conditioning vector and RoPE tables for one forward.

        x: (B, T, H, W, C_in) latents (normalised by the VAE's latent mean/std). timestep: (B,) or scalar,
        1000 * (1 - sigma). text: (B, L, t5_dim) T5 features. text_mask: (B, L) of 0/1 or bool, None if all valid.
        With batch 1 the padding tokens are dropped (as the official code does), so no attention mask is needed.
        """
        cfg = self.config
        dt = self._compute_dtype
        batch, frames, height, width, channels = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {(height, width)} is not a multiple of the patch size {p}")
        if channels != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} latent channels, got {channels}")
        h, w = height // p, width // p

        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (batch,))
        keep = mx.ones(text.shape[:2], dtype=mx.bool_) if text_mask is None else mx.array(text_mask).astype(mx.bool_)
        if batch == 1 and text_mask is not None:
            valid = np.flatnonzero(np.array(keep[0]))
            text, keep = text[:, mx.array(valid)], None
        elif text_mask is None:
            keep = None

        text = text.astype(dt)
        pool_keep = keep if keep is not None else mx.ones(text.shape[:2], dtype=mx.bool_)
        c = self.time_embed(timestep_sinusoid(timestep, self._freqs).astype(dt)).astype(mx.float32)
        c = c + self.text_pool(text, pool_keep).astype(mx.float32)
        y = self.text_proj(text).astype(mx.float32)

        patches = x.reshape(batch, frames, h, p, w, p, channels).transpose(0, 1, 2, 4, 3, 5, 6)
        tokens = self.patch_embed(patches.reshape(batch, frames * h * w, -1).astype(dt)).astype(mx.float32)
        return MochiState(tokens, y, c, self.rope(frames, h, w), keep, (batch, frames, height, width))

    def unpatchify(self, out: mx.array, state: MochiState) -> mx.array:
        batch, frames, height, width = state.grid
        p, c_out = self.config.patch_size, self.config.out_channels
        out = out.reshape(batch, frames, height // p, width // p, p, p, c_out).transpose(0, 1, 2, 4, 3, 5, 6)
        return out.reshape(batch, frames, height, width, c_out)

    def head(self, x: mx.array, state: MochiState) -> mx.array:
        """Final layer and unpatchify: (B, N, dim) visual tokens -> (B, T, H, W, C_out) float32."""
        return self.unpatchify(self.final_layer(x, state.c, self._compute_dtype), state)

    def attention_sites(self) -> list:
        """The blocks' joint attentions in order (they take `--attention`'s sparse one)."""
        return [block.attn for block in self.blocks]

    def run_blocks(self, state: MochiState, start: int = 0, stop: int | None = None) -> MochiState:
        """Blocks start..stop-1 (all by default) on both streams; returns a new state."""
        hx, hy = state.x, state.y
        for block in self.blocks[start:stop]:
            hx, hy = block(hx, hy, state)
        return replace(state, x=hx, y=hy)

    def unembed(self, state: MochiState) -> mx.array:
        return self.head(state.x, state)

    def __call__(
        self, x: mx.array, timestep: mx.array, text: mx.array, text_mask: mx.array | None = None
    ) -> mx.array:
        """Prediction (x0 - noise) for latents x (B, T, H, W, C_in); returns (B, T, H, W, C_out) float32."""
        return self.unembed(self.run_blocks(self.embed(x, timestep, text, text_mask)))
