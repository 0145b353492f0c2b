"""HunyuanVideo causal video VAE ("884-16c-hy"), channels-last, matching diffusers' `AutoencoderKLHunyuanVideo`.

Video is (B, frames, H, W, 3) in [-1, 1] with frames = 1 + 4k; latents are (B, 1 + k, H/8, W/8, 16).
Every 3D convolution is causal in time: the input is padded in front with k-1 copies of its first frame, and
in space with k//2 copies of the edge pixels (replicate padding). The mid block of each side has a
single-head attention over all the tokens of a clip with a frame-causal mask (frame i sees frames <= i).
The encoder's downsampling levels use strided causal convolutions; the decoder's upsampling levels repeat
pixels (nearest) and, except for the first frame, frames, so 1 + k latent frames give 1 + 4k video frames.

`encode` returns the latent mean times `scaling_factor` (0.476986), what the transformer sees; `decode` takes
such latents, divides by `scaling_factor` and returns the video, not clamped (as diffusers' `vae.decode`).

Tiling (`VAETiling`, on by default) reproduces diffusers' framewise decoding plus `enable_tiling()`:
clips of `frames // 4 + 1` latent frames every `frame_stride // 4`, each cut into spatial tiles of
`sample_size // 8` latent pixels every `sample_stride // 8`, decoded independently and blended with linear
ramps over the overlaps (the first frame of every clip after the first is dropped). Each decoder call then sees
at most 5 x 32 x 32 latents (17 x 256 x 256 output pixels) with the defaults, whatever the video size: the
working set is that of one tile (activations of the 128-channel top level, about 17*256*256*128 values per
tensor, and a 5120 x 5120 mid-block attention matrix), plus the blended output video itself.
Tiled and untiled decoding are not the same computation (a tile sees only its window); where one tile covers
the whole input they agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.families.hunyuan.config import HunyuanVAEConfig
from mlx_video.nn.attention import attention


@dataclass(frozen=True)
class VAETiling:
    """diffusers' tiling numbers, in video pixels / frames (latent numbers are these over 8 and 4)."""

    temporal: bool = True
    spatial: bool = True
    sample_size: int = 256
    sample_stride: int = 192
    frames: int = 16
    frame_stride: int = 12


class CausalConv3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=(1, 1, 1)):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    def __call__(self, x: mx.array) -> mx.array:
        k = self.kernel_size
        if k > 1:
            x = mx.pad(x, [(0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)], mode="edge")
        return self.conv(x)


def _group_norm(channels: int, config: HunyuanVAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_num_groups, channels, eps=config.eps, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: HunyuanVAEConfig):
        super().__init__()
        self.norm1 = _group_norm(in_channels, config)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels, config)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = CausalConv3d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class FrameCausalAttention(nn.Module):
    """Single-head self-attention (head dim = channels) with GroupNorm and a residual; frame i sees frames <= i."""

    def __init__(self, channels: int, config: HunyuanVAEConfig):
        super().__init__()
        self.group_norm = _group_norm(channels, config)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, frames, height, width, channels = x.shape
        tokens = x.reshape(batch, -1, channels)
        h = self.group_norm(tokens)
        q, k, v = (proj(h)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        frame = mx.repeat(mx.arange(frames), height * width)
        mask = frame[None, :] <= frame[:, None]  # (query, key)
        out = self.to_out[0](attention(q, k, v, mask=mask))
        return (tokens + out).reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: HunyuanVAEConfig):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, config), ResnetBlock(channels, channels, config)]
        self.attentions = [FrameCausalAttention(channels, config)] if config.mid_block_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if self.attentions:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=(2 if temporal else 1, 2, 2))

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x in space (and 2x in time for all frames but the first), then a causal conv."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.repeat(mx.repeat(x, 2, axis=2), 2, axis=3)
        if self.temporal and x.shape[1] > 1:
            x = mx.concatenate([x[:, :1], mx.repeat(x[:, 1:], 2, axis=1)], axis=1)
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, spatial: bool, temporal: bool, config: HunyuanVAEConfig):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(config.layers_per_block)
        ]
        if spatial or temporal:
            if not spatial:
                raise ValueError("a temporal-only downsampling level is not supported")
            self.downsamplers = [Downsample(out_channels, temporal)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, spatial: bool, temporal: bool, config: HunyuanVAEConfig):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(config.layers_per_block + 1)
        ]
        if spatial or temporal:
            if not spatial:
                raise ValueError("a temporal-only upsampling level is not supported")
            self.upsamplers = [Upsample(out_channels, temporal)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: HunyuanVAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down_blocks = [
            DownBlock(channels[max(i - 1, 0)], c, config.spatial_down(i), config.temporal_down(i), config)
            for i, c in enumerate(channels)
        ]
        self.mid_block = MidBlock(channels[-1], config)
        self.conv_norm_out = _group_norm(channels[-1], config)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: HunyuanVAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        self.conv_in = CausalConv3d(config.latent_channels, channels[0])
        self.mid_block = MidBlock(channels[0], config)
        self.up_blocks = [
            UpBlock(channels[max(i - 1, 0)], c, config.spatial_down(i), config.temporal_down(i), config)
            for i, c in enumerate(channels)
        ]
        self.conv_norm_out = _group_norm(channels[-1], config)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


# --- blending of overlapping tiles (in place on numpy arrays, as diffusers does on tensors) ---------------


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """Overwrite the first `extent` entries of b along `axis` with a linear ramp from a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = (np.arange(extent) / extent).astype(np.float32)
    shape = [1] * b.ndim
    shape[axis] = extent
    w = w.reshape(shape)
    head = [slice(None)] * b.ndim
    tail = [slice(None)] * b.ndim
    head[axis] = slice(0, extent)
    tail[axis] = slice(a.shape[axis] - extent, a.shape[axis])
    b[tuple(head)] = a[tuple(tail)] * (np.float32(1) - w) + b[tuple(head)] * w
    return b


def _stitch_spatial(rows: list[list[np.ndarray]], blend: int, stride: int, height: int, width: int) -> np.ndarray:
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, axis=3)
            pieces.append(tile[:, :, :stride, :stride])
        out_rows.append(np.concatenate(pieces, axis=3))
    return np.concatenate(out_rows, axis=2)[:, :, :height, :width]


def _stitch_temporal(clips: list[np.ndarray], blend: int, stride: int, frames: int) -> np.ndarray:
    out = []
    for i, clip in enumerate(clips):
        if i > 0:
            clip = _blend(clips[i - 1], clip, blend, axis=1)
            out.append(clip[:, :stride])
        else:
            out.append(clip[:, : stride + 1])
    return np.concatenate(out, axis=1)[:, :frames]


class HunyuanVAE(nn.Module):
    def __init__(self, config: HunyuanVAEConfig, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype  # the activations' dtype; the weights keep whatever dtype they are loaded in
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)

    # -- encoding --

    def _encode_plain(self, video: mx.array) -> np.ndarray:
        moments = self.quant_conv(self.encoder(video))
        return np.array(moments[..., : self.config.latent_channels].astype(mx.float32))

    def _encode_spatial(self, video: mx.array, tiling: VAETiling) -> np.ndarray:
        s = self.config.spatial_compression
        _, _, height, width, _ = video.shape
        size, stride = tiling.sample_size, tiling.sample_stride
        rows = [
            [self._encode_plain(video[:, :, i : i + size, j : j + size]) for j in range(0, width, stride)]
            for i in range(0, height, stride)
        ]
        return _stitch_spatial(rows, (size - stride) // s, stride // s, height // s, width // s)

    def _encode_tile(self, video: mx.array, tiling: VAETiling | None) -> np.ndarray:
        _, _, height, width, _ = video.shape
        if tiling and tiling.spatial and (height > tiling.sample_size or width > tiling.sample_size):
            return self._encode_spatial(video, tiling)
        return self._encode_plain(video)

    def encode(self, video: mx.array, tiling: VAETiling | None = VAETiling()) -> mx.array:
        """(B, 1 + 4k, H, W, 3) in [-1, 1] -> latent mean * scaling_factor, (B, 1 + k, H/8, W/8, 16) float32."""
        cfg = self.config
        if video.ndim != 5 or video.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected video (B, F, H, W, {cfg.in_channels}), got {tuple(video.shape)}")
        _, frames, height, width, _ = video.shape
        if (frames - 1) % cfg.temporal_compression:
            raise ValueError(f"the frame count must be 1 + {cfg.temporal_compression}k, got {frames}")
        if height % cfg.spatial_compression or width % cfg.spatial_compression:
            raise ValueError(f"height and width must be multiples of {cfg.spatial_compression}")
        video = video.astype(self.dtype)
        if tiling and tiling.temporal and frames > tiling.frames:
            tc = cfg.temporal_compression
            clips = []
            for i in range(0, frames, tiling.frame_stride):
                clip = self._encode_tile(video[:, i : i + tiling.frames + 1], tiling)
                clips.append(clip if i == 0 else clip[:, 1:])
            latent_frames = (frames - 1) // tc + 1
            mean = _stitch_temporal(
                clips, (tiling.frames - tiling.frame_stride) // tc, tiling.frame_stride // tc, latent_frames
            )
        else:
            mean = self._encode_tile(video, tiling)
        return mx.array(mean) * cfg.scaling_factor

    # -- decoding --

    def _decode_plain(self, z: mx.array) -> np.ndarray:
        return np.array(self.decoder(self.post_quant_conv(z)).astype(mx.float32))

    def _decode_spatial(self, z: mx.array, tiling: VAETiling) -> np.ndarray:
        s = self.config.spatial_compression
        _, _, height, width, _ = z.shape
        size, stride = tiling.sample_size // s, tiling.sample_stride // s
        rows = [
            [self._decode_plain(z[:, :, i : i + size, j : j + size]) for j in range(0, width, stride)]
            for i in range(0, height, stride)
        ]
        blend = tiling.sample_size - tiling.sample_stride
        return _stitch_spatial(rows, blend, tiling.sample_stride, height * s, width * s)

    def _decode_tile(self, z: mx.array, tiling: VAETiling | None) -> np.ndarray:
        s = self.config.spatial_compression
        _, _, height, width, _ = z.shape
        if tiling and tiling.spatial and (height > tiling.sample_size // s or width > tiling.sample_size // s):
            return self._decode_spatial(z, tiling)
        return self._decode_plain(z)

    def decode(self, latents: mx.array, tiling: VAETiling | None = VAETiling()) -> mx.array:
        """Latents (B, 1 + k, h, w, 16) as the transformer sees them -> video (B, 1 + 4k, 8h, 8w, 3) float32.

        `tiling=None` decodes the whole clip at once (memory grows with frames x pixels)."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"expected latents (B, T, h, w, {cfg.latent_channels}), got {tuple(latents.shape)}")
        frames = latents.shape[1]
        z = (latents.astype(mx.float32) / cfg.scaling_factor).astype(self.dtype)
        tc = cfg.temporal_compression
        if tiling and tiling.temporal and frames > tiling.frames // tc:
            step, length = tiling.frame_stride // tc, tiling.frames // tc + 1
            clips = []
            for i in range(0, frames, step):
                clip = self._decode_tile(z[:, i : i + length], tiling)
                clips.append(clip if i == 0 else clip[:, 1:])
            video = _stitch_temporal(
                clips, tiling.frames - tiling.frame_stride, tiling.frame_stride, (frames - 1) * tc + 1
            )
        else:
            video = self._decode_tile(z, tiling)
        return mx.array(video)
