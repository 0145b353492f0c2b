"""HunyuanVideo 1.5 VAE checkpoints onto `Hunyuan15VAE`, and its config from either release's config.json.

Two layouts hold the same tensors:
  - diffusers (`hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*`, `vae/`): `AutoencoderKLHunyuanVideo15`'s
    names, which ours follow (`down_blocks.N.resnets.M`, `mid_block.attentions.0.to_q`, ...);
  - the official release (`tencent/HunyuanVideo-1.5`, `vae/diffusion_pytorch_model.safetensors`):
    `AutoencoderKLConv3D`'s names in `hyvideo/models/autoencoders/hunyuanvideo_15_vae.py` (`down.N.block.M`,
    `down.N.downsample`, `mid.block_1`, `mid.attn_1.q`, `nin_shortcut`, ...), as diffusers'
    `scripts/convert_hunyuan_video1_5_to_diffusers.py` renames them.
Tensors: 3x3x3 convolutions go channels-last, the 1x1x1 ones (attention projections, channel-changing
shortcuts) become linear weights, RMS-norm gains (C, 1, 1, 1) become (C,).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule, convert_weights
from mlx_video.families.hunyuan15.vae import Hunyuan15VAEConfig


def conv1x1x1_to_linear(w: mx.array) -> mx.array:
    """torch Conv3d 1x1x1 weight (O, I, 1, 1, 1) -> Linear weight (O, I)."""
    if w.ndim != 5 or w.shape[2:] != (1, 1, 1):
        raise ValueError(f"expected a 1x1x1 Conv3d weight, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[:2])


def channel_first_gain(w: mx.array) -> mx.array:
    """RMS-norm gain (C, 1, 1, 1) -> (C,)."""
    if any(d != 1 for d in w.shape[1:]):
        raise ValueError(f"expected a gain of shape (C, 1, 1, 1), got {tuple(w.shape)}")
    return w.reshape(-1)


TRANSFORMS = {"conv1x1x1_to_linear": conv1x1x1_to_linear, "channel_first_gain": channel_first_gain}

_SIDE = r"(?P<side>encoder|decoder)"
_ENC_LEVEL = r"encoder\.(?P<way>down)\.(?P<level>\d+)"
_DEC_LEVEL = r"decoder\.(?P<way>up)\.(?P<level>\d+)"


# ComfyUI's single VAE file (Comfy-Org/HunyuanVideo_1.5_repackaged, split_files/vae/hunyuanvideo15_vae_fp16.safetensors)
# is the state dict of comfy/ldm/hunyuan_video/vae_refiner.py, the official names but for the 1x1x1 shortcut, which
# ComfyUI's ResnetBlock builds with its VideoConv3d wrapper: `nin_shortcut.conv.weight` for `nin_shortcut.weight`.
_NIN = r"nin_shortcut(?:\.conv)?"


def _resnet_rules(source: str, target: str, shortcut: str) -> list[Rule]:
    return [
        Rule(rf"{source}\.(?P<norm>norm1|norm2)\.gamma", rf"{target}.\g<norm>.gamma", "channel_first_gain"),
        Rule(rf"{source}\.(?P<conv>conv1|conv2)\.conv\.weight", rf"{target}.\g<conv>.conv.weight",
             "conv3d_channels_last"),
        Rule(rf"{source}\.(?P<conv>conv1|conv2)\.conv\.bias", rf"{target}.\g<conv>.conv.bias"),
        Rule(rf"{source}\.{shortcut}\.weight", rf"{target}.conv_shortcut.weight", "conv1x1x1_to_linear"),
        Rule(rf"{source}\.{shortcut}\.bias", rf"{target}.conv_shortcut.bias"),
    ]


def _attention_rules(source: str, target: str, projections: dict[str, str]) -> list[Rule]:
    rules = [Rule(rf"{source}\.norm\.gamma", rf"{target}.norm.gamma", "channel_first_gain")]
    for theirs, ours in projections.items():
        rules += [Rule(rf"{source}\.{theirs}\.weight", rf"{target}.{ours}.weight", "conv1x1x1_to_linear"),
                  Rule(rf"{source}\.{theirs}\.bias", rf"{target}.{ours}.bias")]
    return rules


def _conv_rules(source: str, target: str) -> list[Rule]:
    return [Rule(rf"{source}\.conv\.weight", rf"{target}.conv.weight", "conv3d_channels_last"),
            Rule(rf"{source}\.conv\.bias", rf"{target}.conv.bias")]


def _side_rules() -> list[Rule]:
    """conv_in, conv_out and norm_out of either side: the same names in both layouts."""
    return [*_conv_rules(rf"{_SIDE}\.(?P<conv>conv_in|conv_out)", r"\g<side>.\g<conv>"),
            Rule(rf"{_SIDE}\.norm_out\.gamma", r"\g<side>.norm_out.gamma", "channel_first_gain")]


_BLOCKS = rf"{_SIDE}\.(?P<blocks>down_blocks|up_blocks)\.(?P<level>\d+)"

DIFFUSERS_VAE = KeyMap(
    [
        *_resnet_rules(rf"{_BLOCKS}\.resnets\.(?P<i>\d+)", r"\g<side>.\g<blocks>.\g<level>.resnets.\g<i>",
                       "conv_shortcut"),
        *_resnet_rules(rf"{_SIDE}\.mid_block\.resnets\.(?P<i>[01])", r"\g<side>.mid_block.resnets.\g<i>",
                       "conv_shortcut"),
        *_attention_rules(rf"{_SIDE}\.mid_block\.attentions\.0", r"\g<side>.mid_block.attentions.0",
                          {p: p for p in ("to_q", "to_k", "to_v", "proj_out")}),
        *_conv_rules(rf"{_BLOCKS}\.(?P<s>downsamplers|upsamplers)\.0\.conv",
                     r"\g<side>.\g<blocks>.\g<level>.\g<s>.0.conv"),
        *_side_rules(),
    ],
    transforms=TRANSFORMS,
)

OFFICIAL_VAE = KeyMap(
    [
        *_resnet_rules(rf"{_ENC_LEVEL}\.block\.(?P<i>\d+)", r"encoder.down_blocks.\g<level>.resnets.\g<i>", _NIN),
        *_resnet_rules(rf"{_DEC_LEVEL}\.block\.(?P<i>\d+)", r"decoder.up_blocks.\g<level>.resnets.\g<i>", _NIN),
        *_resnet_rules(rf"{_SIDE}\.mid\.block_1", r"\g<side>.mid_block.resnets.0", _NIN),
        *_resnet_rules(rf"{_SIDE}\.mid\.block_2", r"\g<side>.mid_block.resnets.1", _NIN),
        *_attention_rules(rf"{_SIDE}\.mid\.attn_1", r"\g<side>.mid_block.attentions.0",
                          {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "proj_out"}),
        *_conv_rules(rf"{_ENC_LEVEL}\.downsample\.conv", r"encoder.down_blocks.\g<level>.downsamplers.0.conv"),
        *_conv_rules(rf"{_DEC_LEVEL}\.upsample\.conv", r"decoder.up_blocks.\g<level>.upsamplers.0.conv"),
        *_side_rules(),
    ],
    transforms=TRANSFORMS,
)


def keymap_for(keys) -> KeyMap:
    """The layout a VAE checkpoint's keys are in: official names have `encoder.down.`, diffusers'
    `encoder.down_blocks.`."""
    return OFFICIAL_VAE if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys) else DIFFUSERS_VAE


def convert_vae(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Either layout's tensors -> ours (unknown keys refused)."""
    keymap = keymap_for(weights)
    unknown = keymap.unknown_keys(weights)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not HunyuanVideo 1.5 VAE keys, e.g. {unknown[0]}")
    return convert_weights(keymap, weights)


# config.json fields of each layout -> ours, where the names differ (diffusers' `AutoencoderKLHunyuanVideo15`,
# the official `AutoencoderKLConv3D`).
CONFIG_FIELD_NAMES = {
    "spatial_compression_ratio": "spatial_compression",
    "temporal_compression_ratio": "temporal_compression",
    "ffactor_spatial": "spatial_compression",
    "ffactor_temporal": "temporal_compression",
}
CONFIG_CLASSES = ("AutoencoderKLHunyuanVideo15", "AutoencoderKLConv3D")


def vae_config_from_json(config_json: dict) -> Hunyuan15VAEConfig:
    """Our config from a diffusers or official vae/config.json (absent fields: the published values)."""
    name = config_json.get("_class_name", CONFIG_CLASSES[0])
    if name not in CONFIG_CLASSES:
        raise ValueError(f"expected a HunyuanVideo 1.5 VAE config ({' or '.join(CONFIG_CLASSES)}), got {name!r}")
    if config_json.get("shift_factor"):
        raise ValueError(f"shift_factor={config_json['shift_factor']!r} is not supported (the release has none)")
    d = {}
    for key, value in config_json.items():
        if value is not None:
            d[CONFIG_FIELD_NAMES.get(key, key)] = value
    return Hunyuan15VAEConfig.from_dict(d)
