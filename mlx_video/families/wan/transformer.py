"""Wan 2.2 diffusion transformer (the official `WanModel`), channels-last.

Precision follows the official model run in bf16: the residual stream, the time embedding, all modulation
arithmetic, the norms and the output head are float32; the linear layers inside the blocks and the text
embedding run in the parameter dtype.

The adaLN modulation, the gated residuals and the rotary embedding go through `mlx_video.kernels`, which runs
fused Metal / CUDA kernels where available and otherwise the plain MLX composition written there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.kernels import adaln_modulate, apply_rope_qk, gated_residual, rope_tables
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.nn.attention import attention, fold_zero_padding
from mlx_video.nn.norms import FP32LayerNorm

# 2*pi as a short head (8 significant bits) plus a float32 tail: turns * _TWO_PI_HI is exact for any turns
# count a timestep below 4096 can produce.
_TWO_PI_HI = 6.28125
_TWO_PI_LO = float(np.float32(2 * np.pi - _TWO_PI_HI))


def _keep_high_bits(values: np.ndarray, bits: int = 12) -> np.ndarray:
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.round(mantissa * 2**bits) / 2**bits, exponent)


def sinusoid_frequencies(freq_dim: int) -> tuple[mx.array, mx.array]:
    """The timestep frequencies 10000^(-i/half) split as head (12 significant bits) + float32 tail."""
    half = freq_dim // 2
    freqs = 10000.0 ** (-np.arange(half, dtype=np.float64) / half)
    head = _keep_high_bits(freqs)
    return mx.array(head.astype(np.float32)), mx.array((freqs - head).astype(np.float32))


def sinusoidal_embedding(t: mx.array, freq_head: mx.array, freq_tail: mx.array) -> mx.array:
    """[cos, sin] timestep embedding, shape t.shape + (freq_dim,), float32.

    The reference computes it in float64. Here the angle is carried as an exact product (integer timesteps
    below 4096 times a 12-bit frequency head) plus a small tail, and reduced modulo 2*pi before cos/sin, which
    keeps integer timesteps within ~3e-7 of float64 (a plain float32 product is off by up to ~6e-5 at t=1000).
    """
    t = t.astype(mx.float32)[..., None]
    angle_head = t * freq_head
    turns = mx.round(angle_head * (1 / (2 * math.pi)))
    angle = (angle_head - turns * _TWO_PI_HI) - turns * _TWO_PI_LO + t * freq_tail
    return mx.concatenate([mx.cos(angle), mx.sin(angle)], axis=-1)


def patch_grid(latent_shape: tuple[int, ...], config: WanTransformerConfig) -> tuple[int, int, int]:
    """The token grid (T/pt, H/ph, W/pw) of latents shaped (B, T, H, W, C); refuses sizes the patch does not
    divide and a channel count the model does not take."""
    _, frames, height, width, channels = latent_shape
    pt, ph, pw = config.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {(frames, height, width)} is not a multiple of the patch {config.patch_size}")
    if channels != config.in_channels:
        raise ValueError(f"expected {config.in_channels} latent channels, got {channels}")
    return frames // pt, height // ph, width // pw


def unpatchify(tokens: mx.array, latent_shape: tuple[int, int, int], patch: tuple[int, int, int]) -> mx.array:
    """Head output (B, ..., T/pt * H/ph * W/pw tokens, pt*ph*pw*C) -> latents (B, T, H, W, C)."""
    frames, height, width = latent_shape
    pt, ph, pw = patch
    batch = tokens.shape[0]
    out = tokens.reshape(batch, frames // pt, height // ph, width // pw, pt, ph, pw, -1)
    return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, frames, height, width, out.shape[-1])


class TextEmbedding(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.compute_dtype = mx.float32
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, context: mx.array) -> mx.array:
        context = context.astype(self.compute_dtype)
        return self.linear_2(nn.gelu_approx(self.linear_1(context)))


class TimeEmbedding(nn.Module):
    """Linear-SiLU-Linear on the sinusoid; given float32 input it computes in float32 whatever the weights."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, sinusoid: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(sinusoid)))


class WanAttention(nn.Module):
    """Biased q/k/v/o projections with RMSNorm of q and k across all heads; self- or cross-attention."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.compute_dtype = mx.float32
        self.kv_gather = None
        self.sparse = None  # a sparse self-attention (mlx_video.nn.attention.attention's `sparse`)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def project_kv(self, source: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values (B, L, heads, head_dim) of `source`; for cross-attention they depend only on the
        text, so a run computes them once per prompt and expert (`WanTransformer.prepare_context`)."""
        source = source.astype(self.compute_dtype)
        batch, kv_len, _ = source.shape
        k = self.norm_k(self.k(source)).reshape(batch, kv_len, self.num_heads, -1)
        v = self.v(source).reshape(batch, kv_len, self.num_heads, -1)
        return k, v

    def __call__(
        self,
        x: mx.array,
        context: mx.array | None = None,
        rope: tuple[mx.array, mx.array] | None = None,
        kv: "TextKV | None" = None,
    ) -> mx.array:
        """Self-attention over x, or cross-attention over `context`, or over prepared keys and values `kv`."""
        dtype = self.compute_dtype
        x = x.astype(dtype)
        batch, q_len, _ = x.shape
        q = self.norm_q(self.q(x)).reshape(batch, q_len, self.num_heads, -1)
        if kv is not None:
            k, v, bias = kv
        else:
            (k, v), bias = self.project_kv(x if context is None else context), None
        if rope is not None:
            q, k = apply_rope_qk(q, k, rope)
        if self.kv_gather is not None:  # sequence-parallel: this rank's queries attend to every rank's tokens
            k, v = self.kv_gather(k), self.kv_gather(v)
        return self.o(attention(q, k, v, mask=None if bias is None else bias.astype(q.dtype), sparse=self.sparse))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.compute_dtype = mx.float32
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(self.compute_dtype)
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class WanBlock(nn.Module):
    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.modulation = mx.zeros((6, dim))
        self.self_attn = WanAttention(dim, config.num_heads, config.eps)
        self.norm_cross = FP32LayerNorm(dim, eps=config.eps, affine=True)
        self.cross_attn = WanAttention(dim, config.num_heads, config.eps)
        self.ffn = FeedForward(dim, config.ffn_dim)

    def __call__(
        self,
        x: mx.array,
        time: mx.array,
        context: mx.array,
        rope: tuple[mx.array, mx.array],
        cross_kv: "TextKV | None" = None,
    ) -> mx.array:
        """x: (B, G, N, dim) float32 tokens in G timestep groups; time: (B, G, 6, dim) float32; cross_kv: this
        block's precomputed cross-attention keys and values (else computed from `context`)."""
        batch, groups, per_group, dim = x.shape
        tokens = (batch, groups * per_group, dim)
        grouped = (batch, groups, per_group, dim)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mx.split(
            self.modulation.astype(mx.float32) + time, 6, axis=2
        )

        h = adaln_modulate(x, shift_msa, scale_msa, self.eps)
        y = self.self_attn(h.reshape(tokens), rope=rope)
        x = gated_residual(x, gate_msa, y.reshape(grouped))

        y = self.cross_attn(self.norm_cross(x).reshape(tokens), context=context, kv=cross_kv)
        x = x + y.reshape(grouped)

        h = adaln_modulate(x, shift_ffn, scale_ffn, self.eps)
        y = self.ffn(h.reshape(tokens))
        return gated_residual(x, gate_ffn, y.reshape(grouped))


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = mx.zeros((2, dim))
        self.linear = nn.Linear(dim, out_features)

    def __call__(self, x: mx.array, time_embedding: mx.array) -> mx.array:
        """x: (B, G, N, dim) float32; time_embedding: (B, G, dim) float32. Computed in float32."""
        shift, scale = mx.split(self.modulation.astype(mx.float32) + time_embedding[:, :, None, :], 2, axis=2)
        h = adaln_modulate(x, shift, scale, self.eps)
        return self.linear(h).astype(mx.float32)


class WanTransformer(nn.Module):
    def __init__(self, config: WanTransformerConfig, dtype: mx.Dtype = mx.float32):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of even size")
        self.config = config
        patch_volume = math.prod(config.patch_size)
        self.patch_embedding = nn.Linear(patch_volume * config.in_channels, config.dim)
        self.text_embedding = TextEmbedding(config.text_dim, config.dim)
        self.time_embedding = TimeEmbedding(config.freq_dim, config.dim)
        self.time_projection = nn.Linear(config.dim, 6 * config.dim)
        self.blocks = [WanBlock(config) for _ in range(config.num_layers)]
        self.head = Head(config.dim, patch_volume * config.out_channels, config.eps)
        # Leading underscores keep these out of parameters(), so set_dtype and weight loading ignore them.
        self._freq_head, self._freq_tail = sinusoid_frequencies(config.freq_dim)
        self._rope_cache = {}
        self.sequence_split = None
        self.set_compute_dtype(dtype)

    def set_compute_dtype(self, dtype: mx.Dtype) -> None:
        """The dtype the linear layers inside the blocks (and the text and patch embeddings) compute in: the
        dtype the weights were converted to, whatever their storage (quantized weights are integers)."""
        self.compute_dtype = dtype
        for _, module in self.named_modules():
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = dtype

    def rope_tables(self, grid: tuple[int, int, int]):
        if grid not in self._rope_cache:
            if max(grid) > self.config.rope_max_positions:
                raise ValueError(
                    f"latent grid {grid} (after patching) exceeds the {self.config.rope_max_positions} "
                    "RoPE positions per axis the model was trained with"
                )
            # per-axis tables: the RoPE kernel reads them directly; the portable path expands them (same values)
            self._rope_cache[grid] = rope_tables(grid, self.config.head_dim)
        return self._rope_cache[grid]

    def __call__(self, x: mx.array, timestep: mx.array, context: mx.array) -> mx.array:
        """Flow velocity for latents x.

        x: (B, T, H, W, C_in) latents. timestep: (B,) one per sample, or (B, T // pt) one per latent frame
        (TI2V-5B). context: (B, L_text, text_dim), already zero-padded; every row is attended to.
        Returns (B, T, H, W, C_out) float32.
        """
        return self.unembed(self.run_blocks(self.embed(x, timestep, context)))

    def attention_sites(self) -> list:
        """The self-attention of each block, in order (they take a sparse attention, `--attention`)."""
        return [block.self_attn for block in self.blocks]

    def run_blocks(self, state: "WanState", start: int = 0, stop: int | None = None) -> "WanState":
        """Blocks start..stop-1 on state.hidden (all by default), in place; returns the state."""
        kv = state.cross_kv
        for i, block in enumerate(self.blocks[start:stop], start):
            state.hidden = block(state.hidden, state.block_time, state.context, state.rope,
                                 None if kv is None else kv[i])
        return state

    def prepare_context(self, context: mx.array) -> "PreparedContext":
        """The text embedding and every block's cross-attention keys and values for `context` (B, L, text_dim),
        evaluated now; pass the result as `context` to reuse them on every step. The zero padding is folded
        into one key per sample (`fold_zero_padding`)."""
        return PreparedContext.of(self, context)

    # The forward in three parts, so that a step cache can reuse the blocks' residual: embed, then each of
    # self.blocks on state.hidden, then unembed.

    def embed(self, x: mx.array, timestep: mx.array, context: mx.array) -> "WanState":
        cfg = self.config
        batch, frames, height, width, channels = x.shape
        f, h, w = patch_grid(x.shape, cfg)

        if timestep.ndim == 1:
            timestep = timestep[:, None]
        if timestep.ndim != 2 or timestep.shape[0] != batch or timestep.shape[1] not in (1, f):
            raise ValueError(f"timestep shape {timestep.shape} is neither ({batch},) nor ({batch}, {f})")
        groups = timestep.shape[1]

        pt, ph, pw = cfg.patch_size
        patches = x.reshape(batch, f, pt, h, ph, w, pw, channels)
        patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, f * h * w, -1)
        patches = patches.astype(self.compute_dtype)
        hidden = self.patch_embedding(patches).astype(mx.float32).reshape(batch, groups, -1, cfg.dim)

        # One time embedding per timestep group, broadcast over the group's tokens.
        time_embedding = self.time_embedding(sinusoidal_embedding(timestep, self._freq_head, self._freq_tail))
        block_time = self.time_projection(nn.silu(time_embedding)).reshape(batch, groups, 6, cfg.dim)
        rope = self.rope_tables((f, h, w))
        if self.sequence_split is not None:
            # this rank's contiguous block of each timestep group's tokens, and their RoPE rows
            part = self.sequence_split.token_slice(hidden.shape[2], "tokens per frame group")
            hidden = hidden[:, :, part]
            cos, sin = rope.full() if hasattr(rope, "full") else rope
            rope = tuple(t.reshape(groups, -1, t.shape[-1])[:, part].reshape(-1, t.shape[-1]) for t in (cos, sin))
        if isinstance(context, PreparedContext):
            text, cross_kv = context.text, context.kv
        else:
            text, cross_kv = self.text_embedding(context), None
        return WanState(hidden, block_time, time_embedding, text, rope, (frames, height, width), cross_kv)

    def set_sequence_split(self, split) -> None:
        """Run sequence-parallel over `split` (mlx_video.distributed.Split), or alone with None."""
        self.sequence_split = split
        gather = None if split is None or split.seq_ranks == 1 else (lambda t: split.gather_sequence(t, axis=1))
        for block in self.blocks:
            block.self_attn.kv_gather = gather

    def unembed(self, state: "WanState") -> mx.array:
        hidden = state.hidden
        if self.sequence_split is not None:
            hidden = self.sequence_split.gather_sequence(hidden, axis=2)
        return unpatchify(self.head(hidden, state.time_embedding), state.latent_shape, self.config.patch_size)


@dataclass
class WanState:
    """What flows between embed, the blocks and unembed."""

    hidden: mx.array  # (B, G, N, dim) float32 residual stream
    block_time: mx.array  # (B, G, 6, dim) float32
    time_embedding: mx.array  # (B, G, dim) float32
    context: mx.array  # (B, L, dim) embedded text (fewer rows when prepared: padding folded)
    rope: object
    latent_shape: tuple[int, int, int]
    cross_kv: list | None = None  # per block (k, v) of the text, when prepared once (prepare_context)


class TextKV(NamedTuple):
    """One block's prepared cross-attention keys and values, and the additive key bias that stands for the
    folded zero padding (None: nothing folded)."""

    k: mx.array  # (B, K, heads, head_dim)
    v: mx.array
    bias: mx.array | None  # (B, 1, 1, K) float32


@dataclass
class PreparedContext:
    """A context whose text embedding and cross-attention keys/values are computed once per prompt and model."""

    text: mx.array  # (B, K, dim) embedded text, the zero padding folded into one row per sample
    kv: list  # per block TextKV

    @property
    def shape(self):
        return self.text.shape

    @classmethod
    def of(cls, model, context: mx.array) -> "PreparedContext":
        """Prepared for `model` (its `text_embedding` and blocks' `cross_attn`) from zero-padded `context`."""
        context, bias = fold_zero_padding(context)
        text = model.text_embedding(context)
        kv = [TextKV(*block.cross_attn.project_kv(text), bias) for block in model.blocks]
        mx.eval(text, kv)
        return cls(text, kv)
