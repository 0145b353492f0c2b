"""HunyuanVideo 1.5's causal video VAE, channels-last, matching diffusers' `AutoencoderKLHunyuanVideo15` (the
official `hyvideo/models/autoencoders/hunyuanvideo_15_vae.py` `AutoencoderKLConv3D`, under other names).

Video is (B, 1 + 4k, H, W, 3) in [-1, 1]; latents are (B, 1 + k, H/16, W/16, 32). The network:
  - every 3x3x3 convolution is causal in time: the input is padded in front with 2 copies of its first frame,
    and in space with 1 copy of the edge pixels (replicate padding);
  - normalisation is an RMS norm over channels (x / ||x|| * sqrt(C) * gamma), no groups, no bias;
  - down/up-sampling is a space(/time)-to-channel rearrangement around a convolution, plus a parameter-free
    shortcut (channel means going down, repeated channels going up). A temporal level treats the clip's first
    frame alone (it stays one frame), the others in pairs;
  - the mid block of each side has a single-head attention over all the tokens of a clip with a frame-causal
    mask (frame i sees frames <= i);
  - the encoder adds channel means of its last features to its output, the decoder its input repeated over
    channels to the output of its first convolution.

Decoding (and encoding) runs in temporal chunks: every causal convolution keeps the last 2 (padded) input frames
of the previous chunk and each mid-block attention keeps the keys and values of the frames before, so that a
chunked run is the same computation as one pass over the whole clip (`chunk_frames=None`), whatever the chunk
size; memory is that of one chunk plus the attention's keys and values. Spatial tiling (`VAETiling.spatial`)
reproduces diffusers' `enable_tiling()`: tiles of `tile_size` pixels (tile_size/16 latents) every
tile_size * (1 - overlap) pixels, decoded independently (each in chunks) and blended with linear ramps over
`tile_size * overlap` pixels, in diffusers' order and in place. Tiled and untiled decoding are not the same
computation (a tile sees only its window); where one tile covers the input they agree exactly.

`encode` returns the latent mean times `scaling_factor` (1.03682), what the transformer sees; `decode` takes
such latents, divides by `scaling_factor` and returns the video, not clamped (as diffusers' `vae.decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.json_config import JsonConfig
from mlx_video.nn.attention import attention, blocked_score_bytes


@dataclass(frozen=True)
class Hunyuan15VAEConfig(JsonConfig):
    """The published VAE by default (diffusers' `AutoencoderKLHunyuanVideo15` defaults; MODELS card: 32 latent
    channels, 16x spatial and 4x temporal compression)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2
    spatial_compression: int = 16
    temporal_compression: int = 4
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    scaling_factor: float = 1.03682

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    def validate(self) -> None:
        s, t, levels = self.spatial_compression, self.temporal_compression, len(self.block_out_channels)
        if s < 2 or s & (s - 1) or t < 1 or t & (t - 1) or t > s:
            raise ValueError(f"spatial_compression {s} and temporal_compression {t} must be powers of 2, t <= s")
        if self.spatial_levels >= levels:
            raise ValueError(f"{s}x spatial compression needs more than {self.spatial_levels} levels, got {levels}")
        top, z = self.block_out_channels[-1], self.latent_channels
        if top % (2 * z) or self.block_out_channels[-1] % z:
            raise ValueError(f"the last of block_out_channels ({top}) must be a multiple of 2 * latent_channels")
        for i in range(self.spatial_levels):
            self._check_resample(i)

    def _check_resample(self, i: int) -> None:
        chans = self.block_out_channels
        c_in, c_out = chans[i], chans[i + 1] if self.downsample_match_channel else chans[i]
        factor = 8 if self.temporal_down(i) else 4
        if c_out % factor or (factor * c_in) % c_out or (factor * c_in // c_out) % (2 if factor == 8 else 1):
            raise ValueError(f"downsampling level {i}: {c_in} -> {c_out} channels do not fold by {factor}")
        rev = chans[::-1]
        u_in, u_out = rev[i], rev[i + 1] if self.upsample_match_channel else rev[i]
        factor = 8 if self.temporal_up(i) else 4
        if u_in % factor or (factor * u_out) % u_in or (factor * u_out // u_in) % (2 if factor == 8 else 1):
            raise ValueError(f"upsampling level {i}: {u_in} -> {u_out} channels do not unfold by {factor}")

    @property
    def spatial_levels(self) -> int:
        return int(math.log2(self.spatial_compression))

    def temporal_down(self, i: int) -> bool:
        """Encoder level i halves time (the last log2(t) of its spatial levels)."""
        return self.spatial_levels - int(math.log2(self.temporal_compression)) <= i < self.spatial_levels

    def temporal_up(self, i: int) -> bool:
        """Decoder level i doubles time (its first log2(t) levels)."""
        return i < int(math.log2(self.temporal_compression))


HUNYUAN15_VAE = Hunyuan15VAEConfig()


@dataclass(frozen=True)
class VAETiling:
    """How a clip is cut. `tile_size` (pixels) and `overlap` are diffusers' `tile_sample_min_height/width` and
    `tile_overlap_factor` (diffusers' defaults 256 and 0.25; the official pipeline uses 256 and 0.125 on GPUs of
    more than 21 GB). `chunk_frames`: latent frames per decoder (encoder) step; None runs the whole clip at once."""

    spatial: bool = True
    tile_size: int = 256
    overlap: float = 0.25
    chunk_frames: int | None = 1

    def __post_init__(self):
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1 (or None), got {self.chunk_frames}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")

    def latent_layout(self, s: int) -> tuple[int, int, int]:
        """(latent tile, latent stride, pixel blend) for decoding at spatial compression s."""
        tile = self.tile_size // s
        stride, blend = int(tile * (1 - self.overlap)), int(self.tile_size * self.overlap)
        if self.tile_size % s or stride < 1 or stride * s != self.tile_size - blend:
            raise ValueError(f"tile_size {self.tile_size} / overlap {self.overlap} do not make whole latent tiles "
                             f"and strides at {s}x compression")
        return tile, stride, blend

    def pixel_layout(self, s: int) -> tuple[int, int, int]:
        """(pixel tile, pixel stride, latent blend) for encoding at spatial compression s."""
        tile = self.tile_size // s
        stride, blend = int(self.tile_size * (1 - self.overlap)), int(tile * self.overlap)
        if self.tile_size % s or stride < s or stride != (tile - blend) * s:
            raise ValueError(f"tile_size {self.tile_size} / overlap {self.overlap} do not make whole latent tiles "
                             f"and strides at {s}x compression")
        return self.tile_size, stride, blend


# A chunk's state: for each causal layer (keyed by id), what it keeps from the frames before.
FrameCache = dict


class RMSNorm(nn.Module):
    """x / max(||x||, 1e-12) over channels, times sqrt(C) and a gain."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        # rms_norm is x * sqrt(C) / sqrt(||x||^2 + C eps): the same for a vanishing eps, and 0 for a zero vector.
        return mx.fast.rms_norm(x, self.gamma, 1e-24)


class CausalConv3d(nn.Module):
    """3x3x3 convolution, causal in time (2 frames of context, the first frame replicated before the clip)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3)

    def __call__(self, x: mx.array, cache: FrameCache) -> mx.array:
        past = cache.get(id(self))
        front = mx.repeat(x[:, :1], 2, axis=1) if past is None else past
        x = mx.concatenate([front, x], axis=1)
        cache[id(self)] = mx.contiguous(x[:, -2:])
        x = mx.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)], mode="edge")
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Linear(in_channels, out_channels)

    def __call__(self, x: mx.array, cache: FrameCache) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)), cache)
        h = self.conv2(nn.silu(self.norm2(h)), cache)
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class FrameCausalAttention(nn.Module):
    """Single-head attention (head width = channels) over a clip's tokens; frame i sees frames <= i. The keys and
    values of earlier chunks are kept in the cache, so a chunk's queries see every frame before it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, cache: FrameCache) -> mx.array:
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b, t * h * w, 1, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        past = cache.get(id(self))
        if past is not None:
            k, v = mx.concatenate([past[0], k], axis=1), mx.concatenate([past[1], v], axis=1)
        cache[id(self)] = (k, v)
        mask = None
        if t > 1:  # within the chunk; all earlier frames are visible to all of its queries
            before = k.shape[1] // (h * w) - t
            query_frame = mx.repeat(mx.arange(before, before + t), h * w)
            key_frame = mx.repeat(mx.arange(before + t), h * w)
            mask = key_frame[None, :] <= query_frame[:, None]
        out = self.proj_out(attention(q, k, v, mask=mask))
        return x + out.reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels), ResnetBlock(channels, channels)]
        self.attentions = [FrameCausalAttention(channels)]

    def __call__(self, x: mx.array, cache: FrameCache) -> mx.array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x, cache), cache)


def fold(x: mx.array, rt: int) -> mx.array:
    """(B, T*rt, H*2, W*2, C) -> (B, T, H, W, rt*2*2*C), channels ordered (rt, rh, rw, C)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // rt, rt, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, t // rt, h // 2, w // 2, rt * 4 * c)


def unfold(x: mx.array, rt: int) -> mx.array:
    """The inverse of `fold`: (B, T, H, W, rt*2*2*C) -> (B, T*rt, H*2, W*2, C)."""
    b, t, h, w, c = x.shape
    c //= rt * 4
    x = x.reshape(b, t, h, w, rt, 2, 2, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, t * rt, h * 2, w * 2, c)


def group_mean(x: mx.array, channels: int) -> mx.array:
    """Mean over consecutive groups of channels, down to `channels`."""
    return x.reshape(*x.shape[:-1], channels, -1).mean(axis=-1)


class Downsample(nn.Module):
    """2x down in space (and time, `temporal`): a convolution to out/factor channels folded into channels, plus
    the input folded the same way and averaged down to out channels. In time the clip's first frame is folded
    alone (its convolution output twice, to fill the channels), the next ones in pairs."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(in_channels, out_channels // (8 if temporal else 4))

    @staticmethod
    def _down(x: mx.array, h: mx.array, rt: int, doubled: bool = False) -> mx.array:
        h = fold(h, rt)
        if doubled:
            h = mx.concatenate([h, h], axis=-1)
        return h + group_mean(fold(x, rt), h.shape[-1])

    def __call__(self, x: mx.array, cache: FrameCache, first: bool) -> mx.array:
        h = self.conv(x, cache)
        if not self.temporal:
            return self._down(x, h, 1)
        parts = []
        if first:
            parts.append(self._down(x[:, :1], h[:, :1], 1, doubled=True))
            x, h = x[:, 1:], h[:, 1:]
        if x.shape[1]:
            parts.append(self._down(x, h, 2))
        return mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class Upsample(nn.Module):
    """2x up in space (and time, `temporal`): a convolution to out*factor channels unfolded into space (time),
    plus the input's channels repeated and unfolded the same way. In time the clip's first frame stays one frame
    (the first half of its unfolded channels; its shortcut repeats half as often)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels * (8 if temporal else 4))

    def _up_first(self, x: mx.array, h: mx.array) -> mx.array:
        c = self.out_channels
        h = unfold(h, 1)[..., :c]
        return h + mx.repeat(unfold(x, 1), c * 4 // x.shape[-1], axis=-1)

    def __call__(self, x: mx.array, cache: FrameCache, first: bool) -> mx.array:
        h = self.conv(x, cache)
        c = self.out_channels
        if not self.temporal:
            return unfold(h, 1) + unfold(mx.repeat(x, 4 * c // x.shape[-1], axis=-1), 1)
        parts = []
        if first:
            parts.append(self._up_first(x[:, :1], h[:, :1]))
            x, h = x[:, 1:], h[:, 1:]
        if x.shape[1]:
            parts.append(unfold(h, 2) + mx.repeat(unfold(x, 2), 8 * c // x.shape[-1], axis=-1))
        return mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, down_channels: int | None, temporal: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(layers)]
        if down_channels is not None:
            self.downsamplers = [Downsample(out_channels, down_channels, temporal)]

    def __call__(self, x: mx.array, cache: FrameCache, first: bool) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.downsamplers[0](x, cache, first) if "downsamplers" in self else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, up_channels: int | None, temporal: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(layers)]
        if up_channels is not None:
            self.upsamplers = [Upsample(out_channels, up_channels, temporal)]

    def __call__(self, x: mx.array, cache: FrameCache, first: bool) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache, first) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: Hunyuan15VAEConfig):
        super().__init__()
        chans = cfg.block_out_channels
        self.latent_channels = cfg.latent_channels
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.down_blocks = []
        c_in = chans[0]
        for i, c in enumerate(chans):
            down = None
            if i < cfg.spatial_levels:
                down = chans[i + 1] if cfg.downsample_match_channel else c
            self.down_blocks.append(DownBlock(c_in, c, cfg.layers_per_block, down, cfg.temporal_down(i)))
            c_in = down or c
        self.mid_block = MidBlock(chans[-1])
        self.norm_out = RMSNorm(chans[-1])
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels)

    def __call__(self, x: mx.array, cache: FrameCache, first: bool) -> mx.array:
        """Video frames -> the latent moments (mean | log-variance) of their latent frames."""
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache, first)
        x = self.mid_block(x, cache)
        return self.conv_out(nn.silu(self.norm_out(x)), cache) + group_mean(x, 2 * self.latent_channels)


class Decoder(nn.Module):
    def __init__(self, cfg: Hunyuan15VAEConfig):
        super().__init__()
        chans = cfg.block_out_channels[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0])
        self.mid_block = MidBlock(chans[0])
        self.up_blocks = []
        c_in = chans[0]
        for i, c in enumerate(chans):
            up = None
            if i < cfg.spatial_levels:
                up = chans[i + 1] if cfg.upsample_match_channel else c
            self.up_blocks.append(UpBlock(c_in, c, cfg.layers_per_block + 1, up, cfg.temporal_up(i)))
            c_in = up or c
        self.norm_out = RMSNorm(chans[-1])
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels)

    def __call__(self, z: mx.array, cache: FrameCache, first: bool) -> mx.array:
        x = self.conv_in(z, cache) + mx.repeat(z, self.conv_in.conv.weight.shape[0] // z.shape[-1], axis=-1)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first)
        return self.conv_out(nn.silu(self.norm_out(x)), cache)


# --- spatial tiles, blended as diffusers does (in place, row by row) ------------------------------------------


def blend_into(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """Overwrite the first `extent` entries of b along `axis` with a linear ramp from a's last ones (in place)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (np.arange(extent, dtype=np.float32) / np.float32(extent)).reshape(shape)
    head, tail = [slice(None)] * b.ndim, [slice(None)] * b.ndim
    head[axis], tail[axis] = slice(0, extent), slice(a.shape[axis] - extent, a.shape[axis])
    b[tuple(head)] = a[tuple(tail)] * (np.float32(1) - w) + b[tuple(head)] * w


def tiled(x: mx.array, run, size: int, stride: int, blend: int, out_scale: float) -> np.ndarray:
    """Run `run` on overlapping size x size windows of x (B, T, H, W, C) every `stride` pixels, blend each
    result with its upper and left neighbours over `blend` pixels and keep its first stride * out_scale rows and
    columns. Only the previous row of results is held."""
    _, _, height, width, _ = x.shape
    limit = int(stride * out_scale)
    out, prev, top = None, None, 0
    for i in range(0, height, stride):
        row = []
        for k, j in enumerate(range(0, width, stride)):
            tile = run(x[:, :, i : i + size, j : j + size])
            if prev is not None:
                blend_into(prev[k], tile, blend, axis=2)
            if row:
                blend_into(row[-1], tile, blend, axis=3)
            row.append(tile)
        strip = np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3)
        if out is None:
            shape = (*strip.shape[:2], int(height * out_scale), strip.shape[3], strip.shape[4])
            out = np.empty(shape, np.float32)
        out[:, :, top : top + strip.shape[2]] = strip
        top, prev = top + strip.shape[2], row
    if top != out.shape[2]:
        raise ValueError(f"tiles cover {top} rows of {out.shape[2]}")
    return out


class Hunyuan15VAE(nn.Module):
    """The VAE. Parameters are named as diffusers names them (`mlx_video/families/hunyuan15/vae_keys.py` maps
    the official names); 1x1 convolutions are linear layers, RMS-norm gains are (C,)."""

    def __init__(self, config: Hunyuan15VAEConfig = HUNYUAN15_VAE, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype  # the activations' dtype; the weights keep whatever dtype they are loaded in
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # -- encoding --

    def _encode_window(self, video: mx.array, chunk: int | None) -> np.ndarray:
        frames, tc = video.shape[1], self.config.temporal_compression
        stops = [frames] if chunk is None else [*range(1 + tc * (chunk - 1), frames, tc * chunk), frames]
        cache: FrameCache = {}
        means, start = [], 0
        for stop in stops:
            moments = self.encoder(video[:, start:stop], cache, first=start == 0)
            mean = moments[..., : self.config.latent_channels].astype(mx.float32)
            mx.eval(mean, list(cache.values()))
            means.append(np.array(mean))
            start = stop
        return np.concatenate(means, axis=1)

    def encode(self, video: mx.array, tiling: VAETiling | None = VAETiling()) -> mx.array:
        """(B, 1 + 4k, H, W, 3) in [-1, 1] -> latent mean * scaling_factor, (B, 1 + k, H/16, W/16, 32) float32."""
        cfg = self.config
        if video.ndim != 5 or video.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected video (B, frames, H, W, {cfg.in_channels}), got {tuple(video.shape)}")
        _, frames, height, width, _ = video.shape
        if (frames - 1) % cfg.temporal_compression:
            raise ValueError(f"the frame count must be 1 + {cfg.temporal_compression}k, got {frames}")
        s = cfg.spatial_compression
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        chunk = tiling.chunk_frames if tiling else None
        video = video.astype(self.dtype)
        size, stride, blend = tiling.pixel_layout(s) if tiling else (0, 0, 0)
        if tiling and tiling.spatial and (height > size or width > size):
            mean = tiled(video, lambda v: self._encode_window(v, chunk), size, stride, blend, 1 / s)
        else:
            mean = self._encode_window(video, chunk)
        return mx.array(mean) * cfg.scaling_factor

    # -- decoding --

    def _decode_window(self, z: mx.array, chunk: int | None) -> np.ndarray:
        frames = z.shape[1]
        step = frames if chunk is None else chunk
        cache: FrameCache = {}
        pieces = []
        for start in range(0, frames, step):
            video = self.decoder(z[:, start : start + step], cache, first=start == 0).astype(mx.float32)
            mx.eval(video, list(cache.values()))
            pieces.append(np.array(video))
        return np.concatenate(pieces, axis=1)

    def decode(self, latents: mx.array, tiling: VAETiling | None = VAETiling()) -> mx.array:
        """Latents (B, 1 + k, h, w, 32) as the transformer sees them -> video (B, 1 + 4k, 16h, 16w, 3) float32.

        `tiling=None`: the whole clip in one pass (memory grows with frames x pixels)."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"expected latents (B, T, h, w, {cfg.latent_channels}), got {tuple(latents.shape)}")
        _, _, height, width, _ = latents.shape
        z = (latents.astype(mx.float32) / cfg.scaling_factor).astype(self.dtype)
        chunk = tiling.chunk_frames if tiling else None
        s = cfg.spatial_compression
        size, stride, blend = tiling.latent_layout(s) if tiling else (0, 0, 0)
        if tiling and tiling.spatial and (height > size or width > size):
            video = tiled(z, lambda t: self._decode_window(t, chunk), size, stride, blend, s)
        else:
            video = self._decode_window(z, chunk)
        return mx.array(video)


# --- memory: the preflight's estimate of a decode ----------------------------------------------------------

# MLX's conv3d unfolds the 3x3x3 neighbourhood of every output position before its matrix product (measured on
# the CPU backend: one conv's peak is ~27 float32 values per input value, for float16 inputs too); counted in
# float32 whatever the activation dtype, an upper bound where Metal keeps float16. The scheduler runs ahead of
# the computation, so the temporaries of several convolutions are allocated at once: measured on the CPU backend
# at the real widths (benchmarks/RESULTS.md, "HunyuanVideo 1.5 VAE decode"), a decode's peak was up to 4.1 times
# the largest convolution's working set; the estimate takes 5.
UNFOLD_VALUES = 27
UNFOLD_BYTES = 4
CONCURRENT_CONVOLUTIONS = 5


def decoder_convs(cfg: Hunyuan15VAEConfig, h: int, w: int, frames: int) -> list[tuple[int, int, int, int, int]]:
    """(in channels, out channels, frames, height, width) of each 3x3x3 convolution of the decoder, in order,
    for a chunk of `frames` latent frames of h x w (a later chunk: every frame doubled at a temporal level)."""
    chans = cfg.block_out_channels[::-1]
    convs = [(cfg.latent_channels, chans[0], frames, h, w)] + [(chans[0], chans[0], frames, h, w)] * 4
    c_in = chans[0]
    for i, c in enumerate(chans):
        for j in range(cfg.layers_per_block + 1):
            convs += [(c_in if j == 0 else c, c, frames, h, w), (c, c, frames, h, w)]
        c_in = c
        if i < cfg.spatial_levels:
            up = chans[i + 1] if cfg.upsample_match_channel else c
            convs.append((c, up * (8 if cfg.temporal_up(i) else 4), frames, h, w))
            h, w, frames, c_in = 2 * h, 2 * w, frames * (2 if cfg.temporal_up(i) else 1), up
    return convs + [(chans[-1], cfg.out_channels, frames, h, w)]


def encoder_convs(cfg: Hunyuan15VAEConfig, h: int, w: int, frames: int) -> list[tuple[int, int, int, int, int]]:
    """As `decoder_convs`, for the encoder and a chunk of `frames` video frames of h x w pixels."""
    chans = cfg.block_out_channels
    convs = [(cfg.in_channels, chans[0], frames, h, w)]
    c_in = chans[0]
    for i, c in enumerate(chans):
        for j in range(cfg.layers_per_block):
            convs += [(c_in if j == 0 else c, c, frames, h, w), (c, c, frames, h, w)]
        c_in = c
        if i < cfg.spatial_levels:
            down = chans[i + 1] if cfg.downsample_match_channel else c
            convs.append((c, down // (8 if cfg.temporal_down(i) else 4), frames, h, w))
            h, w, frames, c_in = h // 2, w // 2, frames // (2 if cfg.temporal_down(i) else 1), down
    return convs + [(chans[-1], chans[-1], frames, h, w)] * 4 + [(chans[-1], 2 * cfg.latent_channels, frames, h, w)]


def convolution_peak_bytes(convs: list[tuple[int, int, int, int, int]], dtype_bytes: int) -> int:
    """The largest convolution's working set (its unfolded input, padded input, output and a residual beside it),
    times the convolutions whose temporaries coexist (`CONCURRENT_CONVOLUTIONS`)."""
    return CONCURRENT_CONVOLUTIONS * max(
        UNFOLD_VALUES * ci * f * y * x * UNFOLD_BYTES
        + (ci * (f + 2) * (y + 2) * (x + 2) + co * f * y * x + max(ci, co) * f * y * x) * dtype_bytes
        for ci, co, f, y, x in convs
    )


def _window(tiling: VAETiling | None, s: int, lat_t: int, lat_h: int, lat_w: int) -> tuple[int, int, int, int]:
    """(latent window height, width, chunk of latent frames, columns of tiles; 0 when untiled)."""
    chunk = lat_t if tiling is None or tiling.chunk_frames is None else min(tiling.chunk_frames, lat_t)
    if tiling and tiling.spatial:
        tile, stride, _ = tiling.latent_layout(s)
        if lat_h > tile or lat_w > tile:
            return min(tile, lat_h), min(tile, lat_w), chunk, len(range(0, lat_w, stride))
    return lat_h, lat_w, chunk, 0


def decode_memory_bytes(width: int, height: int, frames: int, config: Hunyuan15VAEConfig = HUNYUAN15_VAE,
                        tiling: VAETiling | None = VAETiling(), dtype_bytes: int = 4,
                        score_budget: int | None = None) -> dict[str, int]:
    """Bytes a decode of `frames` video frames of width x height holds at its peak, weights excluded, by part:
    `convolution` (the largest convolution of one chunk of one window: its unfolded input, padded input, output
    and the residual beside it, for the convolutions alive at once), `caches` (every causal convolution's 2 frames and the mid-block attention's
    keys and values, for the whole clip), `attention` (one block of scores), `video` (the stitched float32
    video and its copy as an mx.array, two rows of decoded tiles). `dtype_bytes`: the activations' width."""
    cfg = config
    s, tc = cfg.spatial_compression, cfg.temporal_compression
    lat_t = (frames - 1) // tc + 1
    h, w, chunk, cols = _window(tiling, s, lat_t, height // s, width // s)
    convs = decoder_convs(cfg, h, w, chunk)
    mid = cfg.block_out_channels[-1]
    caches = sum(ci * 2 * y * x for ci, _, _, y, x in convs) * dtype_bytes + 2 * lat_t * h * w * mid * dtype_bytes
    video = 2 * frames * height * width * 3 * 4 + 2 * cols * frames * (h * s) * (w * s) * 3 * 4
    parts = {"convolution": convolution_peak_bytes(convs, dtype_bytes), "caches": caches,
             "attention": blocked_score_bytes(1, 1, chunk * h * w, lat_t * h * w, score_budget), "video": video}
    return {**parts, "total": sum(parts.values())}


def encode_memory_bytes(width: int, height: int, frames: int, config: Hunyuan15VAEConfig = HUNYUAN15_VAE,
                        tiling: VAETiling | None = VAETiling(), dtype_bytes: int = 4,
                        score_budget: int | None = None) -> dict[str, int]:
    """As `decode_memory_bytes`, for encoding `frames` frames of width x height (the input video excluded);
    `latents`: the stitched float32 means and their copy."""
    cfg = config
    s, tc = cfg.spatial_compression, cfg.temporal_compression
    lat_t = (frames - 1) // tc + 1
    h, w, chunk, _ = _window(tiling, s, lat_t, height // s, width // s)
    convs = encoder_convs(cfg, h * s, w * s, 1 + tc * (chunk - 1) if chunk == lat_t else tc * chunk)
    mid = cfg.block_out_channels[-1]
    caches = sum(ci * 2 * y * x for ci, _, _, y, x in convs) * dtype_bytes + 2 * lat_t * h * w * mid * dtype_bytes
    parts = {"convolution": convolution_peak_bytes(convs, dtype_bytes), "caches": caches,
             "attention": blocked_score_bytes(1, 1, chunk * h * w, lat_t * h * w, score_budget),
             "latents": 2 * lat_t * (height // s) * (width // s) * cfg.latent_channels * 4}
    return {**parts, "total": sum(parts.values())}
