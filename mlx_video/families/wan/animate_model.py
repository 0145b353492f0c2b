"""Wan2.2-Animate-14B transformer: the Wan 14B backbone with a CLIP image context, pose latents added to the
video tokens, and a face-motion path (a motion encoder on face crops, a temporal face encoder and per-frame
face cross-attention after every fifth block). Channels-last, computed in float32 (the linear layers in the
parameter dtype, as in `transformer.py`).

Sources (the published model): Wan-Video/Wan2.2 `wan/modules/animate/` (model_animate.py, motion_encoder.py,
face_blocks.py) and diffusers 0.42.1 `models/transformers/transformer_wan_animate.py`, which our parity tests
run as the reference.

- The motion encoder is a StyleGAN-like conv net (equalised learning rate: every weight is scaled by
  1/sqrt(fan_in) when used; a fixed [1, 3, 3, 1] blur before each stride-2 convolution; leaky ReLU 0.2 times
  sqrt(2) with the bias added first) from a face crop to 20 motion coefficients, mapped onto 512 dimensions by
  the orthonormal basis (QR) of a learned 512x20 matrix.
- The face encoder runs causal (replicate-padded) 1-D convolutions over the frames, two of stride 2, so that
  4n + 1 face frames give n + 1 motion frames, each of `face_encoder_num_heads` tokens plus a learned padding
  token; a zero frame is put in front for the reference-image latent frame.
- A face block attends each latent frame's video tokens to that frame's motion tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.image_context import ImageContext, ImageContextBlock, ImageEmbedding
from mlx_video.families.wan.transformer import WanState, WanTransformer
from mlx_video.nn.attention import attention
from mlx_video.nn.norms import layer_norm_fp32

# Channels of the motion encoder's feature maps by resolution, for its 512x512 face crops (Wan2.2
# motion_encoder.py EncoderApp, whose table also has 1024: 16, unused at 512).
MOTION_CHANNELS = ((4, 512), (8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64), (512, 32))
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
LEAKY_SLOPE, LEAKY_GAIN = 0.2, math.sqrt(2.0)


@dataclass(frozen=True)
class WanAnimateConfig(WanTransformerConfig):
    in_channels: int = 36  # noise (16) + mask (4) + reference / previous-segment latents (16)
    image_dim: int = 1280  # CLIP ViT-H/14 width
    pose_channels: int = 16  # pose-video latent channels
    motion_size: int = 512  # face crops are motion_size x motion_size
    motion_style_dim: int = 512
    motion_dim: int = 20
    motion_out_dim: int = 512
    motion_channels: tuple[tuple[int, int], ...] = MOTION_CHANNELS
    motion_batch: int = 8  # face frames per motion-encoder call (memory only; the result does not depend on it)
    face_hidden_dim: int = 1024
    face_heads: int = 4
    face_every: int = 5  # a face block after blocks 0, 5, 10, ...

    def motion_width(self, size: int) -> int:
        table = dict(self.motion_channels)
        if size not in table:
            raise ValueError(f"the motion encoder has no channel count for {size}x{size} maps (have {sorted(table)})")
        return table[size]

    @property
    def face_blocks(self) -> int:
        return self.num_layers // self.face_every


# Published: Wan2.2 wan/configs/wan_animate_14B.py (the Wan 14B backbone, 40 layers of 40 heads x 128).
WAN_ANIMATE_14B = WanAnimateConfig()


def leaky(x: mx.array, bias: mx.array) -> mx.array:
    x = x + bias.astype(mx.float32)
    return mx.where(x >= 0, x, LEAKY_SLOPE * x) * LEAKY_GAIN


def blur(x: mx.array, pad: tuple[int, int]) -> mx.array:
    """The separable [1, 3, 3, 1] / 8 FIR filter over H and W of (N, H, W, C), zero-padded (before, after)."""
    taps = [t / sum(BLUR_TAPS) for t in BLUR_TAPS]
    x = mx.pad(x, [(0, 0), pad, pad, (0, 0)])
    n = len(taps)
    h = x.shape[1] - n + 1
    x = sum(w * x[:, i:i + h] for i, w in enumerate(taps))
    wid = x.shape[2] - n + 1
    return sum(w * x[:, :, i:i + wid] for i, w in enumerate(taps))


class EqualConv(nn.Module):
    """A conv2d whose weight (O, k, k, I) is scaled by 1/sqrt(I k^2) when used; with `down`, blurred first and
    strided 2. `act`: the bias goes into the leaky ReLU (else an optional plain bias)."""

    def __init__(self, cin: int, cout: int, k: int, down: bool = False, act: bool = True, bias: bool = True,
                 padding: int | None = None):
        super().__init__()
        self.weight = mx.zeros((cout, k, k, cin))
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.down, self.act = down, act
        self.padding = 0 if down else (k // 2 if padding is None else padding)
        if bias:
            self.bias = mx.zeros((cout,))
        p = len(BLUR_TAPS) - 2 + k - 1
        self.blur_pad = ((p + 1) // 2, p // 2)

    def __call__(self, x: mx.array) -> mx.array:
        if self.down:
            x = blur(x, self.blur_pad)
        w = self.weight.astype(mx.float32) * self.scale
        x = mx.conv2d(x, w, stride=2 if self.down else 1, padding=self.padding)
        bias = self.get("bias")
        if self.act:
            return leaky(x, bias)
        return x if bias is None else x + bias.astype(mx.float32)


class MotionResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = EqualConv(cin, cin, 3)
        self.conv2 = EqualConv(cin, cout, 3, down=True)
        self.skip = EqualConv(cin, cout, 1, down=True, act=False, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return (self.conv2(self.conv1(x)) + self.skip(x)) * (1.0 / math.sqrt(2.0))


class EqualLinear(nn.Module):
    def __init__(self, din: int, dout: int):
        super().__init__()
        self.weight = mx.zeros((dout, din))
        self.bias = mx.zeros((dout,))
        self.scale = 1.0 / math.sqrt(din)

    def __call__(self, x: mx.array) -> mx.array:
        return x @ (self.weight.astype(mx.float32) * self.scale).T + self.bias.astype(mx.float32)


class MotionEncoder(nn.Module):
    """Face crops (N, S, S, 3) in [-1, 1] -> (N, motion_out_dim) motion vectors, float32."""

    def __init__(self, cfg: WanAnimateConfig):
        super().__init__()
        size = cfg.motion_size
        log_size = int(round(math.log2(size)))
        if 2**log_size != size or size < 8:
            raise ValueError(f"the motion encoder takes square power-of-two face crops of at least 8, not {size}")
        self.size = size
        width = cfg.motion_width(size)
        self.conv_in = EqualConv(3, width, 1)
        self.blocks = []
        for i in range(log_size, 2, -1):
            out = cfg.motion_width(2 ** (i - 1))
            self.blocks.append(MotionResBlock(width, out))
            width = out
        self.conv_out = EqualConv(width, cfg.motion_style_dim, 4, act=False, bias=False, padding=0)
        # four style_dim -> style_dim layers then one to the motion coefficients, no activations between them
        self.linears = [EqualLinear(cfg.motion_style_dim, cfg.motion_style_dim) for _ in range(4)]
        self.linears.append(EqualLinear(cfg.motion_style_dim, cfg.motion_dim))
        self.direction = mx.zeros((cfg.motion_out_dim, cfg.motion_dim))

    def basis(self) -> mx.array:
        """The orthonormal columns Q of the learned directions (+1e-8, as the reference), float32."""
        w = self.direction.astype(mx.float32) + 1e-8
        q, _ = mx.linalg.qr(w, stream=mx.cpu)
        return q

    def __call__(self, faces: mx.array) -> mx.array:
        if faces.shape[1:3] != (self.size, self.size):
            raise ValueError(f"face crops are {faces.shape[2]}x{faces.shape[1]}, the motion encoder takes "
                             f"{self.size}x{self.size}")
        h = self.conv_in(faces.astype(mx.float32))
        for block in self.blocks:
            h = block(h)
        h = self.conv_out(h).reshape(h.shape[0], -1)
        for linear in self.linears:
            h = linear(h)
        return h @ self.basis().T


def causal_conv1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """(B, T, C) -> conv1d over T with the first frame repeated k - 1 times in front (replicate padding)."""
    k = weight.shape[1]
    x = mx.concatenate([mx.repeat(x[:, :1], k - 1, axis=1), x], axis=1)
    return mx.conv1d(x, weight.astype(mx.float32), stride=stride) + bias.astype(mx.float32)


class Conv1d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.weight = mx.zeros((cout, k, cin))
        self.bias = mx.zeros((cout,))


class FaceEncoder(nn.Module):
    """(B, F, motion_out_dim) per-face-frame motion -> (B, T, face_heads + 1, dim) motion tokens per latent frame."""

    def __init__(self, cfg: WanAnimateConfig):
        super().__init__()
        hidden, self.heads, self.eps = cfg.face_hidden_dim, cfg.face_heads, cfg.eps
        self.conv1 = Conv1d(cfg.motion_out_dim, hidden * cfg.face_heads)
        self.conv2 = Conv1d(hidden, hidden)
        self.conv3 = Conv1d(hidden, hidden)
        self.out_proj = nn.Linear(hidden, cfg.dim)
        self.padding_tokens = mx.zeros((cfg.dim,))

    def __call__(self, motion: mx.array) -> mx.array:
        batch = motion.shape[0]
        x = causal_conv1d(motion.astype(mx.float32), self.conv1.weight, self.conv1.bias, 1)
        x = x.reshape(batch, x.shape[1], self.heads, -1).transpose(0, 2, 1, 3).reshape(batch * self.heads, x.shape[1], -1)
        x = nn.silu(layer_norm_fp32(x, eps=self.eps))
        for conv in (self.conv2, self.conv3):
            x = nn.silu(layer_norm_fp32(causal_conv1d(x, conv.weight, conv.bias, 2), eps=self.eps))
        x = self.out_proj(x.astype(self.out_proj.weight.dtype)).astype(mx.float32)
        x = x.reshape(batch, self.heads, x.shape[1], -1).transpose(0, 2, 1, 3)
        pad = mx.broadcast_to(self.padding_tokens.astype(mx.float32), (batch, x.shape[1], 1, x.shape[-1]))
        return mx.concatenate([x, pad], axis=2)


class FaceBlock(nn.Module):
    """Per-frame cross-attention of the video tokens to their frame's motion tokens (no affine pre-norms; RMSNorm
    of q and k over each head's width); returns the update, added to the residual by the caller."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.compute_dtype = mx.float32
        self.heads, self.eps = heads, eps
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys then values (the official fused linear1_kv)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim // heads, eps=eps)
        self.norm_k = nn.RMSNorm(dim // heads, eps=eps)

    def __call__(self, x: mx.array, motion: mx.array) -> mx.array:
        """x: (B, S, dim) video tokens, frame-major; motion: (B, T, N, dim) with S divisible by T."""
        dtype = self.compute_dtype
        batch, tokens, dim = x.shape
        _, frames, per, _ = motion.shape
        if tokens % frames:
            raise ValueError(f"{tokens} video tokens do not split into the {frames} motion frames")
        h = layer_norm_fp32(x, eps=self.eps).astype(dtype)
        m = layer_norm_fp32(motion, eps=self.eps).astype(dtype).reshape(batch, frames * per, dim)
        q = self.norm_q(self.q(h).reshape(batch, tokens, self.heads, -1))
        k, v = mx.split(self.kv(m), 2, axis=-1)
        k = self.norm_k(k.reshape(batch * frames, per, self.heads, -1))
        v = v.reshape(batch * frames, per, self.heads, -1)
        q = q.reshape(batch * frames, tokens // frames, self.heads, -1)
        out = attention(q, k, v).reshape(batch, tokens, dim)
        return self.o(out).astype(mx.float32)


@dataclass
class AnimateState(WanState):
    motion: mx.array | None = None  # (B, T, N, dim) motion tokens per latent frame (a zero frame first)


class WanAnimateTransformer(WanTransformer):
    def __init__(self, config: WanAnimateConfig, dtype: mx.Dtype = mx.float32):
        super().__init__(config, dtype)
        pt, ph, pw = config.patch_size
        self.blocks = [ImageContextBlock(config) for _ in range(config.num_layers)]
        self.pose_embedding = nn.Linear(pt * ph * pw * config.pose_channels, config.dim)
        self.image_embedding = ImageEmbedding(config.image_dim, config.dim)
        self.motion_encoder = MotionEncoder(config)
        self.face_encoder = FaceEncoder(config)
        self.face_blocks = [FaceBlock(config.dim, config.num_heads, config.eps) for _ in range(config.face_blocks)]
        self.set_compute_dtype(dtype)

    def encode_face(self, faces: mx.array) -> mx.array:
        """Face crops (B, F, S, S, 3) in [-1, 1] (F = 4n + 1) -> motion tokens (B, n + 2, face_heads + 1, dim): a
        zero frame for the reference latent frame, then one per latent frame. Depends only on the faces, so a
        segment computes it once per guidance pass."""
        batch, frames = faces.shape[:2]
        flat = faces.reshape(batch * frames, *faces.shape[2:])
        step = self.config.motion_batch
        motion = mx.concatenate([self.motion_encoder(flat[i:i + step]) for i in range(0, flat.shape[0], step)])
        tokens = self.face_encoder(motion.reshape(batch, frames, -1))
        return mx.concatenate([mx.zeros_like(tokens[:, :1]), tokens], axis=1)

    def __call__(self, x: mx.array, timestep: mx.array, context, image: mx.array | None = None,
                 pose: mx.array | None = None, motion: mx.array | None = None) -> mx.array:
        """x: (B, T + 1, H, W, in_channels); context: (B, L, text_dim) text, or an ImageContext already
        embedded; image: (B, 257, image_dim) CLIP features (with raw text); pose: (B, T, H, W, pose_channels)
        latents of the pose video; motion: `encode_face`'s tokens. Returns (B, T + 1, H, W, out_channels)."""
        return self.unembed(self.run_blocks(self.embed(x, timestep, context, image, pose, motion)))

    def embed_context(self, text: mx.array, image: mx.array) -> ImageContext:
        return ImageContext(self.text_embedding(text), None, self.image_embedding(image))

    def embed(self, x, timestep, context, image=None, pose=None, motion=None) -> AnimateState:
        cfg = self.config
        if pose is None or motion is None:
            raise ValueError("the Animate transformer needs the pose latents and the face motion tokens")
        if pose.shape[1] + 1 != x.shape[1] or pose.shape[2:4] != x.shape[2:4] or pose.shape[4] != cfg.pose_channels:
            raise ValueError(f"pose latents {pose.shape} do not match the video latents {x.shape} (one frame fewer, "
                             f"{cfg.pose_channels} channels)")
        if not isinstance(context, ImageContext):
            context = self.embed_context(context, image)
        state = super().embed(x, timestep, context)
        added = self.pose_embedding(patchify(pose, cfg.patch_size).astype(self.compute_dtype)).astype(mx.float32)
        hidden = state.hidden.reshape(x.shape[0], -1, cfg.dim)
        first = hidden.shape[1] - added.shape[1]  # the reference frame's tokens take no pose
        hidden = mx.concatenate([hidden[:, :first], hidden[:, first:] + added], axis=1)
        return AnimateState(hidden.reshape(state.hidden.shape), state.block_time, state.time_embedding, context,
                            state.rope, state.latent_shape, None, motion)

    def run_blocks(self, state: AnimateState, start: int = 0, stop: int | None = None) -> AnimateState:
        every = self.config.face_every
        for i, block in enumerate(self.blocks[start:stop], start):
            state.hidden = block(state.hidden, state.block_time, state.context, state.rope)
            if i % every == 0:
                shape = state.hidden.shape
                tokens = state.hidden.reshape(shape[0], -1, shape[-1])
                state.hidden = (tokens + self.face_blocks[i // every](tokens, state.motion)).reshape(shape)
        return state

    def prepare_context(self, context):
        raise NotImplementedError("the Animate transformer embeds its text and image context per call")


def patchify(x: mx.array, patch: tuple[int, int, int]) -> mx.array:
    """(B, T, H, W, C) -> (B, tokens, pt*ph*pw*C), tokens frame-major, features (kt, kh, kw, C) as the converted
    patch convolution takes them; refuses sizes the patch does not divide."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent size {(t, h, w)} is not a multiple of the patch {patch}")
    x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, pt * ph * pw * c)
