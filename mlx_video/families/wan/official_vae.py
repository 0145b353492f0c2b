"""The official Wan VAE checkpoints (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, and ComfyUI's repackaged VAE files,
which keep the official names) onto `WanVAE`.

The official modules are `nn.Sequential` lists, so names carry positions:

* a residual block is `residual.{0,2,3,6}` (norm, conv, norm, conv; SiLU and dropout take the other slots)
  plus an optional 1x1x1 `shortcut`; norms store `gamma` channel-first;
* a resample is `resample.1` (the 2D conv after the zero pad or the upsampling) plus an optional `time_conv`;
* the mid block is `middle.{0,1,2}` (residual, attention, residual), the output `head.{0,2}` (norm, conv);
* the top-level `conv1` / `conv2` are the 1x1x1 convs around the latent (our `quant_conv` / `post_quant_conv`).

Wan 2.1 keeps the encoder and the decoder as flat lists (`downsamples.N`, `upsamples.N`); Wan 2.2 groups them
by level (`downsamples.L.downsamples.M`, `upsamples.L.upsamples.M`). Our encoder is flat for 2.1 as well, so
only the 2.1 decoder needs its flat index turned into (level, block): that depends on the number of blocks per
level, so the rules are generated for the checkpoint at hand (`official_vae_keymap(keys)`).
"""

from __future__ import annotations

import math
import re

from mlx_video.errors import MlxVideoError
from mlx_video.families.wan.vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAEConfig,
)

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.families.wan.vae_keys import DIFFUSERS_VAE

_WB = r"(weight|bias)"


def _conv3d(source: str, target: str) -> list[Rule]:
    return [
        Rule(rf"{source}\.weight", f"{target}.weight", "conv3d_to_channels_last"),
        Rule(rf"{source}\.bias", f"{target}.bias"),
    ]


def _residual(source: str, target: str) -> list[Rule]:
    return [
        Rule(rf"{source}\.residual\.0\.gamma", f"{target}.norm1.weight", "channel_first_gamma"),
        *_conv3d(rf"{source}\.residual\.2", f"{target}.conv1"),
        Rule(rf"{source}\.residual\.3\.gamma", f"{target}.norm2.weight", "channel_first_gamma"),
        *_conv3d(rf"{source}\.residual\.6", f"{target}.conv2"),
        *_conv3d(rf"{source}\.shortcut", f"{target}.shortcut"),
    ]


def _resample(source: str, target: str) -> list[Rule]:
    return [
        Rule(rf"{source}\.resample\.1\.weight", f"{target}.conv.weight", "conv2d_to_channels_last"),
        Rule(rf"{source}\.resample\.1\.bias", f"{target}.conv.bias"),
        *_conv3d(rf"{source}\.time_conv", f"{target}.time_conv"),
    ]


def _middle(part: str) -> list[Rule]:
    return [
        *_residual(rf"{part}\.middle\.0", f"{part}.mid.resnets.0"),
        *_residual(rf"{part}\.middle\.2", f"{part}.mid.resnets.1"),
        Rule(rf"{part}\.middle\.1\.norm\.gamma", f"{part}.mid.attn.norm.weight", "channel_first_gamma"),
        Rule(rf"{part}\.middle\.1\.(to_qkv|proj)\.weight", rf"{part}.mid.attn.\1.weight", "conv1x1_to_linear"),
        Rule(rf"{part}\.middle\.1\.(to_qkv|proj)\.bias", rf"{part}.mid.attn.\1.bias"),
    ]


def _ends(part: str) -> list[Rule]:
    return [
        *_conv3d(rf"{part}\.conv1", f"{part}.conv_in"),
        Rule(rf"{part}\.head\.0\.gamma", f"{part}.norm_out.weight", "channel_first_gamma"),
        *_conv3d(rf"{part}\.head\.2", f"{part}.conv_out"),
    ]


def _flat_decoder_layout(keys) -> list[tuple[int, str, int, int]]:
    """Wan 2.1 decoder: for each flat index N of `decoder.upsamples.N`, (level, "resnet"|"upsample", block)."""
    entries: dict[int, str] = {}
    for k in keys:
        m = re.match(r"decoder\.upsamples\.(\d+)\.(residual|shortcut|resample|time_conv)\.", k)
        if m:
            kind = "upsample" if m.group(2) in ("resample", "time_conv") else "resnet"
            entries[int(m.group(1))] = kind
    layout, level, block = [], 0, 0
    for n in sorted(entries):
        if entries[n] == "resnet":
            layout.append((n, "resnet", level, block))
            block += 1
        else:
            layout.append((n, "upsample", level, 0))
            level, block = level + 1, 0
    return layout


def is_grouped(keys) -> bool:
    """Wan 2.2's grouped layout (`encoder.downsamples.L.downsamples.M`)."""
    return any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.\d+\.", k) for k in keys)


def official_vae_keymap(keys) -> KeyMap:
    keys = list(keys)
    rules = [*_conv3d(r"conv1", "quant_conv"), *_conv3d(r"conv2", "post_quant_conv"), *_ends("encoder"), *_ends("decoder")]
    rules += _middle("encoder") + _middle("decoder")
    if is_grouped(keys):
        rules += _residual(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)", r"encoder.down.\1.resnets.\2")
        rules += _resample(r"encoder\.downsamples\.(\d+)\.downsamples\.\d+", r"encoder.down.\1.downsample")
        rules += _residual(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)", r"decoder.up.\1.resnets.\2")
        rules += _resample(r"decoder\.upsamples\.(\d+)\.upsamples\.\d+", r"decoder.up.\1.upsample")
    else:
        rules += _residual(r"encoder\.downsamples\.(\d+)", r"encoder.down.\1")
        rules += _resample(r"encoder\.downsamples\.(\d+)", r"encoder.down.\1")
        for n, kind, level, block in _flat_decoder_layout(keys):
            if kind == "resnet":
                rules += _residual(rf"decoder\.upsamples\.{n}", f"decoder.up.{level}.resnets.{block}")
            else:
                rules += _resample(rf"decoder\.upsamples\.{n}", f"decoder.up.{level}.upsample")
    return KeyMap(rules, transforms=DIFFUSERS_VAE.transforms)


def infer_official_vae_config(shapes: dict[str, tuple[int, ...]]) -> WanVAEConfig:
    """Our VAE config from the tensor shapes (key -> shape) of an official-names checkpoint.

    The latent statistics are not stored in the weights: they are the published ones of the Wan 2.1 VAE
    (16 latent channels) or the Wan 2.2 VAE (48).
    """
    need = _shape_reader(shapes)
    keys = set(shapes)
    conv_in = need("encoder.conv1.weight")  # (base, in_channels, 3, 3, 3)
    base_dim, in_channels = conv_in[0], conv_in[1]
    z_dim = need("conv2.weight")[0]
    out_channels = need("decoder.head.2.weight")[0]
    patch = int(round(math.sqrt(in_channels / 3)))
    if 3 * patch * patch != in_channels:
        raise MlxVideoError(f"the VAE takes {in_channels} input channels, which is not 3 x a square patch")
    levels, decoder_first = _grouped_levels(keys, need) if is_grouped(keys) else _flat_levels(keys, need)
    dim_mult = _dim_mult(levels, base_dim)
    decoder_base = decoder_first // dim_mult[-1]
    temporal = tuple(t for _, _, t in levels[:-1])
    mean, std = _latent_statistics(z_dim)
    try:
        return WanVAEConfig(
            base_dim=base_dim,
            decoder_base_dim=decoder_base if decoder_base != base_dim else None,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=levels[0][1],
            temporal_downsample=temporal,
            is_residual=is_grouped(keys),
            patch_size=patch if patch > 1 else None,
            in_channels=in_channels,
            out_channels=out_channels,
            latents_mean=mean,
            latents_std=std,
            scale_factor_temporal=2 ** sum(temporal),
            scale_factor_spatial=2 ** (len(dim_mult) - 1) * patch,
        )
    except ValueError as e:
        raise MlxVideoError(f"the VAE checkpoint's shapes do not form a Wan VAE: {e}") from None


def _shape_reader(shapes: dict[str, tuple[int, ...]]):
    def need(key):
        s = shapes.get(key)
        if s is None:
            raise MlxVideoError(f"the VAE checkpoint lacks {key}, which every Wan VAE has")
        return s

    return need


def _grouped_levels(keys: set, need) -> tuple[list[tuple[int, int, bool]], int]:
    """Wan 2.2's grouped encoder: per level (out channels, residual blocks, temporal down); the decoder's first width."""
    levels = []
    count = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    for i in range(count):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"encoder\.downsamples\.{i}\.downsamples\.(\d+)\.residual\.", k))}
        out = need(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0]
        temporal = any(re.match(rf"encoder\.downsamples\.{i}\.downsamples\.\d+\.time_conv\.weight", k) for k in keys)
        levels.append((out, len(blocks), temporal))
    return levels, need("decoder.upsamples.0.upsamples.0.residual.2.weight")[0]


def _flat_levels(keys: set, need) -> tuple[list[tuple[int | None, int, bool]], int]:
    """Wan 2.1's flat encoder list, read the same way."""
    entries: dict[int, str] = {}
    for k in keys:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(residual|shortcut|resample|time_conv)\.", k)
        if m:
            entries[int(m.group(1))] = "down" if m.group(2) in ("resample", "time_conv") else "res"
    levels, out, blocks = [], None, 0
    for n in sorted(entries):
        if entries[n] == "res":
            out = need(f"encoder.downsamples.{n}.residual.2.weight")[0]
            blocks += 1
        else:
            levels.append((out, blocks, f"encoder.downsamples.{n}.time_conv.weight" in keys))
            blocks = 0
    levels.append((out, blocks, False))
    return levels, need("decoder.upsamples.0.residual.2.weight")[0]


def _dim_mult(levels, base_dim: int) -> tuple[int, ...]:
    if not levels or any(o is None or b == 0 for o, b, _ in levels):
        raise MlxVideoError("the VAE checkpoint's encoder levels cannot be read from its keys")
    if len({b for _, b, _ in levels}) != 1:
        raise MlxVideoError("the VAE checkpoint's encoder levels have different numbers of residual blocks")
    if any(o % base_dim for o, _, _ in levels):
        raise MlxVideoError("the VAE checkpoint's level widths are not multiples of its base width")
    return tuple(o // base_dim for o, _, _ in levels)


def _latent_statistics(z_dim: int):
    if z_dim == 16:
        return WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    if z_dim == 48:
        return WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
    raise MlxVideoError(
        f"the VAE has {z_dim} latent channels; the published latent statistics exist for 16 (Wan 2.1 VAE) and "
        "48 (Wan 2.2 VAE) only"
    )
