"""Wan 2.1 / 2.2 VAE checkpoints in diffusers' `AutoencoderKLWan` names onto `WanVAE`.

One map serves both versions: Wan 2.1's encoder is a flat list (`down_blocks.N` is a residual block or a
resample), Wan 2.2's is grouped by level (`down_blocks.N.resnets.M`, `down_blocks.N.downsampler`). Our names
follow the same split, so no rule needs to count blocks.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule


def conv3d_to_channels_last(w: mx.array) -> mx.array:
    """torch Conv3d weight (O, I, kT, kH, kW) -> MLX (O, kT, kH, kW, I)."""
    return w.transpose(0, 2, 3, 4, 1)


def conv2d_to_channels_last(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, kH, kW) -> MLX (O, kH, kW, I)."""
    return w.transpose(0, 2, 3, 1)


def conv1x1_to_linear(w: mx.array) -> mx.array:
    """torch Conv2d 1x1 weight (O, I, 1, 1) -> Linear weight (O, I)."""
    if w.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 convolution, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[:2])


def channel_first_gamma(w: mx.array) -> mx.array:
    """RMS_norm gain (C, 1, 1[, 1]) -> (C,)."""
    if any(d != 1 for d in w.shape[1:]):
        raise ValueError(f"expected a gain of shape (C, 1, ...), got {tuple(w.shape)}")
    return w.reshape(-1)


_WB = r"(weight|bias)"


def _causal_conv(source: str, target: str) -> list[Rule]:
    return [
        Rule(rf"{source}\.weight", rf"{target}.weight", "conv3d_to_channels_last"),
        Rule(rf"{source}\.bias", rf"{target}.bias"),
    ]


def _residual_block(source: str, target: str) -> list[Rule]:
    n = re.compile(source).groups + 1  # the group that names the norm or conv
    return [
        Rule(rf"{source}\.(norm1|norm2)\.gamma", rf"{target}.\{n}.weight", "channel_first_gamma"),
        Rule(rf"{source}\.(conv1|conv2)\.weight", rf"{target}.\{n}.weight", "conv3d_to_channels_last"),
        Rule(rf"{source}\.(conv1|conv2)\.bias", rf"{target}.\{n}.bias"),
        *_causal_conv(rf"{source}\.conv_shortcut", f"{target}.shortcut"),
    ]


def _resample(source: str, target: str) -> list[Rule]:
    """A down/upsample: the 3x3 Conv2d (`resample.1`, after the padding or the nearest upsampling) and the
    optional temporal Conv3d."""
    return [
        Rule(rf"{source}\.resample\.1\.weight", rf"{target}.conv.weight", "conv2d_to_channels_last"),
        Rule(rf"{source}\.resample\.1\.bias", rf"{target}.conv.bias"),
        *_causal_conv(rf"{source}\.time_conv", f"{target}.time_conv"),
    ]


def _mid_block(part: str) -> list[Rule]:
    source, target = rf"{part}\.mid_block", f"{part}.mid"
    return [
        *_residual_block(rf"{source}\.resnets\.(\d+)", rf"{target}.resnets.\1"),
        Rule(rf"{source}\.attentions\.0\.norm\.gamma", f"{target}.attn.norm.weight", "channel_first_gamma"),
        Rule(rf"{source}\.attentions\.0\.(to_qkv|proj)\.weight", rf"{target}.attn.\1.weight", "conv1x1_to_linear"),
        Rule(rf"{source}\.attentions\.0\.(to_qkv|proj)\.bias", rf"{target}.attn.\1.bias"),
    ]


def _head(part: str) -> list[Rule]:
    return [
        *_causal_conv(rf"{part}\.conv_in", f"{part}.conv_in"),
        Rule(rf"{part}\.norm_out\.gamma", f"{part}.norm_out.weight", "channel_first_gamma"),
        *_causal_conv(rf"{part}\.conv_out", f"{part}.conv_out"),
    ]


DIFFUSERS_VAE = KeyMap(
    [
        *_causal_conv(r"quant_conv", "quant_conv"),
        *_causal_conv(r"post_quant_conv", "post_quant_conv"),
        # encoder
        *_head("encoder"),
        *_residual_block(r"encoder\.down_blocks\.(\d+)", r"encoder.down.\1"),  # 2.1
        *_resample(r"encoder\.down_blocks\.(\d+)", r"encoder.down.\1"),  # 2.1
        *_residual_block(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.resnets.\2"),  # 2.2
        *_resample(r"encoder\.down_blocks\.(\d+)\.downsampler", r"encoder.down.\1.downsample"),  # 2.2
        *_mid_block("encoder"),
        # decoder
        *_head("decoder"),
        *_mid_block("decoder"),
        *_residual_block(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", r"decoder.up.\1.resnets.\2"),
        *_resample(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", r"decoder.up.\1.upsample"),  # 2.1
        *_resample(r"decoder\.up_blocks\.(\d+)\.upsampler", r"decoder.up.\1.upsample"),  # 2.2
    ],
    transforms={
        "conv3d_to_channels_last": conv3d_to_channels_last,
        "conv2d_to_channels_last": conv2d_to_channels_last,
        "conv1x1_to_linear": conv1x1_to_linear,
        "channel_first_gamma": channel_first_gamma,
    },
)
