"""Mochi AsymmVAE (Genmo; diffusers `AutoencoderKLMochi`), channels-last: video (B, T, H, W, 3) in [-1, 1],
latents (B, T', H/8, W/8, 12) with T' = (T - 1) / 6 + 1.

Decoder: 1x1x1 conv to the widest channels, residual blocks (per-frame GroupNorm, SiLU, causal 3x3x3 convs padded
by replicating the first frame and the border pixels), then three upsampling blocks, each residual blocks and a
linear to out * t * s * s channels rearranged into t frames and s x s pixels (depth-to-space-time). The decoder
emits 6 T' frames; the first 5 are dropped. No attention.

Encoder: RGB plus Fourier features (sin, cos of x * 2 pi * 2^k for k = 6, 7), a linear, residual blocks, three
downsampling stages (a causal conv with kernel == stride), each residual block followed by causal attention over
time at each pixel (heads of 32 channels, L2-normalised q and k), then GroupNorm, SiLU and a linear to the mean
and log-variance.

Everything runs in float32 (the decoder has 362M parameters, the encoder 97M).

Decoding in chunks: the decoder is causal in time and every conv keeps the frames it needs from the previous
chunk (`FrameCache`), so `decode(z, chunk_frames=k)` computes exactly what one pass computes. Working set of one
chunk of k latent frames of h x w: the widest activations are those of the output blocks, A = 128 channels x
(6k + 2) frames x 8h x 8w x 4 bytes (the conv inputs carry 2 past frames; the up-projection output, 512 x 6k x 4h
x 4w, is no larger). Measured on MLX's CPU back-end, a residual block at that width peaks at about 16-18 A above its
input (GroupNorm, SiLU, padding and concatenation temporaries) plus one conv tile's unfolded patches, at most
`CausalConv3d.max_unfold_bytes` (256 MiB); without the conv tiling a 3x3x3 conv alone needs about 29 A. So the peak
is about 20 A + 256 MiB + weights (1.45 GB fp32) + the conv caches and the output: for k = 1 at 60 x 106 latents
(480 x 848) A = 1.67 GB, about 34 GB in all; it grows linearly with k and with the frame area.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_video.families.mochi.config import MochiVAEConfig

# For each causal conv (keyed by id), the input frames it keeps from the previous chunk.
FrameCache = dict


class GroupNorm(nn.Module):
    """GroupNorm applied to each frame separately (statistics over the group's channels and the frame's pixels)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups = groups
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        g = x.astype(mx.float32).reshape(b, t, h * w, self.groups, c // self.groups)
        mean = g.mean(axis=(2, 4), keepdims=True)
        var = mx.square(g - mean).mean(axis=(2, 4), keepdims=True)
        g = (g - mean) * mx.rsqrt(var + self.eps)
        return g.reshape(b, t, h, w, c) * self.weight + self.bias


class CausalConv3d(nn.Module):
    """Conv3d with the time axis padded at the front by kt - 1 copies of the first frame and the spatial axes by
    (k - 1) // 2 copies of the border (replicate padding). With a cache, later chunks take their past frames from it.

    MLX lowers a convolution to a matmul over unfolded patches (kt*kh*kw copies of the input), so a stride-1 conv
    whose unfolded input would exceed `max_unfold_bytes` is computed in tiles of frames and row bands (with their
    halos), each evaluated before the next: the same sums, a bounded working set (the conv then runs eagerly).
    """

    max_unfold_bytes = 256 * 2**20

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1):
        super().__init__()
        kt, kh, kw = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 3
        scale = 1 / math.sqrt(in_channels * kt * kh * kw)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kt, kh, kw, in_channels))
        self.bias = mx.random.uniform(-scale, scale, (out_channels,))
        self._stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, 1, 1)
        self._kernel = (kt, kh, kw)
        self._context = kt - 1
        self._spatial = ((kh - 1) // 2, (kw - 1) // 2)

    def __call__(self, x: mx.array, cache: FrameCache | None = None) -> mx.array:
        if self._context:
            past = cache.get(id(self)) if cache is not None else None
            if past is None:
                past = mx.repeat(x[:, :1], self._context, axis=1)
            x = mx.concatenate([past, x], axis=1)
            if cache is not None:
                cache[id(self)] = mx.contiguous(x[:, -self._context :])
        ph, pw = self._spatial
        if ph or pw:
            x = mx.pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)], mode="edge")
        return self._conv(x) + self.bias

    def _conv(self, x: mx.array) -> mx.array:
        kt, kh, kw = self._kernel
        if self._stride != (1, 1, 1) or kt * kh * kw == 1:
            return mx.conv3d(x, self.weight, stride=self._stride)
        b, t, h, w, c = x.shape
        out_t, out_h, out_w = t - kt + 1, h - kh + 1, w - kw + 1
        per_position = b * kt * kh * kw * c * x.itemsize
        rows = max(1, min(out_h, self.max_unfold_bytes // (per_position * out_w)))
        frames = max(1, min(out_t, self.max_unfold_bytes // (per_position * out_w * out_h))) if rows == out_h else 1
        if rows == out_h and frames == out_t:
            return mx.conv3d(x, self.weight)
        pieces = []
        for f in range(0, out_t, frames):
            f_end = min(f + frames, out_t)
            bands = []
            for r in range(0, out_h, rows):
                band = mx.conv3d(x[:, f : f_end + kt - 1, r : min(r + rows, out_h) + kh - 1], self.weight)
                # Evaluated one by one: a pending conv keeps its unfolded patches until its graph is evaluated.
                mx.eval(band)
                bands.append(band)
            pieces.append(mx.concatenate(bands, axis=2) if len(bands) > 1 else bands[0])
        return mx.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(channels, groups)
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.norm2 = GroupNorm(channels, groups)
        self.conv2 = CausalConv3d(channels, channels, 3)

    def __call__(self, x: mx.array, cache: FrameCache | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)), cache)
        h = self.conv2(nn.silu(self.norm2(h)), cache)
        return x + h


class TemporalAttention(nn.Module):
    """Causal self-attention over the frames of each pixel; q and k are L2-normalised per head."""

    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)  # fused q|k|v, as in the official checkpoint
        self.to_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        if t == 1:  # one frame attends only to itself: the output is its value
            return self.to_out(mx.split(self.qkv(x), 3, axis=-1)[2])
        seq = x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
        q, k, v = mx.split(self.qkv(seq), 3, axis=-1)

        def heads(z: mx.array) -> mx.array:
            return z.reshape(b * h * w, t, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        def l2(z: mx.array) -> mx.array:
            return z / mx.maximum(mx.linalg.norm(z, axis=-1, keepdims=True), 1e-5)

        q, k, v = l2(heads(q)), l2(heads(k)), heads(v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(self.head_dim), mask="causal")
        out = self.to_out(out.transpose(0, 2, 1, 3).reshape(b * h * w, t, c))
        return out.reshape(b, h, w, t, c).transpose(0, 3, 1, 2, 4)


class ResStack(nn.Module):
    """Residual blocks, each optionally followed by a GroupNorm + temporal attention residual."""

    def __init__(self, channels: int, num_layers: int, attention: bool, config: MochiVAEConfig):
        super().__init__()
        self.resnets = [ResBlock(channels, config.num_groups) for _ in range(num_layers)]
        if attention:
            self.norms = [GroupNorm(channels, config.num_groups) for _ in range(num_layers)]
            self.attentions = [TemporalAttention(channels, config.attention_head_dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array, cache: FrameCache | None = None) -> mx.array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, cache)
            if "attentions" in self:
                x = x + self.attentions[i](self.norms[i](x))
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, t: int, s: int, config: MochiVAEConfig):
        super().__init__()
        self.t, self.s = t, s
        self.resnets = [ResBlock(in_channels, config.num_groups) for _ in range(num_layers)]
        self.proj = nn.Linear(in_channels, out_channels * t * s * s)

    def __call__(self, x: mx.array, cache: FrameCache | None = None) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        x = self.proj(x)
        b, f, h, w, _ = x.shape
        t, s = self.t, self.s
        # Channels are laid out (c, t, s_h, s_w): frame f expands to frames f*t .. f*t + t - 1.
        x = x.reshape(b, f, h, w, -1, t, s, s).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, f * t, h * s, w * s, -1)


class DownBlock(ResStack):
    """A causal conv with kernel == stride (t, s, s), then the residual stack."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, t: int, s: int, attention: bool, config):
        super().__init__(out_channels, num_layers, attention, config)
        self.conv_in = CausalConv3d(in_channels, out_channels, (t, s, s), stride=(t, s, s))

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(self.conv_in(x))


class MochiDecoder(nn.Module):
    def __init__(self, config: MochiVAEConfig):
        super().__init__()
        ch, n = config.decoder_channels, config.layers_per_block
        levels = len(ch) - 1
        self.conv_in = nn.Linear(config.latent_channels, ch[-1])
        self.block_in = ResStack(ch[-1], n[-1], False, config)
        t, s = config.temporal_expansions, config.spatial_expansions
        self.up_blocks = [
            UpBlock(ch[-i - 1], ch[-i - 2], n[-i - 2], t[-i - 1], s[-i - 1], config) for i in range(levels)
        ]
        self.block_out = ResStack(ch[0], n[0], False, config)
        self.proj_out = nn.Linear(ch[0], config.out_channels)

    def __call__(self, z: mx.array, cache: FrameCache | None = None) -> mx.array:
        x = self.block_in(self.conv_in(z.astype(mx.float32)), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        x = self.block_out(x, cache)
        return self.proj_out(nn.silu(x))


def fourier_features(x: mx.array, start: int, stop: int) -> mx.array:
    """[x, sin(w x), cos(w x)] with w = 2 pi 2^k, k = start .. stop - 1; channel order (input channel, k)."""
    x = x.astype(mx.float32)
    w = mx.array([2.0**k * 2 * math.pi for k in range(start, stop)], dtype=mx.float32)
    h = (x[..., :, None] * w).reshape(*x.shape[:-1], -1)
    return mx.concatenate([x, mx.sin(h), mx.cos(h)], axis=-1)


class MochiEncoder(nn.Module):
    def __init__(self, config: MochiVAEConfig):
        super().__init__()
        self.config = config
        ch, n, attn = config.encoder_channels, config.layers_per_block, config.encoder_attention
        self.proj_in = nn.Linear(config.in_channels, ch[0])
        self.block_in = ResStack(ch[0], n[0], attn[0], config)
        t, s = config.temporal_expansions, config.spatial_expansions
        self.down_blocks = [
            DownBlock(ch[i], ch[i + 1], n[i + 1], t[i], s[i], attn[i + 1], config) for i in range(len(ch) - 1)
        ]
        self.block_out = ResStack(ch[-1], n[-1], attn[-1], config)
        self.norm_out = GroupNorm(ch[-1], config.num_groups)
        self.proj_out = nn.Linear(ch[-1], 2 * config.latent_channels, bias=False)

    def __call__(self, video: mx.array) -> mx.array:
        """(B, T, H, W, 3) in [-1, 1] -> (B, T', H/8, W/8, 2 * latent) mean and log-variance."""
        x = self.proj_in(fourier_features(video, self.config.fourier_start, self.config.fourier_stop))
        x = self.block_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.block_out(x)
        return self.proj_out(nn.silu(self.norm_out(x)))


class MochiVAE(nn.Module):
    def __init__(self, config: MochiVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = MochiEncoder(config)
        self.decoder = MochiDecoder(config)

    def encode(self, video: mx.array) -> mx.array:
        """Posterior mean (B, T', H/8, W/8, latent) of video (B, T, H, W, 3) in [-1, 1]; T = 6n + 1 gives T' = n + 1."""
        _, frames, height, width, _ = video.shape
        s = self.config.spatial_compression
        if height % s or width % s:
            raise ValueError(f"video size {height}x{width} is not a multiple of {s}")
        return mx.split(self.encoder(video), 2, axis=-1)[0]

    def decode(self, z: mx.array, chunk_frames: int | None = None) -> mx.array:
        """Video (B, 6 T' - 5, 8h, 8w, 3), about [-1, 1] (not clamped), from latents z (B, T', h, w, latent).

        `chunk_frames` latent frames are decoded at a time (each evaluated before the next), with the same result.
        """
        frames = z.shape[1]
        if chunk_frames is None or chunk_frames >= frames:
            out = self.decoder(z)
        else:
            if chunk_frames < 1:
                raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
            cache: FrameCache = {}
            pieces = []
            for start in range(0, frames, chunk_frames):
                piece = self.decoder(z[:, start : start + chunk_frames], cache)
                mx.eval(piece, cache)
                pieces.append(piece)
            out = mx.concatenate(pieces, axis=1)
        drop = self.config.temporal_compression - 1
        return out[:, drop:] if out.shape[1] > drop else out

    def normalize_latents(self, z: mx.array) -> mx.array:
        """VAE latents -> the transformer's latents: (z - mean) / std * scaling_factor."""
        mean = mx.array(self.config.latents_mean, dtype=mx.float32)
        std = mx.array(self.config.latents_std, dtype=mx.float32)
        return (z - mean) / std * self.config.scaling_factor

    def denormalize_latents(self, z: mx.array) -> mx.array:
        """The transformer's latents -> VAE latents: z * std / scaling_factor + mean (diffusers MochiPipeline)."""
        mean = mx.array(self.config.latents_mean, dtype=mx.float32)
        std = mx.array(self.config.latents_std, dtype=mx.float32)
        return z * std / self.config.scaling_factor + mean
