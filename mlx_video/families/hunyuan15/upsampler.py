"""HunyuanVideo 1.5's latent upsamplers: the first step of its super-resolution stage, low-resolution latents ->
latents at the SR model's size, before the SR transformer refines them.

As the official code (Tencent-Hunyuan/HunyuanVideo-1.5, `hyvideo/models/transformers/modules/upsample.py`, and
`hyvideo/pipelines/hunyuan_video_sr_pipeline.py`, which first resizes the latents bilinearly to the target grid,
then runs the upsampler in float32):
- 480p -> 720p (`SRTo720pUpsampler`): a causal 3x3x3 convolution into `hidden_channels`, `num_blocks` residual
  blocks of three such convolutions with SiLU between them, a convolution out (plus the input when
  `global_residual` and the shapes agree);
- 720p -> 1080p (`SRTo1080pUpsampler`): a causal convolution into the first width plus the input repeated along
  channels, then per level `num_res_blocks + 1` of the VAE's residual blocks, RMS norm, SiLU, a convolution out.

Every convolution is the VAE's causal one (first frame replicated twice in front, edges replicated in space), so
the blocks come from `mlx_video.families.hunyuan15.vae`. Layout: channels-last (B, T, H, W, C).
The configuration is the checkpoint's `upsampler/<variant>/config.json` (the class's constructor arguments).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.families.hunyuan15.vae import CausalConv3d, ResnetBlock, RMSNorm
from mlx_video.families.hunyuan15.vae_keys import TRANSFORMS
from mlx_video.json_config import JsonConfig

KINDS = {"SRTo720pUpsampler": "720p", "SRTo1080pUpsampler": "1080p"}


@dataclass(frozen=True)
class UpsamplerConfig(JsonConfig):
    """Either class's constructor arguments (`_class_name` picks the kind). 720p: in/out/hidden channels,
    num_blocks, global_residual; 1080p: z_channels, out_channels, block_out_channels, num_res_blocks."""

    kind: str = "720p"
    in_channels: int = 32
    out_channels: int = 32
    hidden_channels: int = 64
    num_blocks: int = 6
    global_residual: bool = False
    z_channels: int = 32
    block_out_channels: tuple[int, ...] = (64,)
    num_res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.kind not in KINDS.values():
            raise ValueError(f"upsampler kind {self.kind!r} is not one of {sorted(KINDS.values())}")
        if self.kind == "1080p" and self.block_out_channels[0] % self.z_channels:
            raise ValueError(f"block_out_channels[0] ({self.block_out_channels[0]}) must be a multiple of "
                             f"z_channels ({self.z_channels})")

    @classmethod
    def from_json(cls, config: dict) -> "UpsamplerConfig":
        """From the official config.json (its `_class_name` names the kind; hidden_channels null means 64)."""
        name = config.get("_class_name")
        if name not in KINDS:
            raise ValueError(f"the upsampler config names class {name!r}; expected one of {sorted(KINDS)}")
        fields = {k: v for k, v in config.items() if not k.startswith("_") and v is not None}
        return cls.from_dict({**fields, "kind": KINDS[name]})


class ResidualConvBlock(nn.Module):
    """x + conv(silu(conv(silu(conv(x)))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = [CausalConv3d(channels, channels) for _ in range(3)]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h if i == 0 else nn.silu(h), {})
        return x + h


class Upsampler720p(nn.Module):
    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        self.global_residual = cfg.global_residual
        self.in_conv = CausalConv3d(cfg.in_channels, cfg.hidden_channels)
        self.blocks = [ResidualConvBlock(cfg.hidden_channels) for _ in range(cfg.num_blocks)]
        self.out_conv = CausalConv3d(cfg.hidden_channels, cfg.out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.in_conv(x, {})
        for block in self.blocks:
            y = block(y)
        y = self.out_conv(y, {})
        return y + x if self.global_residual and y.shape == x.shape else y


class UpsamplerLevel(nn.Module):
    def __init__(self, blocks: list):
        super().__init__()
        self.block = blocks


class Upsampler1080p(nn.Module):
    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        self.repeats = cfg.block_out_channels[0] // cfg.z_channels
        width = cfg.block_out_channels[0]
        self.conv_in = CausalConv3d(cfg.z_channels, width)
        self.up = []
        for channels in cfg.block_out_channels:
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, channels))
                width = channels
            self.up.append(UpsamplerLevel(blocks))
        self.norm_out = RMSNorm(width)
        self.conv_out = CausalConv3d(width, cfg.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        # the input repeated along channels: each channel `repeats` times in a row (torch's repeat_interleave)
        h = self.conv_in(z, {}) + mx.repeat(z, self.repeats, axis=-1)
        for level in self.up:
            for block in level.block:
                h = block(h, {})
        return self.conv_out(nn.silu(self.norm_out(h)), {})


def build_upsampler(cfg: UpsamplerConfig) -> nn.Module:
    return Upsampler720p(cfg) if cfg.kind == "720p" else Upsampler1080p(cfg)


def _bilinear_taps(size_in: int, size_out: int) -> tuple[mx.array, mx.array, mx.array]:
    """Source rows and weights of torch's `interpolate(size=..., mode="bilinear", align_corners=False)` along
    one axis (the scale is size_in / size_out)."""
    scale = np.float32(size_in / size_out)
    src = np.maximum((np.arange(size_out, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return mx.array(lo), mx.array(hi), mx.array((src - lo).astype(np.float32))


def resize_latents(x: mx.array, height: int, width: int) -> mx.array:
    """(B, T, h, w, C) -> (B, T, height, width, C), bilinear per frame as torch (align_corners=False)."""
    for axis, size in ((2, height), (3, width)):
        if x.shape[axis] == size:
            continue
        lo, hi, w = _bilinear_taps(x.shape[axis], size)
        shape = [1] * x.ndim
        shape[axis] = -1
        w = w.reshape(shape).astype(x.dtype)
        x = mx.take(x, lo, axis=axis) * (1 - w) + mx.take(x, hi, axis=axis) * w
    return x


def upsample_latents(upsampler: nn.Module, latents: mx.array, height: int, width: int) -> mx.array:
    """Low-resolution latents (B, T, h, w, C) -> the upsampler's output on the (height, width) latent grid, in
    float32 (the official SR pipeline resizes, then runs the upsampler in float32)."""
    return upsampler(resize_latents(latents.astype(mx.float32), height, width))


def _conv_rules(source: str, target: str) -> list[Rule]:
    return [Rule(rf"{source}\.conv\.weight", rf"{target}.conv.weight", "conv3d_channels_last"),
            Rule(rf"{source}\.conv\.bias", rf"{target}.conv.bias")]


def upsampler_keymap() -> KeyMap:
    """The official checkpoints' names (`upsampler/<variant>/diffusion_pytorch_model.safetensors`; ComfyUI's
    `hunyuanvideo15_latent_upsampler_*.safetensors` use the same) onto ours, for both kinds."""
    res = r"up\.(\d+)\.block\.(\d+)"
    return KeyMap([
        *_conv_rules(r"(in_conv|out_conv|conv_in|conv_out)", r"\1"),
        *[rule for i in range(3) for rule in _conv_rules(rf"blocks\.(\d+)\.block\.{2 * i}", rf"blocks.\1.convs.{i}")],
        Rule(rf"{res}\.(norm1|norm2)\.gamma", r"up.\1.block.\2.\3.gamma", "channel_first_gain"),
        *_conv_rules(rf"{res}\.(conv1|conv2)", r"up.\1.block.\2.\3"),
        Rule(rf"{res}\.nin_shortcut\.weight", r"up.\1.block.\2.conv_shortcut.weight", "conv1x1x1_to_linear"),
        Rule(rf"{res}\.nin_shortcut\.bias", r"up.\1.block.\2.conv_shortcut.bias"),
        Rule(r"norm_out\.gamma", "norm_out.gamma", "channel_first_gain"),
    ], transforms=TRANSFORMS)
