"""Wan 2.1 and Wan 2.2 video VAEs (encoder and decoder), channels-last, matching diffusers' `AutoencoderKLWan`.

Video is (B, frames, H, W, 3) in [-1, 1]; latents are (B, latent frames, h, w, z_dim). Every 3D convolution is
causal in time: frame t sees frames <= t, with zeros before the first one. Both directions run in chunks, as
the reference does: the encoder sees the first frame alone and then 4 frames at a time, the decoder one latent
frame at a time. Each causal convolution keeps the last input frames of the previous chunk, so memory is that
of one chunk whatever the length of the video.

Wan 2.1: z_dim 16, 8x8 spatial and 4x temporal compression.
Wan 2.2: z_dim 48, a 2x2 patchify around an 8x8 network (16x16 in all), parameter-free residual shortcuts
around each down/up level, and a wider decoder (base 256 against 160 for the encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from mlx_video.json_config import JsonConfig
from mlx_video.nn.attention import attention

# Per-channel statistics of the latent space, published with the weights (Wan2.1 `Wan2_1_VAE`, Wan2.2
# `Wan2_2_VAE`, mirrored in diffusers' configs). Latents seen by the transformer are (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

# diffusers' config.json field -> ours, where the names differ.
_DIFFUSERS_FIELD_NAMES = {"temperal_downsample": "temporal_downsample"}


@dataclass(frozen=True)
class WanVAEConfig(JsonConfig):
    """`in_channels` / `out_channels` count the channels the network sees, i.e. after patchify (3 * p * p)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: same as base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    patch_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.dim_mult)
        if len(self.temporal_downsample) != levels - 1:
            raise ValueError(f"temporal_downsample needs {levels - 1} entries (one per downsampling level)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries")
        if self.scale_factor_temporal != 2 ** sum(self.temporal_downsample):
            raise ValueError(f"scale_factor_temporal={self.scale_factor_temporal} disagrees with temporal_downsample")
        if self.scale_factor_spatial != 2 ** (levels - 1) * self.patch:
            raise ValueError(f"scale_factor_spatial={self.scale_factor_spatial} disagrees with dim_mult and patch_size")
        if self.in_channels % self.patch**2 or self.out_channels % self.patch**2:
            raise ValueError(f"in/out channels must be multiples of patch_size**2={self.patch**2}")

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def video_channels(self) -> int:
        return self.in_channels // self.patch**2

    @classmethod
    def from_diffusers(cls, config_json: dict) -> "WanVAEConfig":
        """Our config from an `AutoencoderKLWan` config.json (missing fields take diffusers' defaults)."""
        name = config_json.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"expected an AutoencoderKLWan config, got {name!r}")
        if config_json.get("attn_scales"):
            raise ValueError("attn_scales other than [] (attention outside the mid block) is not supported")
        known = set(cls.__dataclass_fields__)
        fields = {}
        for key, value in config_json.items():
            key = _DIFFUSERS_FIELD_NAMES.get(key, key)
            if key in known and value is not None:
                fields[key] = value
        # The scale factors follow from the architecture; diffusers lets them be null.
        levels = len(fields.get("dim_mult", cls.dim_mult))
        fields.setdefault("scale_factor_temporal", 2 ** sum(fields.get("temporal_downsample", cls.temporal_downsample)))
        fields.setdefault("scale_factor_spatial", 2 ** (levels - 1) * (fields.get("patch_size") or 1))
        return cls(**fields)


WAN21_VAE = WanVAEConfig()
WAN22_VAE = WanVAEConfig(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    latents_mean=WAN22_LATENTS_MEAN,
    latents_std=WAN22_LATENTS_STD,
    scale_factor_spatial=16,
)

# A chunk's state: for each causal layer (keyed by id), the input frames it keeps from earlier chunks.
FrameCache = dict


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _keep(frames: mx.array) -> mx.array:
    # A copy, so that the cache does not hold the whole chunk's activation alive through a view.
    return mx.contiguous(frames)


class CausalConv3d(nn.Module):
    """Conv3d padded symmetrically in space and only on the front in time (by 2 * padding_t frames).

    With a cache, the frames kept from the previous chunk take the place of (part of) that zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        pt, ph, pw = _triple(padding)
        scale = 1 / math.sqrt(in_channels * kt * kh * kw)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kt, kh, kw, in_channels))
        self.bias = mx.random.uniform(-scale, scale, (out_channels,))
        self._stride = _triple(stride)
        self._spatial_padding = (ph, pw)
        self._context = 2 * pt
        self._pointwise = (kt, kh, kw) == (1, 1, 1) and self._stride == (1, 1, 1)

    def __call__(self, x: mx.array, cache: FrameCache | None = None) -> mx.array:
        if self._context:
            past = cache.get(id(self)) if cache is not None else None
            if past is not None:
                x = mx.concatenate([past, x], axis=1)
            if cache is not None:
                cache[id(self)] = _keep(x[:, -self._context :])
            missing = self._context - (0 if past is None else past.shape[1])
            if missing > 0:
                x = mx.pad(x, [(0, 0), (missing, 0), (0, 0), (0, 0), (0, 0)])
        if self._pointwise:
            return x @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        ph, pw = self._spatial_padding
        return mx.conv3d(x, self.weight, stride=self._stride, padding=(0, ph, pw)) + self.bias


class RMSNorm(nn.Module):
    """Wan's RMS_norm: x / ||x|| over channels, times sqrt(C) and a learned gain; no bias."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        # The reference divides by max(||x||, 1e-12); a vanishing epsilon gives the same, 0 for a zero vector.
        return mx.fast.rms_norm(x, self.weight, 1e-24)


def _per_frame(layer, x: mx.array) -> mx.array:
    """Apply a 2D layer to every frame of (B, T, H, W, C)."""
    b, t = x.shape[:2]
    y = layer(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        skip = x if self.shortcut is None else self.shortcut(x)
        x = self.conv1(nn.silu(self.norm1(x)), cache)
        x = self.conv2(nn.silu(self.norm2(x)), cache)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (1x1 convs written as linear layers)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h * w, 1, c))
        q, k, v = mx.split(qkv, 3, axis=-1)
        y = self.proj(attention(q, k, v))
        return x + y.reshape(b, t, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attn = AttentionBlock(dim)

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attn(x), cache)


class Downsample(nn.Module):
    """Halves H and W (pad right and bottom by one, stride-2 3x3 conv); with `temporal`, halves time too.

    Time: the first chunk (the first frame) passes unchanged; later chunks are prefixed with the last frame
    of the previous chunk and go through a stride-2 (3, 1, 1) conv, so 4 frames become 2 and 2 become 1.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        x = _per_frame(self.conv, mx.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1), (0, 0)]))
        if not self.temporal:
            return x
        past = cache.get(id(self))
        cache[id(self)] = _keep(x[:, -1:])
        if first_chunk:
            return x
        return self.time_conv(mx.concatenate([past, x], axis=1))


class Upsample(nn.Module):
    """Doubles H and W (nearest, then a 3x3 conv to `out_dim`); with `temporal`, doubles time first.

    Time: a causal (3, 1, 1) conv gives 2C channels whose halves become two consecutive frames. It is skipped
    on the first chunk, so the first latent frame decodes to a single frame.
    """

    def __init__(self, dim: int, out_dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        b, t, h, w, c = x.shape
        if self.temporal and not first_chunk:
            x = self.time_conv(x, cache).reshape(b, t, h, w, 2, c)
            t *= 2
            x = x.transpose(0, 1, 4, 2, 3, 5).reshape(b, t, h, w, c)
        x = mx.broadcast_to(x.reshape(b * t, h, 1, w, 1, c), (b * t, h, 2, w, 2, c))
        x = self.conv(x.reshape(b * t, 2 * h, 2 * w, c))
        return x.reshape(b, t, *x.shape[1:])


def average_down(x: mx.array, out_dim: int, factor_t: int, factor_s: int) -> mx.array:
    """Wan 2.2's parameter-free down shortcut (AvgDown3D): fold each factor_t x factor_s x factor_s block into
    channels, ordered (c, t, h, w), then average consecutive groups down to `out_dim` channels.

    Time is zero-padded on the front to a multiple of factor_t (the first chunk: one frame becomes one).
    """
    b, t, h, w, c = x.shape
    pad_t = -t % factor_t
    if pad_t:
        x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
    t, h, w = (t + pad_t) // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, t, factor_t, h, factor_s, w, factor_s, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t, h, w, out_dim, -1).mean(axis=-1)


def duplicate_up(x: mx.array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> mx.array:
    """Wan 2.2's parameter-free up shortcut (DupUp3D): repeat every channel, then move channel groups
    (out, t, h, w) into space and time. The first chunk drops its first factor_t - 1 frames, like the main path.
    """
    b, t, h, w, c = x.shape
    x = mx.repeat(x, out_dim * factor_t * factor_s * factor_s // c, axis=-1)
    x = x.reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1 :] if first_chunk else x


class ResidualDownLevel(nn.Module):
    """Wan 2.2 encoder level: residual blocks, then a Downsample, plus an average_down shortcut around both."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, downsample: bool, temporal: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_blocks)]
        self.downsample = Downsample(out_dim, temporal) if downsample else None
        self.out_dim = out_dim
        self.factor_t = 2 if temporal else 1
        self.factor_s = 2 if downsample else 1
        if (in_dim * self.factor_t * self.factor_s**2) % out_dim:
            raise ValueError(f"average_down cannot regroup {in_dim} channels into {out_dim}")

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        skip = average_down(x, self.out_dim, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsample is not None:
            x = self.downsample(x, cache, first_chunk)
        return x + skip


class UpLevel(nn.Module):
    """Decoder level: residual blocks, then an optional Upsample; Wan 2.2 adds a duplicate_up shortcut."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_blocks: int,
        upsample: bool,
        temporal: bool,
        upsample_dim: int,
        shortcut: bool,
    ):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_blocks)]
        self.upsample = Upsample(out_dim, upsample_dim, temporal) if upsample else None
        self.dup_shortcut = shortcut
        self.out_dim = out_dim
        self.factor_t = 2 if temporal else 1
        if shortcut and (out_dim * self.factor_t * 4) % in_dim:
            raise ValueError(f"duplicate_up cannot regroup {in_dim} channels into {out_dim}")

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool = False) -> mx.array:
        skip = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsample is not None:
            x = self.upsample(x, cache, first_chunk)
        if self.dup_shortcut:
            x = x + duplicate_up(skip, self.out_dim, self.factor_t, 2, first_chunk)
        return x


class Encoder(nn.Module):
    """Video (patchified) -> 2 * z_dim channels (mean | log-variance), one chunk at a time."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        levels = len(config.dim_mult)
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        # Wan 2.1 keeps a flat list of residual blocks and Downsamples; Wan 2.2 groups them by level.
        self.down = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            downsample = i != levels - 1
            temporal = downsample and config.temporal_downsample[i]
            if config.is_residual:
                self.down.append(ResidualDownLevel(in_dim, out_dim, config.num_res_blocks, downsample, temporal))
                continue
            for j in range(config.num_res_blocks):
                self.down.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if downsample:
                self.down.append(Downsample(out_dim, temporal))
        self.mid = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool) -> mx.array:
        x = self.conv_in(x, cache)
        for layer in self.down:
            x = layer(x, cache, first_chunk)
        x = self.mid(x, cache)
        return self.conv_out(nn.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    """z_dim channels -> video (patchified), one latent frame at a time."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dim_mult = config.dim_mult
        dims = [config.decoder_dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        levels = len(dim_mult)
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid = MidBlock(dims[0])
        self.up = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            upsample = i != levels - 1
            temporal = upsample and temporal_upsample[i]
            if config.is_residual:
                upsample_dim = out_dim
            else:
                # Wan 2.1's Upsample conv halves the channels, so every level after the first starts at half.
                upsample_dim = out_dim // 2
                in_dim = in_dim // 2 if i > 0 else in_dim
            self.up.append(
                UpLevel(
                    in_dim,
                    out_dim,
                    config.num_res_blocks + 1,
                    upsample,
                    temporal,
                    upsample_dim,
                    shortcut=config.is_residual and upsample,
                )
            )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array, cache: FrameCache, first_chunk: bool) -> mx.array:
        x = self.conv_in(x, cache)
        x = self.mid(x, cache)
        for level in self.up:
            x = level(x, cache, first_chunk)
        return self.conv_out(nn.silu(self.norm_out(x)), cache)


def patchify(video: mx.array, p: int) -> mx.array:
    """(B, F, H, W, C) -> (B, F, H/p, W/p, C*p*p), channels ordered (c, w-subpixel, h-subpixel) as Wan 2.2."""
    if p == 1:
        return video
    b, f, h, w, c = video.shape
    x = video.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x: mx.array, p: int) -> mx.array:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, f, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, f, h, w, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, f, h * p, w * p, c)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _blend_ramp(length: int, before: int, after: int) -> mx.array:
    """1D tile weight: rises linearly over the `before` samples shared with the previous tile and falls over
    the `after` samples shared with the next one, so that two neighbours' weights sum to 1 where they meet."""
    i = mx.arange(length, dtype=mx.float32) + 0.5
    weight = mx.ones((length,))
    if before:
        weight = mx.minimum(weight, i / before)
    if after:
        weight = mx.minimum(weight, (length - i) / after)
    return weight


def _tile_layout(size: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, mx.array]]:
    """(latent start, latent stop, pixel weight) of each tile along one axis."""
    starts = _tile_starts(size, tile, overlap)
    spans = [(s, min(s + tile, size)) for s in starts]
    layout = []
    for k, (start, stop) in enumerate(spans):
        before = spans[k - 1][1] - start if k > 0 else 0
        after = stop - spans[k + 1][0] if k + 1 < len(spans) else 0
        layout.append((start, stop, _blend_ramp((stop - start) * scale, before * scale, after * scale)))
    return layout


class WanVAE(nn.Module):
    """The Wan 2.1 / 2.2 VAE. Build with `WanVAE(WAN21_VAE)` or `WanVAE(WAN22_VAE)`, then load converted weights.

    Parameters are named encoder.{conv_in, down.N..., mid.{resnets.M, attn}, norm_out, conv_out}, quant_conv,
    post_quant_conv and decoder.{conv_in, mid, up.N.{resnets.M, upsample}, norm_out, conv_out}.
    """

    def __init__(self, config: WanVAEConfig = WAN21_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def _latent_stats(self) -> tuple[mx.array, mx.array]:
        return mx.array(self.config.latents_mean), mx.array(self.config.latents_std)

    def encode(self, video: mx.array) -> mx.array:
        """(B, 1 + 4k, H, W, 3) in [-1, 1] -> normalised latent mean (B, 1 + k, H/s, W/s, z_dim), float32.

        s is `scale_factor_spatial`; the result is (mu - latents_mean) / latents_std, what the transformer sees.
        """
        cfg = self.config
        if video.ndim != 5 or video.shape[-1] != cfg.video_channels:
            raise ValueError(f"expected video (B, F, H, W, {cfg.video_channels}), got {tuple(video.shape)}")
        _, frames, height, width, _ = video.shape
        step = cfg.scale_factor_temporal
        if (frames - 1) % step:
            raise ValueError(f"the frame count must be 1 + {step}k, got {frames}")
        if height % cfg.scale_factor_spatial or width % cfg.scale_factor_spatial:
            raise ValueError(f"height and width must be multiples of {cfg.scale_factor_spatial}, got {height}x{width}")

        x = patchify(video.astype(self.encoder.conv_in.weight.dtype), cfg.patch)
        mean, std = self._latent_stats()
        cache: FrameCache = {}
        latents = []
        for start in [0, *range(1, frames, step)]:
            stop = 1 if start == 0 else start + step
            moments = self.quant_conv(self.encoder(x[:, start:stop], cache, first_chunk=start == 0))
            mu = moments[..., : cfg.z_dim].astype(mx.float32)
            latents.append((mu - mean) / std)
            mx.eval(latents[-1], list(cache.values()))
        return mx.concatenate(latents, axis=1)

    def _decode_chunk(self, z: mx.array, cache: FrameCache, first_chunk: bool) -> mx.array:
        """One latent frame (raw, not normalised) -> its video frames, unclamped."""
        x = self.decoder(self.post_quant_conv(z), cache, first_chunk)
        return unpatchify(x, self.config.patch)

    def decode_chunks(
        self, latents: mx.array, tile: tuple[int, int, int] | None = None
    ) -> Iterator[mx.array]:
        """Yield the video of `decode` piece by piece, evaluated: 1 frame for the first latent frame, then 4 for
        each next one. Memory stays that of one chunk (of one tile, when tiling) whatever the frame count."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.z_dim:
            raise ValueError(f"expected latents (B, T, h, w, {cfg.z_dim}), got {tuple(latents.shape)}")
        _, frames, height, width, _ = latents.shape
        mean, std = self._latent_stats()
        z = (latents.astype(mx.float32) * std + mean).astype(self.post_quant_conv.weight.dtype)

        if tile is None:
            tile = (height, width, 0)
        tile_h, tile_w, overlap = tile
        if min(tile_h, tile_w) < 1 or not 0 <= overlap < min(tile_h, tile_w):
            raise ValueError(f"tile must be (tile_h, tile_w, overlap) with 0 <= overlap < tile sizes, got {tile}")
        s = cfg.scale_factor_spatial
        rows = _tile_layout(height, tile_h, overlap, s)
        cols = _tile_layout(width, tile_w, overlap, s)
        tiles = [(r, c, {}) for r in rows for c in cols]

        if len(tiles) == 1:
            for t in range(frames):
                video = mx.clip(self._decode_chunk(z[:, t : t + 1], tiles[0][2], t == 0), -1.0, 1.0)
                mx.eval(video, list(tiles[0][2].values()))
                yield video
            return

        weight_sum = mx.zeros((height * s, width * s))
        for (h0, h1, wh), (w0, w1, ww), _ in tiles:
            weight_sum[h0 * s : h1 * s, w0 * s : w1 * s] += wh[:, None] * ww[None, :]
        weight_sum = weight_sum[:, :, None]
        for t in range(frames):
            blended = None
            for (h0, h1, wh), (w0, w1, ww), cache in tiles:
                piece = self._decode_chunk(z[:, t : t + 1, h0:h1, w0:w1], cache, t == 0)
                piece = piece.astype(mx.float32) * (wh[:, None] * ww[None, :])[:, :, None]
                if blended is None:
                    blended = mx.zeros((piece.shape[0], piece.shape[1], height * s, width * s, piece.shape[-1]))
                blended[:, :, h0 * s : h1 * s, w0 * s : w1 * s] += piece
                mx.eval(blended, list(cache.values()))
            video = mx.clip(blended / weight_sum, -1.0, 1.0).astype(z.dtype)
            mx.eval(video)
            yield video

    def decode(self, latents: mx.array, tile: tuple[int, int, int] | None = None) -> mx.array:
        """Normalised latents (B, T, h, w, z_dim) -> video (B, 1 + 4(T - 1), h*s, w*s, 3), clamped to [-1, 1].

        `tile=(tile_h, tile_w, overlap)`, in latent pixels, decodes overlapping spatial tiles (each with its own
        causal cache) and blends neighbours with linear ramps across their overlap; memory then scales with the
        tile, not the frame. Agreement with untiled decoding:
          - identical where one tile covers the whole latent;
          - otherwise not the same computation (a tile sees only its latent window, while the decoder's 3x3 convs
            reach several latent pixels and its mid-block attention spans the frame). Each output pixel is a
            convex combination of the tiles covering it, so its error is at most the largest error among them.
            Measured on the tests' tiny random-weight models, tile (4, 4, 2): mean |difference| about a third of
            the output's standard deviation, max about 0.5 (random weights; not measured with trained ones).
        """
        return mx.concatenate(list(self.decode_chunks(latents, tile)), axis=1)
