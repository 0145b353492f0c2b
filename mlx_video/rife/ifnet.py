"""IFNet of Practical-RIFE v4.25 (the flow network that makes an in-between frame), channels-last.

Given two frames I0, I1 (B, H, W, 3) in [0, 1] and a time t in (0, 1), five IFBlocks estimate, coarse to
fine, the flow from the frame at time t back to each input (4 channels: t->0 in xy, t->1 in xy), a fusion
mask and 8 channels of hidden features. Block k works at 1/scale_list[k] of the input size, scale_list =
[16, 8, 4, 2, 1] / scale. Each later block sees both inputs and their features warped by the flow so far
and adds a correction to that flow; the mask and hidden features are replaced. The frame is the blend
warp(I0)·σ(mask) + warp(I1)·(1 − σ(mask)). There is no refinement UNet in 4.25.

Inputs must already be padded so that H and W are multiples of `IFNet.pad_multiple(scale)`
(64 at scale 1, 128 at scale 0.5): every block divides its input by scale_list[k] and then by 4.

Resampling follows the reference exactly, because the weights were trained with it:
* `resize_bilinear` is torch's `interpolate(mode="bilinear", align_corners=False)` with a scale factor and
  no antialiasing: a downscale by 16 averages just two pixels per axis.
* `backward_warp` is `grid_sample(bilinear, padding_mode="border", align_corners=True)` on a grid of
  linspace(-1, 1) plus flow / ((W-1)/2, (H-1)/2), i.e. sampling at pixel (x + fx, y + fy) clamped to the
  image, computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..json_config import JsonConfig


@dataclass(frozen=True)
class IFNetConfig(JsonConfig):
    version: str = "4.25"
    block_channels: tuple[int, ...] = (192, 128, 96, 64, 32)
    head_channels: int = 16  # width of the feature encoder
    feature_channels: int = 4  # the encoder's output per frame
    hidden_channels: int = 8  # the features a block hands to the next
    res_convs: int = 8  # residual convs per block


def leaky_relu(x: mx.array) -> mx.array:
    return nn.leaky_relu(x, 0.2)


def _axis_taps(size_in: int, factor: float) -> tuple[mx.array, mx.array, mx.array, int]:
    """Source indices and weights of torch's bilinear resize (align_corners=False) along one axis."""
    size_out = int(np.floor(size_in * factor))
    src = (np.arange(size_out, dtype=np.float32) + 0.5) * np.float32(1.0 / factor) - 0.5
    src = np.maximum(src, 0.0)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, size_in - 1)
    lo = np.minimum(lo, size_in - 1)
    w = (src - lo).astype(np.float32)
    return mx.array(lo), mx.array(hi), mx.array(w), size_out


def resize_bilinear(x: mx.array, factor: float) -> mx.array:
    """Scale the two spatial axes of (B, H, W, C) by `factor`, as torch's bilinear interpolate does."""
    if factor == 1.0:
        return x
    for axis in (1, 2):
        lo, hi, w, _ = _axis_taps(x.shape[axis], factor)
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape).astype(x.dtype)
        x = mx.take(x, lo, axis=axis) * (1 - w) + mx.take(x, hi, axis=axis) * w
    return x


def backward_warp(x: mx.array, flow: mx.array) -> mx.array:
    """Sample x (B, H, W, C) at each pixel displaced by flow (B, H, W, 2) in pixels (x, y); bilinear, and
    coordinates outside the image are clamped to its border."""
    b, h, w, c = x.shape
    dtype = x.dtype
    x = x.astype(mx.float32)
    flow = flow.astype(mx.float32)
    # The reference normalises to [-1, 1] and back; doing the same keeps its float rounding.
    gx = mx.array(np.linspace(-1.0, 1.0, w, dtype=np.float32)).reshape(1, 1, w)
    gy = mx.array(np.linspace(-1.0, 1.0, h, dtype=np.float32)).reshape(1, h, 1)
    gx = gx + flow[..., 0] / ((w - 1.0) / 2.0)
    gy = gy + flow[..., 1] / ((h - 1.0) / 2.0)
    px = mx.clip((gx + 1) / 2 * (w - 1), 0, w - 1)
    py = mx.clip((gy + 1) / 2 * (h - 1), 0, h - 1)
    x0 = mx.floor(px)
    y0 = mx.floor(py)
    tx = (px - x0)[..., None]
    ty = (py - y0)[..., None]
    x0 = x0.astype(mx.int32)
    y0 = y0.astype(mx.int32)
    # At the far border x0 + 1 == w with weight 0: clamping the index keeps the gather in range.
    x1 = mx.minimum(x0 + 1, w - 1)
    y1 = mx.minimum(y0 + 1, h - 1)
    flat = x.reshape(b, h * w, c)

    def tap(yi, xi):
        idx = (yi * w + xi).reshape(b, h * w, 1)
        return mx.take_along_axis(flat, idx, axis=1).reshape(b, h, w, c)

    top = tap(y0, x0) * (1 - tx) + tap(y0, x1) * tx
    bottom = tap(y1, x0) * (1 - tx) + tap(y1, x1) * tx
    return (top * (1 - ty) + bottom * ty).astype(dtype)


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """torch's PixelShuffle in channels-last: (B, H, W, C·r·r) -> (B, H·r, W·r, C); input channel
    c·r·r + i·r + j lands at row offset i, column offset j."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class Head(nn.Module):
    """Per-frame feature encoder: 3 -> `feature_channels` at full resolution."""

    def __init__(self, width: int = 16, out: int = 4):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.cnn1 = nn.Conv2d(width, width, 3, padding=1)
        self.cnn2 = nn.Conv2d(width, width, 3, padding=1)
        self.cnn3 = nn.ConvTranspose2d(width, out, 4, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.clip(x, 0.0, 1.0)
        x = leaky_relu(self.cnn0(x))
        x = leaky_relu(self.cnn1(x))
        x = leaky_relu(self.cnn2(x))
        return self.cnn3(x)


class ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.beta = mx.ones((c,))

    def __call__(self, x: mx.array) -> mx.array:
        return leaky_relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    def __init__(self, in_channels: int, c: int, res_convs: int = 8, out_channels: int = 13):
        super().__init__()
        self.conv0 = [
            nn.Conv2d(in_channels, c // 2, 3, stride=2, padding=1),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
        ]
        self.convblock = [ResConv(c) for _ in range(res_convs)]
        # ConvTranspose (x2) to 4x the outputs, then PixelShuffle(2) (x2): back to the size the block was given.
        self.lastconv = nn.ConvTranspose2d(c, out_channels * 4, 4, stride=2, padding=1)

    def __call__(self, x: mx.array, flow: mx.array | None, scale: float):
        x = resize_bilinear(x, 1.0 / scale)
        if flow is not None:
            x = mx.concatenate([x, resize_bilinear(flow, 1.0 / scale) / scale], axis=-1)
        for conv in self.conv0:
            x = leaky_relu(conv(x))
        for res in self.convblock:
            x = res(x)
        out = pixel_shuffle(self.lastconv(x), 2)
        out = resize_bilinear(out, scale)
        return out[..., :4] * scale, out[..., 4:5], out[..., 5:]


class IFNet(nn.Module):
    def __init__(self, config: IFNetConfig = IFNetConfig()):
        super().__init__()
        self.config = config
        f, hid = config.feature_channels, config.hidden_channels
        first_in = 3 + 3 + f + f + 1  # img0, img1, f0, f1, t
        later_in = 3 + 3 + f + f + 1 + 1 + hid + 4  # warped imgs and features, t, mask, hidden, flow
        out = 4 + 1 + hid
        self.blocks = [
            IFBlock(first_in if i == 0 else later_in, c, config.res_convs, out)
            for i, c in enumerate(config.block_channels)
        ]
        self.encode = Head(config.head_channels, f)

    @staticmethod
    def scale_list(scale: float = 1.0) -> list[float]:
        return [16 / scale, 8 / scale, 4 / scale, 2 / scale, 1 / scale]

    @staticmethod
    def pad_multiple(scale: float = 1.0) -> int:
        """H and W must be multiples of this: the coarsest block works at 1/(16/scale), then strides by 4."""
        return int(max(64, 64 / scale))

    def __call__(
        self,
        img0: mx.array,
        img1: mx.array,
        timestep: float | mx.array = 0.5,
        scale: float = 1.0,
        f0: mx.array | None = None,
        f1: mx.array | None = None,
        return_flow: bool = False,
    ):
        """The frame at `timestep` between img0 and img1 (B, H, W, 3, padded; see the module docstring).

        `f0`/`f1` are `self.encode(img)` of each input; pass them when a frame takes part in two pairs.
        `timestep` is a float or a (B,) array. With `return_flow`, also returns the final flow (B, H, W, 4)
        and the mask logits (B, H, W, 1).
        """
        if scale not in (0.25, 0.5, 1.0, 2.0, 4.0):
            raise ValueError(f"scale must be 0.25, 0.5, 1, 2 or 4, got {scale}")
        b, h, w, _ = img0.shape
        m = self.pad_multiple(scale)
        if h % m or w % m:
            raise ValueError(f"IFNet at scale {scale} needs H and W multiples of {m}, got {w}x{h}; pad first")
        img0 = mx.clip(img0, 0.0, 1.0)
        img1 = mx.clip(img1, 0.0, 1.0)
        f0 = self.encode(img0) if f0 is None else f0
        f1 = self.encode(img1) if f1 is None else f1
        t = timestep if isinstance(timestep, mx.array) else mx.array(timestep)
        t = mx.broadcast_to(t.astype(img0.dtype).reshape(-1, 1, 1, 1), (b, h, w, 1))

        # Each frame and its features are warped by the same flow, so they are gathered together.
        src0 = mx.concatenate([img0, f0], axis=-1)
        src1 = mx.concatenate([img1, f1], axis=-1)
        flow = mask = hidden = w0 = w1 = None
        for block, s in zip(self.blocks, self.scale_list(scale)):
            if flow is None:
                flow, mask, hidden = block(mx.concatenate([img0, img1, f0, f1, t], axis=-1), None, s)
            else:
                x = mx.concatenate([w0[..., :3], w1[..., :3], w0[..., 3:], w1[..., 3:], t, mask, hidden], axis=-1)
                delta, mask, hidden = block(x, flow, s)
                flow = flow + delta
            w0 = backward_warp(src0, flow[..., :2])
            w1 = backward_warp(src1, flow[..., 2:4])
        alpha = mx.sigmoid(mask)
        frame = w0[..., :3] * alpha + w1[..., :3] * (1 - alpha)
        if return_flow:
            return frame, flow, mask
        return frame
