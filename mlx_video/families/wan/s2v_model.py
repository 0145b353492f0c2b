"""Wan2.2-S2V-14B diffusion transformer (the official `WanModel_S2V`), channels-last.

The Wan 14B backbone with speech conditioning. The token sequence is

    [noisy video (+ pose) | reference frame | FramePack motion tokens]

with one RoPE position per token (the reference at frame 30, the motion tokens at negative frames), a learned
embedding per segment (`cond_mask`), and two modulations per block: the noisy tokens use the timestep, the
reference and motion tokens the modulation of t = 0. After the listed blocks an audio injector updates the
noisy tokens frame by frame: an AdaLayerNorm conditioned on the frame's global audio token, then a
cross-attention over the frame's audio tokens. The output keeps only the noisy tokens.

Precision follows `WanTransformer`: a float32 residual stream, float32 time embedding, modulation, norms and
head; the linear layers inside the blocks run in the compute dtype. The audio encoder runs in float32 (the
official code autocasts it to float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.kernels import adaln_modulate, gated_residual
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.transformer import (
    Head,
    PreparedContext,
    TextEmbedding,
    TextKV,
    TimeEmbedding,
    WanAttention,
    WanBlock,
    sinusoid_frequencies,
    patch_grid,
    sinusoidal_embedding,
    unpatchify,
)
from mlx_video.nn.norms import layer_norm_fp32
from mlx_video.nn.rope import default_axis_dims

# Segment ids of `cond_mask` (the official trainable_cond_mask).
NOISY, REFERENCE, MOTION = 0, 1, 2
# FramePack levels, nearest first: temporal stride of each level's projection; its spatial stride is twice that.
_PACK_STRIDES = (1, 2, 4)


@dataclass(frozen=True)
class WanS2VConfig(WanTransformerConfig):
    audio_dim: int = 1024  # wav2vec2 hidden size
    num_audio_tokens: int = 4  # audio tokens per latent frame (plus one learned padding token)
    audio_layers: int = 25  # wav2vec2 hidden states stacked (embedding output + 24 layers)
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    cond_dim: int = 16  # pose-latent channels
    motion_frames: int = 73  # pixel frames of motion context; (motion_frames + 3) // 4 latent frames
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # FramePack latent frames, nearest to farthest
    ref_frame_index: int = 30  # RoPE frame position of the reference image

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames + 3) // 4


# Published: wan/configs/wan_s2v_14B.py (the dense 14B backbone, 40 layers of 40 heads x 128).
WAN_S2V_14B = WanS2VConfig()


def _patchify(x: mx.array, patch: tuple[int, int, int]) -> mx.array:
    """(B, T, H, W, C) -> (B, tokens, pt*ph*pw*C), tokens in (t, h, w) order, features in (kt, kh, kw, C) order
    (a Conv3d with kernel == stride, converted by `conv3d_patch_to_linear`). Trailing remainders are dropped,
    as the convolution drops them."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    f, gh, gw = t // pt, h // ph, w // pw
    x = x[:, : f * pt, : gh * ph, : gw * pw]
    x = x.reshape(b, f, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, f * gh * gw, pt * ph * pw * c)


def _grid_positions(frames: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(frames) * len(rows) * len(cols), 3) positions in (t, h, w) order."""
    grid = np.meshgrid(frames, rows, cols, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.float64)


def _stretched(count: int, span: int) -> np.ndarray:
    """`count` integer positions spread over 0..span-1, truncated as the official rope_precompute does."""
    return np.linspace(0, span - 1, count).astype(int)


class CausalConv1d(nn.Module):
    """Conv1d over time with the first frame replicated kernel_size - 1 times on the left."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (N, T, C)."""
        x = mx.concatenate([mx.repeat(x[:, :1], self.pad, axis=1), x], axis=1)
        return self.conv(x)


class AudioEncoder(nn.Module):
    """The official CausalAudioEncoder with its MotionEncoder_tc (global token enabled), in float32.

    A SiLU-weighted mean over the stacked wav2vec2 layers, then causal convolutions downsampling time by 4:
    `num_tokens` local streams (plus a learned padding token) and one global stream, which share conv2/conv3.
    """

    def __init__(self, audio_dim: int, audio_layers: int, dim: int, num_tokens: int, eps: float = 1e-6):
        super().__init__()
        self.num_tokens = num_tokens
        self.eps = eps
        self.layer_weights = mx.full((audio_layers,), 0.01)
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_token = mx.zeros((dim,))

    def _norm_act(self, x: mx.array) -> mx.array:
        return nn.silu(layer_norm_fp32(x, eps=self.eps))

    def __call__(self, features: mx.array) -> tuple[mx.array, mx.array]:
        """features: (B, F, audio_layers, audio_dim) -> local tokens (B, F', num_tokens + 1, dim) and global
        tokens (B, F', dim), F' = ceil(ceil(F / 2) / 2)."""
        features = features.astype(mx.float32)
        weights = nn.silu(self.layer_weights.astype(mx.float32))
        mixed = ((features * weights[:, None]) / weights.sum()).sum(axis=2)  # (B, F, audio_dim)
        batch, frames, _ = mixed.shape
        n = self.num_tokens

        local = self.conv1_local(mixed)  # (B, F, n * dim/4): n streams, stream-major channels
        local = local.reshape(batch, frames, n, -1).transpose(0, 2, 1, 3).reshape(batch * n, frames, -1)
        glob = self.conv1_global(mixed)  # (B, F, dim/4)
        # both paths share conv2 / conv3: run them as one batch
        x = self._norm_act(mx.concatenate([local, glob], axis=0))
        x = self._norm_act(self.conv2(x))
        x = self._norm_act(self.conv3(x))
        steps, dim = x.shape[1], x.shape[2]
        local = x[: batch * n].reshape(batch, n, steps, dim).transpose(0, 2, 1, 3)
        pad = mx.broadcast_to(self.padding_token.astype(mx.float32), (batch, steps, 1, dim))
        local = mx.concatenate([local, pad], axis=2)
        glob = self.final_linear(x[batch * n :])
        return local, glob


class AudioInjector(nn.Module):
    """diffusers' AdaLayerNorm (chunk_dim=1: linear(SiLU(g)) -> shift, scale; LayerNorm eps 1e-5, no affine)
    conditioned on a frame's global audio token, then Wan cross-attention over the frame's audio tokens."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.adanorm = nn.Linear(dim, 2 * dim)
        self.attn = WanAttention(dim, num_heads, eps)

    def __call__(self, x: mx.array, audio: mx.array, audio_global: mx.array) -> mx.array:
        """x: (N, tokens, dim) one latent frame per row; audio: (N, n_audio, dim); audio_global: (N, dim).
        Returns the residual update (N, tokens, dim)."""
        shift, scale = mx.split(self.adanorm(nn.silu(audio_global)).astype(mx.float32)[:, None], 2, axis=-1)
        h = adaln_modulate(x, shift, scale, 1e-5)
        return self.attn(h, context=audio)


class FramePacker(nn.Module):
    """The official FramePackMotioner: the last sum(buckets) motion latents, right-aligned in a zero buffer, split
    far-to-near into `buckets[::-1]` frames and patch-embedded with strides (4,8,8), (2,4,4), (1,2,2)."""

    def __init__(self, in_channels: int, dim: int, buckets: tuple[int, int, int]):
        super().__init__()
        self.compute_dtype = mx.float32
        self.buckets = tuple(buckets)
        self.proj_1x = nn.Linear(1 * 2 * 2 * in_channels, dim)
        self.proj_2x = nn.Linear(2 * 4 * 4 * in_channels, dim)
        self.proj_4x = nn.Linear(4 * 8 * 8 * in_channels, dim)

    def __call__(self, motion: mx.array) -> mx.array:
        """motion: (B, Tm, H, W, C), any Tm >= 0 -> tokens (B, N, dim), nearest level first."""
        batch, frames, h, w, c = motion.shape
        total = sum(self.buckets)
        if frames >= total:
            buffer = motion[:, frames - total :]
        else:
            buffer = mx.concatenate([mx.zeros((batch, total - frames, h, w, c), motion.dtype), motion], axis=1)
        near, mid, _ = self.buckets
        far_end = total - near - mid
        levels = (buffer[:, total - near :], buffer[:, far_end : total - near], buffer[:, :far_end])
        tokens = []
        for proj, part, s in zip((self.proj_1x, self.proj_2x, self.proj_4x), levels, _PACK_STRIDES):
            patches = _patchify(part, (s, 2 * s, 2 * s)).astype(self.compute_dtype)
            tokens.append(proj(patches))
        return mx.concatenate(tokens, axis=1)

    def positions(self, height: int, width: int) -> np.ndarray:
        """RoPE (t, h, w) positions of the tokens, for latents of size height x width: frames at negative indices
        (descending within a level), h and w stretched over the (height/2, width/2) grid of the nearest level."""
        parts, start = [], 0
        for bucket, s in zip(self.buckets, _PACK_STRIDES):
            start += bucket
            frames = np.linspace(start, start - bucket + 1, bucket // s).astype(int)
            rows = _stretched(height // (2 * s), height // 2)
            cols = _stretched(width // (2 * s), width // 2)
            parts.append(_grid_positions(-frames, rows, cols))
        return np.concatenate(parts, axis=0)


class S2VBlock(WanBlock):
    """The Wan block with two modulations: tokens [:split] use `time`, tokens [split:] use `time_cond`."""

    def __call__(
        self,
        x: mx.array,
        time: mx.array,
        time_cond: mx.array,
        split: int,
        context: mx.array,
        rope: tuple[mx.array, mx.array],
        cross_kv: TextKV | None = None,
    ) -> mx.array:
        """x: (B, L, dim) float32; time: (B, 6, dim), time_cond: (1, 6, dim) float32."""
        mod = self.modulation.astype(mx.float32)
        segments = ((slice(None, split), mod + time), (slice(split, None), mod + time_cond))

        def modulate(x, i):  # i: index of the shift; the scale follows it
            return mx.concatenate(
                [adaln_modulate(x[:, s], e[:, i : i + 1], e[:, i + 1 : i + 2], self.eps) for s, e in segments], axis=1
            )

        def gate(x, y, i):
            return mx.concatenate([gated_residual(x[:, s], e[:, i : i + 1], y[:, s]) for s, e in segments], axis=1)

        x = gate(x, self.self_attn(modulate(x, 0), rope=rope), 2)
        x = x + self.cross_attn(self.norm_cross(x), context=context, kv=cross_kv)
        return gate(x, self.ffn(modulate(x, 3)), 5)


class WanS2VTransformer(nn.Module):
    def __init__(self, config: WanS2VConfig, dtype: mx.Dtype = mx.float32):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of even size")
        if sorted(set(config.audio_inject_layers)) != list(config.audio_inject_layers) or not all(
            0 <= i < config.num_layers for i in config.audio_inject_layers
        ):
            raise ValueError(f"audio_inject_layers {config.audio_inject_layers} must be increasing block indices")
        self.config = config
        dim = config.dim
        patch_volume = math.prod(config.patch_size)
        self.patch_embedding = nn.Linear(patch_volume * config.in_channels, dim)
        self.cond_encoder = nn.Linear(patch_volume * config.cond_dim, dim)
        self.cond_mask = nn.Embedding(3, dim)
        self.text_embedding = TextEmbedding(config.text_dim, dim)
        self.time_embedding = TimeEmbedding(config.freq_dim, dim)
        self.time_projection = nn.Linear(dim, 6 * dim)
        self.blocks = [S2VBlock(config) for _ in range(config.num_layers)]
        self.head = Head(dim, patch_volume * config.out_channels, config.eps)
        self.frame_packer = FramePacker(config.in_channels, dim, config.zip_frame_buckets)
        self.audio_encoder = AudioEncoder(config.audio_dim, config.audio_layers, dim, config.num_audio_tokens)
        self.audio_injectors = [AudioInjector(dim, config.num_heads, config.eps) for _ in config.audio_inject_layers]
        self._injector_of = {block: i for i, block in enumerate(config.audio_inject_layers)}
        self._freq_head, self._freq_tail = sinusoid_frequencies(config.freq_dim)
        self._rope_cache = {}
        self.set_compute_dtype(dtype)

    def set_compute_dtype(self, dtype: mx.Dtype) -> None:
        """The dtype the linear layers inside the blocks and the text embedding compute in."""
        self.compute_dtype = dtype
        for _, module in self.named_modules():
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = dtype

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        context,
        *,
        ref_latents: mx.array,
        motion_latents: mx.array,
        audio: mx.array,
        cond_latents: mx.array | None = None,
        drop_motion: bool = False,
    ) -> mx.array:
        """Flow velocity for latents x.

        x: (B, T, H, W, C_in) noisy latents; timestep: (B,); context: (B, L, text_dim) zero-padded text (padded
        to text_len here when shorter) or a `PreparedContext`; ref_latents: (B, 1, H, W, C_in); motion_latents:
        (B, Tm, H, W, C_in), any Tm >= 0 (the last sum(zip_frame_buckets) are used, zero-filled in front);
        audio: (B, F, audio_layers, audio_dim) wav2vec2 hidden states per video frame of this clip;
        cond_latents: (B, T, H, W, cond_dim) pose latents, None for none (zeros); drop_motion: leave the motion
        tokens out (the first clip). Returns (B, T, H, W, C_out) float32.
        """
        state = self.embed(
            x, timestep, context, ref_latents=ref_latents, motion_latents=motion_latents, audio=audio,
            cond_latents=cond_latents, drop_motion=drop_motion,
        )
        return self.unembed(self.run_blocks(state))

    def prepare_context(self, context: mx.array) -> PreparedContext:
        """The text embedding and every block's cross-attention keys and values, evaluated now; the zero padding
        folded into one key per sample."""
        return PreparedContext.of(self, self._pad_text(context))

    def _pad_text(self, context: mx.array) -> mx.array:
        batch, length, channels = context.shape
        if length > self.config.text_len:
            raise ValueError(f"context has {length} tokens, more than text_len {self.config.text_len}")
        if length < self.config.text_len:
            pad = mx.zeros((batch, self.config.text_len - length, channels), context.dtype)
            context = mx.concatenate([context, pad], axis=1)
        return context

    def rope_tables(self, grid: tuple[int, int, int], latent_hw: tuple[int, int], motion: bool):
        """(cos, sin), each (L, head_dim/2) float32, for the whole token sequence; angles in float64."""
        key = (grid, latent_hw, motion)
        if key not in self._rope_cache:
            cfg = self.config
            f, h, w = grid
            parts = [
                _grid_positions(np.arange(f), np.arange(h), np.arange(w)),
                _grid_positions(np.array([cfg.ref_frame_index]), np.arange(h), np.arange(w)),
            ]
            if motion:
                parts.append(self.frame_packer.positions(*latent_hw))
            positions = np.concatenate(parts, axis=0)
            if np.abs(positions).max() >= cfg.rope_max_positions:
                raise ValueError(f"RoPE positions exceed the {cfg.rope_max_positions} the model was trained with")
            angles = []
            for axis, dims in enumerate(default_axis_dims(cfg.head_dim)):
                inv_freq = 1.0 / 10000.0 ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
                angles.append(positions[:, axis : axis + 1] * inv_freq[None])
            angles = np.concatenate(angles, axis=1)
            self._rope_cache[key] = (mx.array(np.cos(angles).astype(np.float32)),
                                     mx.array(np.sin(angles).astype(np.float32)))
        return self._rope_cache[key]

    # The forward in three parts, like WanTransformer: embed, each of self.blocks (with its audio injection) on
    # state.hidden, then unembed.

    def embed(
        self,
        x: mx.array,
        timestep: mx.array,
        context,
        *,
        ref_latents: mx.array,
        motion_latents: mx.array,
        audio: mx.array,
        cond_latents: mx.array | None = None,
        drop_motion: bool = False,
    ) -> "S2VState":
        cfg = self.config
        batch, frames, height, width, channels = x.shape
        f, h, w = patch_grid(x.shape, cfg)
        if ref_latents.shape != (batch, 1, height, width, channels):
            raise ValueError(f"ref_latents shape {ref_latents.shape} should be {(batch, 1, height, width, channels)}")
        if motion_latents.shape[0] != batch or tuple(motion_latents.shape[2:]) != (height, width, channels):
            raise ValueError(f"motion_latents shape {motion_latents.shape} does not match the latents {x.shape}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep shape {timestep.shape} should be ({batch},)")
        dtype = self.compute_dtype

        noisy = self.patch_embedding(_patchify(x, cfg.patch_size).astype(dtype))
        if cond_latents is None:
            noisy = noisy + self.cond_encoder.bias  # the official model encodes all-zero pose latents
        else:
            noisy = noisy + self.cond_encoder(_patchify(cond_latents, cfg.patch_size).astype(dtype))
        ref = self.patch_embedding(_patchify(ref_latents, cfg.patch_size).astype(dtype))
        segments = [(noisy, NOISY), (ref, REFERENCE)]
        if not drop_motion:
            segments.append((self.frame_packer(motion_latents), MOTION))
        mask = self.cond_mask.weight.astype(mx.float32)
        hidden = mx.concatenate([t.astype(mx.float32) + mask[i] for t, i in segments], axis=1)

        # t for the noisy tokens, t = 0 for the reference and motion tokens: one time-embedding batch
        t = mx.concatenate([timestep.astype(mx.float32), mx.zeros((1,), mx.float32)])
        time_embedding = self.time_embedding(sinusoidal_embedding(t, self._freq_head, self._freq_tail))
        block_time = self.time_projection(nn.silu(time_embedding)).reshape(batch + 1, 6, cfg.dim)

        audio_tokens, audio_global = self._encode_audio(audio, batch, f)

        if isinstance(context, PreparedContext):
            text, cross_kv = context.text, context.kv
        else:
            text, cross_kv = self.text_embedding(self._pad_text(context)), None
        rope = self.rope_tables((f, h, w), (height, width), not drop_motion)
        return S2VState(
            hidden=hidden, block_time=block_time[:batch], cond_time=block_time[batch:],
            time_embedding=time_embedding[:batch], context=text, rope=rope, noisy_tokens=f * h * w,
            audio=audio_tokens, audio_global=audio_global, latent_shape=(frames, height, width), cross_kv=cross_kv,
        )

    def _encode_audio(self, audio: mx.array, batch: int, latent_frames: int) -> tuple[mx.array, mx.array]:
        """(B*T, n_audio + 1, dim) audio tokens and (B*T, dim) global tokens, one row per noisy latent frame."""
        cfg = self.config
        if audio.ndim != 4 or audio.shape[0] != batch or tuple(audio.shape[2:]) != (cfg.audio_layers, cfg.audio_dim):
            raise ValueError(f"audio shape {audio.shape} should be ({batch}, F, {cfg.audio_layers}, {cfg.audio_dim})")
        # the model sees motion_frames copies of the clip's first frame before the clip
        audio = mx.concatenate([mx.repeat(audio[:, :1], cfg.motion_frames, axis=1), audio], axis=1)
        local, glob = self.audio_encoder(audio)
        skip = cfg.motion_latent_frames
        if local.shape[1] - skip != latent_frames:
            raise ValueError(
                f"{audio.shape[1] - cfg.motion_frames} audio frames give {local.shape[1] - skip} latent frames of "
                f"audio tokens, but the latents have {latent_frames}"
            )
        local, glob = local[:, skip:], glob[:, skip:]
        return local.reshape(batch * latent_frames, *local.shape[2:]), glob.reshape(batch * latent_frames, -1)

    def attention_sites(self) -> list:
        """The self-attention of each block, in order (the reference and motion tokens follow the video)."""
        return [block.self_attn for block in self.blocks]

    def run_blocks(self, state: "S2VState", start: int = 0, stop: int | None = None) -> "S2VState":
        """Blocks start..stop-1 on state.hidden (all by default), each followed by its audio injection; in place."""
        kv = state.cross_kv
        for i, block in enumerate(self.blocks[start:stop], start):
            state.hidden = block(state.hidden, state.block_time, state.cond_time, state.noisy_tokens, state.context,
                                 state.rope, None if kv is None else kv[i])
            if i in self._injector_of:
                state.hidden = self._inject_audio(self.audio_injectors[self._injector_of[i]], state)
        return state

    def _inject_audio(self, injector: AudioInjector, state: "S2VState") -> mx.array:
        hidden, n = state.hidden, state.noisy_tokens
        batch, _, dim = hidden.shape
        rows = state.audio.shape[0]  # batch * latent frames
        noisy = hidden[:, :n]
        update = injector(noisy.reshape(rows, -1, dim), state.audio, state.audio_global)
        noisy = noisy + update.reshape(batch, n, dim).astype(mx.float32)
        return mx.concatenate([noisy, hidden[:, n:]], axis=1)

    def unembed(self, state: "S2VState") -> mx.array:
        out = self.head(state.hidden[:, None, : state.noisy_tokens], state.time_embedding[:, None])
        return unpatchify(out, state.latent_shape, self.config.patch_size)


@dataclass
class S2VState:
    """What flows between embed, the blocks and unembed."""

    hidden: mx.array  # (B, L, dim) float32: noisy, reference, motion tokens
    block_time: mx.array  # (B, 6, dim) float32 projected time embedding of t (noisy tokens)
    cond_time: mx.array  # (1, 6, dim) float32 projected time embedding of t = 0 (reference and motion tokens)
    time_embedding: mx.array  # (B, dim) float32, for the head
    context: mx.array  # (B, text_len, dim) embedded text (fewer rows when prepared: padding folded)
    rope: tuple[mx.array, mx.array]  # (L, head_dim/2) cos, sin
    noisy_tokens: int
    audio: mx.array  # (B*T, n_audio + 1, dim) per latent frame
    audio_global: mx.array  # (B*T, dim)
    latent_shape: tuple[int, int, int]
    cross_kv: list | None = None


__all__ = ["WAN_S2V_14B", "WanS2VConfig", "WanS2VTransformer", "S2VState"]
