"""Mochi 1 preview checkpoints onto our modules: the transformer (`MochiTransformer`), the VAE (`MochiVAE`)
and the T5-v1.1-XXL text encoder (`T5Encoder`).

Formats:

* diffusers (`MochiTransformer3DModel`, `AutoencoderKLMochi`) and transformers (`T5EncoderModel`);
* the official genmo release: `dit.safetensors` (also ComfyUI's `mochi_preview_*.safetensors`, which use the
  same names), `decoder.safetensors` and `encoder.safetensors`.

Our modules keep the official fused q|k|v projections (`attn.qkv_x`, `attn.qkv_y`, the VAE encoder's
`attentions.N.qkv`), so the official names map one to one; diffusers' separate q/k/v map onto *part keys*
`name#0/1/2` which `fuse_parts` (mlx_video/families/hunyuan/keys.py, the house convention) concatenates along the output axis.

Transforms: torch convolutions to channels-last (Conv3d (O, I, kt, kh, kw) -> (O, kt, kh, kw, I)), the 1x1x1 conv
and the kernel == stride patch conv to linears, and `swap_halves` for the two official tensors whose output halves
diffusers (and we) store the other way round: the SwiGLU `w1` ([gate | proj] -> [proj | gate]) and the final
layer's modulation ([shift | scale] -> [scale | shift]).
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx

from mlx_video.families.mochi.config import MochiTransformerConfig, MochiVAEConfig

from mlx_video.convert.rules import PART_SEPARATOR, KeyMap, Rule, conv3d_channels_last, swap_halves
from mlx_video.convert.rules import convert_weights as _convert_and_fuse

_WB = r"(weight|bias)"


# ---------------------------------------------------------------------------------------------------
# transforms


def conv2d_patch_to_linear(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, kh, kw) with kernel == stride -> Linear weight (O, kh*kw*I)."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv1x1_to_linear(w: mx.array) -> mx.array:
    """torch 1x1(x1) conv weight (O, I, 1, ...) -> Linear weight (O, I); a 2-D weight passes unchanged."""
    if any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"expected a 1x1 convolution, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1])


MOCHI_TRANSFORMS = {
    "conv2d_patch_to_linear": conv2d_patch_to_linear,
    "conv3d_channels_last": conv3d_channels_last,
    "conv1x1_to_linear": conv1x1_to_linear,
    "swap_halves": swap_halves,
}


def _qkv_parts(source: str, target: str) -> list[Rule]:
    """Rules sending `source` with {x} in q/k/v onto the parts 0/1/2 of the fused `target`."""
    return [Rule(source.format(x=x), f"{target}{PART_SEPARATOR}{i}") for i, x in enumerate("qkv")]


def convert_weights(keymap: KeyMap, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Rename (and transform) a whole state dict, then fuse part keys; refuses unknown keys (listing them),
    two sources for one target, and incomplete parts."""
    unknown = keymap.unknown_keys(weights)
    if unknown:
        raise KeyError(f"keys that no rule maps: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return _convert_and_fuse(keymap, weights)


# ---------------------------------------------------------------------------------------------------
# transformer

_DB = r"transformer_blocks\.(\d+)"

DIFFUSERS_TRANSFORMER = KeyMap(
    [
        Rule(r"patch_embed\.proj\.weight", "patch_embed.weight", "conv2d_patch_to_linear"),
        Rule(r"patch_embed\.proj\.bias", "patch_embed.bias"),
        Rule(rf"time_embed\.timestep_embedder\.linear_([12])\.{_WB}", r"time_embed.linear_\1.\2"),
        Rule(rf"time_embed\.pooler\.(to_kv|to_q|to_out)\.{_WB}", r"text_pool.\1.\2"),
        Rule(rf"time_embed\.caption_proj\.{_WB}", r"text_proj.\1"),
        Rule(r"pos_frequencies", "pos_frequencies"),
        Rule(rf"{_DB}\.norm1\.linear\.{_WB}", r"blocks.\1.mod_x.\2"),
        # linear_1 is the last block's scale-only text modulation.
        Rule(rf"{_DB}\.norm1_context\.linear(?:_1)?\.{_WB}", r"blocks.\1.mod_y.\2"),
        *_qkv_parts(rf"{_DB}\.attn1\.to_{{x}}\.weight", r"blocks.\1.attn.qkv_x.weight"),
        *_qkv_parts(rf"{_DB}\.attn1\.add_{{x}}_proj\.weight", r"blocks.\1.attn.qkv_y.weight"),
        Rule(rf"{_DB}\.attn1\.norm_([qk])\.weight", r"blocks.\1.attn.norm_\2_x.weight"),
        Rule(rf"{_DB}\.attn1\.norm_added_([qk])\.weight", r"blocks.\1.attn.norm_\2_y.weight"),
        Rule(rf"{_DB}\.attn1\.to_out\.0\.{_WB}", r"blocks.\1.attn.proj_x.\2"),
        Rule(rf"{_DB}\.attn1\.to_add_out\.{_WB}", r"blocks.\1.attn.proj_y.\2"),
        Rule(rf"{_DB}\.ff\.net\.0\.proj\.weight", r"blocks.\1.mlp_x.w1.weight"),
        Rule(rf"{_DB}\.ff\.net\.2\.weight", r"blocks.\1.mlp_x.w2.weight"),
        Rule(rf"{_DB}\.ff_context\.net\.0\.proj\.weight", r"blocks.\1.mlp_y.w1.weight"),
        Rule(rf"{_DB}\.ff_context\.net\.2\.weight", r"blocks.\1.mlp_y.w2.weight"),
        Rule(rf"norm_out\.linear\.{_WB}", r"final_layer.mod.\1"),
        Rule(rf"proj_out\.{_WB}", r"final_layer.linear.\1"),
    ],
    transforms=MOCHI_TRANSFORMS,
)

_OB = r"blocks\.(\d+)"

OFFICIAL_TRANSFORMER = KeyMap(
    [
        Rule(r"x_embedder\.proj\.weight", "patch_embed.weight", "conv2d_patch_to_linear"),
        Rule(r"x_embedder\.proj\.bias", "patch_embed.bias"),
        Rule(rf"t_embedder\.mlp\.0\.{_WB}", r"time_embed.linear_1.\1"),
        Rule(rf"t_embedder\.mlp\.2\.{_WB}", r"time_embed.linear_2.\1"),
        Rule(rf"t5_y_embedder\.(to_kv|to_q|to_out)\.{_WB}", r"text_pool.\1.\2"),
        Rule(rf"t5_yproj\.{_WB}", r"text_proj.\1"),
        Rule(r"pos_frequencies", "pos_frequencies"),
        Rule(rf"{_OB}\.mod_([xy])\.{_WB}", r"blocks.\1.mod_\2.\3"),
        Rule(rf"{_OB}\.attn\.qkv_([xy])\.weight", r"blocks.\1.attn.qkv_\2.weight"),
        Rule(rf"{_OB}\.attn\.([qk])_norm_([xy])\.weight", r"blocks.\1.attn.norm_\2_\3.weight"),
        Rule(rf"{_OB}\.attn\.proj_([xy])\.{_WB}", r"blocks.\1.attn.proj_\2.\3"),
        Rule(rf"{_OB}\.mlp_([xy])\.w1\.weight", r"blocks.\1.mlp_\2.w1.weight", "swap_halves"),
        Rule(rf"{_OB}\.mlp_([xy])\.w2\.weight", r"blocks.\1.mlp_\2.w2.weight"),
        Rule(rf"final_layer\.mod\.{_WB}", r"final_layer.mod.\1", "swap_halves"),
        Rule(rf"final_layer\.linear\.{_WB}", r"final_layer.linear.\1"),
    ],
    transforms=MOCHI_TRANSFORMS,
)


def transformer_config_from_diffusers(config_json: dict) -> MochiTransformerConfig:
    """Our config from a diffusers `MochiTransformer3DModel` config.json."""
    name = config_json.get("_class_name", "MochiTransformer3DModel")
    if name != "MochiTransformer3DModel":
        raise ValueError(f"expected a MochiTransformer3DModel config, got {name!r}")
    if config_json.get("qk_norm", "rms_norm") != "rms_norm":
        raise ValueError(f"qk_norm={config_json['qk_norm']!r} is not supported (Mochi uses rms_norm)")
    if config_json.get("activation_fn", "swiglu") != "swiglu":
        raise ValueError(f"activation_fn={config_json['activation_fn']!r} is not supported (Mochi uses swiglu)")
    d = MochiTransformerConfig()
    in_channels = config_json.get("in_channels", d.in_channels)
    return MochiTransformerConfig.with_widths(
        num_layers=config_json.get("num_layers", d.num_layers),
        num_heads=config_json.get("num_attention_heads", d.num_heads),
        head_dim=config_json.get("attention_head_dim", d.head_dim),
        text_dim=config_json.get("pooled_projection_dim", d.text_dim),
        in_channels=in_channels,
        out_channels=config_json.get("out_channels") or in_channels,
        patch_size=config_json.get("patch_size", d.patch_size),
        t5_dim=config_json.get("text_embed_dim", d.t5_dim),
        t5_length=config_json.get("max_sequence_length", d.t5_length),
        freq_dim=config_json.get("time_embed_dim", d.freq_dim),
    )


# ---------------------------------------------------------------------------------------------------
# VAE

_PATH = r"((?:decoder|encoder)\.(?:block_in|block_out|up_blocks\.\d+|down_blocks\.\d+))"

DIFFUSERS_VAE = KeyMap(
    [
        # resnets, attention norms and attentions anywhere in either half
        Rule(rf"{_PATH}\.resnets\.(\d+)\.(norm[12])\.norm_layer\.{_WB}", r"\1.resnets.\2.\3.\4"),
        Rule(rf"{_PATH}\.resnets\.(\d+)\.(conv[12])\.conv\.weight", r"\1.resnets.\2.\3.weight", "conv3d_channels_last"),
        Rule(rf"{_PATH}\.resnets\.(\d+)\.(conv[12])\.conv\.bias", r"\1.resnets.\2.\3.bias"),
        Rule(rf"{_PATH}\.norms\.(\d+)\.norm_layer\.{_WB}", r"\1.norms.\2.\3"),
        *_qkv_parts(rf"{_PATH}\.attentions\.(\d+)\.to_{{x}}\.weight", r"\1.attentions.\2.qkv.weight"),
        Rule(rf"{_PATH}\.attentions\.(\d+)\.to_out\.0\.{_WB}", r"\1.attentions.\2.to_out.\3"),
        # decoder
        Rule(r"decoder\.conv_in\.weight", "decoder.conv_in.weight", "conv1x1_to_linear"),
        Rule(r"decoder\.conv_in\.bias", "decoder.conv_in.bias"),
        Rule(rf"decoder\.up_blocks\.(\d+)\.proj\.{_WB}", r"decoder.up_blocks.\1.proj.\2"),
        Rule(rf"decoder\.proj_out\.{_WB}", r"decoder.proj_out.\1"),
        # encoder
        Rule(rf"encoder\.proj_in\.{_WB}", r"encoder.proj_in.\1"),
        Rule(
            r"encoder\.down_blocks\.(\d+)\.conv_in\.conv\.weight",
            r"encoder.down_blocks.\1.conv_in.weight",
            "conv3d_channels_last",
        ),
        Rule(r"encoder\.down_blocks\.(\d+)\.conv_in\.conv\.bias", r"encoder.down_blocks.\1.conv_in.bias"),
        Rule(rf"encoder\.norm_out\.norm_layer\.{_WB}", r"encoder.norm_out.\1"),
        Rule(r"encoder\.proj_out\.weight", "encoder.proj_out.weight"),
    ],
    transforms=MOCHI_TRANSFORMS,
)

# The official files number their modules by position in the published layout (layers_per_block 3, 3, 4, 6, 3;
# three resampling stages), so these maps are for that layout only.
_STACK = {"0": "norm1", "2": "conv1", "3": "norm2", "5": "conv2"}
_PUBLISHED_LAYERS = MochiVAEConfig().layers_per_block


def _official_resnet_rules(src: str, dst: str) -> list[Rule]:
    rules = []
    for index, name in _STACK.items():
        if name.startswith("conv"):
            rules.append(Rule(rf"{src}\.stack\.{index}\.weight", f"{dst}.{name}.weight", "conv3d_channels_last"))
            rules.append(Rule(rf"{src}\.stack\.{index}\.bias", f"{dst}.{name}.bias"))
        else:
            rules.append(Rule(rf"{src}\.stack\.{index}\.{_WB}", rf"{dst}.{name}.\1"))
    return rules


def _official_attention_rules(src: str, dst: str, i: int) -> list[Rule]:
    return [
        Rule(rf"{src}\.attn_block\.attn\.qkv\.weight", f"{dst}.attentions.{i}.qkv.weight"),
        Rule(rf"{src}\.attn_block\.attn\.out\.{_WB}", rf"{dst}.attentions.{i}.to_out.\1"),
        Rule(rf"{src}\.attn_block\.norm\.{_WB}", rf"{dst}.norms.{i}.\1"),
    ]


def _official_decoder_rules() -> list[Rule]:
    n = _PUBLISHED_LAYERS
    rules = [
        Rule(r"blocks\.0\.0\.weight", "decoder.conv_in.weight", "conv1x1_to_linear"),
        Rule(r"blocks\.0\.0\.bias", "decoder.conv_in.bias"),
    ]
    for i in range(n[-1]):
        rules += _official_resnet_rules(rf"blocks\.0\.{i + 1}", f"decoder.block_in.resnets.{i}")
    for b, count in enumerate(reversed(n[1:-1])):
        for i in range(count):
            rules += _official_resnet_rules(rf"blocks\.{b + 1}\.blocks\.{i}", f"decoder.up_blocks.{b}.resnets.{i}")
        rules.append(Rule(rf"blocks\.{b + 1}\.proj\.{_WB}", rf"decoder.up_blocks.{b}.proj.\1"))
    for i in range(n[0]):
        rules += _official_resnet_rules(rf"blocks\.4\.{i}", f"decoder.block_out.resnets.{i}")
    rules.append(Rule(rf"output_proj\.{_WB}", r"decoder.proj_out.\1"))
    return rules


def _official_encoder_rules() -> list[Rule]:
    n = _PUBLISHED_LAYERS
    rules = [Rule(rf"layers\.0\.{_WB}", r"encoder.proj_in.\1")]
    for i in range(n[0]):  # block_in has no attention in the published layout
        rules += _official_resnet_rules(rf"layers\.{i + 1}", f"encoder.block_in.resnets.{i}")
    first_down = 1 + n[0]
    for b, count in enumerate(n[1:-1]):
        src = rf"layers\.{first_down + b}\.layers"
        rules.append(Rule(rf"{src}\.0\.weight", f"encoder.down_blocks.{b}.conv_in.weight", "conv3d_channels_last"))
        rules.append(Rule(rf"{src}\.0\.bias", f"encoder.down_blocks.{b}.conv_in.bias"))
        for i in range(count):
            rules += _official_resnet_rules(rf"{src}\.{i + 1}", f"encoder.down_blocks.{b}.resnets.{i}")
            rules += _official_attention_rules(rf"{src}\.{i + 1}", f"encoder.down_blocks.{b}", i)
    first_out = first_down + len(n) - 2
    for i in range(n[-1]):
        rules += _official_resnet_rules(rf"layers\.{first_out + i}", f"encoder.block_out.resnets.{i}")
        rules += _official_attention_rules(rf"layers\.{first_out + i}", "encoder.block_out", i)
    rules.append(Rule(rf"output_norm\.{_WB}", r"encoder.norm_out.\1"))
    rules.append(Rule(r"output_proj\.weight", "encoder.proj_out.weight"))
    return rules


# decoder.safetensors and encoder.safetensors; each maps onto the `decoder.` / `encoder.` half of MochiVAE.
OFFICIAL_VAE_DECODER = KeyMap(_official_decoder_rules(), transforms=MOCHI_TRANSFORMS)
OFFICIAL_VAE_ENCODER = KeyMap(_official_encoder_rules(), transforms=MOCHI_TRANSFORMS)


def vae_config_from_diffusers(config_json: dict) -> MochiVAEConfig:
    """Our config from a diffusers `AutoencoderKLMochi` config.json."""
    name = config_json.get("_class_name", "AutoencoderKLMochi")
    if name != "AutoencoderKLMochi":
        raise ValueError(f"expected an AutoencoderKLMochi config, got {name!r}")
    if config_json.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"act_fn={config_json['act_fn']!r} is not supported (Mochi uses silu)")
    d = MochiVAEConfig()

    def tup(key, default):
        value = config_json.get(key)
        return tuple(value) if value is not None else default

    return MochiVAEConfig(
        in_channels=config_json.get("in_channels", d.in_channels),
        out_channels=config_json.get("out_channels", d.out_channels),
        latent_channels=config_json.get("latent_channels", d.latent_channels),
        encoder_channels=tup("encoder_block_out_channels", d.encoder_channels),
        decoder_channels=tup("decoder_block_out_channels", d.decoder_channels),
        layers_per_block=tup("layers_per_block", d.layers_per_block),
        temporal_expansions=tup("temporal_expansions", d.temporal_expansions),
        spatial_expansions=tup("spatial_expansions", d.spatial_expansions),
        encoder_attention=tup("add_attention_block", d.encoder_attention),
        latents_mean=tup("latents_mean", d.latents_mean),
        latents_std=tup("latents_std", d.latents_std),
        scaling_factor=config_json.get("scaling_factor", d.scaling_factor),
    )


# ---------------------------------------------------------------------------------------------------
# T5-v1.1-XXL (transformers T5EncoderModel). ComfyUI's t5xxl files (`t5xxl_fp16`, `t5xxl_fp8_e4m3fn_scaled`) use the
# same names: they are the state dict of comfy/text_encoders/t5.py `T5` (`shared`, `encoder.block.N.layer.0.
# SelfAttention.q|k|v|o` with `relative_attention_bias` in block 0 only, `layer.0/1.layer_norm`, `layer.1.DenseReluDense.
# wi_0|wi_1|wo`, `encoder.final_layer_norm`; no `encoder.embed_tokens`). The fp8 file's `scaled_fp8` / `scale_weight` /
# `scale_input` are folded in by formats.ComponentSource. Which layers that file stores in fp8 was not read (inferred:
# the block linears); any choice converts.

_T5_BLOCK = r"encoder\.block\.(\d+)\.layer"

TRANSFORMERS_T5 = KeyMap(
    [
        Rule(r"shared\.weight", "token_embedding.weight"),
        Rule(r"encoder\.embed_tokens\.weight", "token_embedding.weight"),
        # T5 keeps one relative-position table, in the first layer, shared by all layers.
        Rule(_T5_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", "pos_bias.weight"),
        Rule(_T5_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
        Rule(_T5_BLOCK + r"\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
        Rule(_T5_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
        Rule(_T5_BLOCK + r"\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.weight"),
        Rule(_T5_BLOCK + r"\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
        Rule(_T5_BLOCK + r"\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
        Rule(r"encoder\.final_layer_norm\.weight", "norm.weight"),
    ],
    ignore=[r"decoder\..*", r"lm_head\.weight"],
)


def convert_t5_weights(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """transformers T5 state dict -> T5Encoder names; the tied embedding stored twice is kept once."""
    if "shared.weight" in weights and "encoder.embed_tokens.weight" in weights:
        weights = {k: v for k, v in weights.items() if k != "encoder.embed_tokens.weight"}
    return convert_weights(TRANSFORMERS_T5, weights)
