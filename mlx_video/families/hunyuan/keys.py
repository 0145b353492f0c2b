"""HunyuanVideo checkpoints onto our modules: the transformer (official and diffusers names), the VAE, the
LLaVA-Llama-3 text encoder (onto mlx_lm's Llama) and CLIP-L.

Our transformer keeps the official fused layouts (one q|k|v projection per stream, one q|k|v|mlp `linear1` per
single-stream block), so the official names map one to one. diffusers splits those projections; its pieces
map onto *part keys* `name#i` (the i-th slice along the output axis), which `fuse_parts` concatenates once all
tensors are converted. The final layer's modulation is stored in the official (shift, scale) order; diffusers
stores (scale, shift), hence the `swap_halves` transform.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_video.families.hunyuan.config import HunyuanTransformerConfig, HunyuanVAEConfig
from mlx_video.image_encoders.clip_vision import TRANSFORMERS_CLIP_VISION

from mlx_video.convert.rules import (  # noqa: F401  (re-exported: the fused-parts helpers and transforms live in rules.py)
    PART_SEPARATOR,
    KeyMap,
    Rule,
    conv3d_channels_last,
    convert_weights,
    fuse_parts,
    is_part_key,
    swap_halves,
)

_WB = r"(weight|bias)"


def conv1x1x1_to_linear(w: mx.array) -> mx.array:
    """torch 1x1x1 Conv3d weight (O, I, 1, 1, 1) -> Linear weight (O, I)."""
    if w.ndim != 5 or any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"expected a 1x1x1 Conv3d weight, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1])


_TRANSFORMS = {"swap_halves": swap_halves, "conv3d_channels_last": conv3d_channels_last,
               "conv1x1x1_to_linear": conv1x1x1_to_linear}


# --- transformer -------------------------------------------------------------------------------------------

_R = r"txt_in\.individual_token_refiner\.blocks\.(\d+)"
_D = r"double_blocks\.(\d+)"
_S = r"single_blocks\.(\d+)"

OFFICIAL_TRANSFORMER = KeyMap(
    [
        Rule(r"img_in\.proj\.weight", "img_in.weight", "conv3d_patch_to_linear"),
        Rule(r"img_in\.proj\.bias", "img_in.bias"),
        Rule(rf"(time_in|guidance_in)\.mlp\.0\.{_WB}", r"\1.linear_1.\2"),
        Rule(rf"(time_in|guidance_in)\.mlp\.2\.{_WB}", r"\1.linear_2.\2"),
        Rule(rf"vector_in\.in_layer\.{_WB}", r"vector_in.linear_1.\1"),
        Rule(rf"vector_in\.out_layer\.{_WB}", r"vector_in.linear_2.\1"),
        Rule(rf"txt_in\.input_embedder\.{_WB}", r"txt_in.input_embedder.\1"),
        Rule(rf"txt_in\.t_embedder\.mlp\.0\.{_WB}", r"txt_in.t_embedder.linear_1.\1"),
        Rule(rf"txt_in\.t_embedder\.mlp\.2\.{_WB}", r"txt_in.t_embedder.linear_2.\1"),
        Rule(rf"txt_in\.c_embedder\.linear_([12])\.{_WB}", r"txt_in.c_embedder.linear_\1.\2"),
        Rule(rf"{_R}\.(norm1|norm2|self_attn_qkv|self_attn_proj)\.{_WB}", r"txt_in.blocks.\1.\2.\3"),
        Rule(rf"{_R}\.mlp\.(fc1|fc2)\.{_WB}", r"txt_in.blocks.\1.mlp.\2.\3"),
        Rule(rf"{_R}\.adaLN_modulation\.1\.{_WB}", r"txt_in.blocks.\1.adaLN_modulation.\2"),
        Rule(rf"{_D}\.(img|txt)_mod\.linear\.{_WB}", r"double_blocks.\1.\2.mod.\3"),
        Rule(rf"{_D}\.(img|txt)_attn_(qkv|proj)\.{_WB}", r"double_blocks.\1.\2.attn_\3.\4"),
        Rule(rf"{_D}\.(img|txt)_attn_(q|k)_norm\.weight", r"double_blocks.\1.\2.attn_\3_norm.weight"),
        Rule(rf"{_D}\.(img|txt)_mlp\.(fc1|fc2)\.{_WB}", r"double_blocks.\1.\2.mlp.\3.\4"),
        Rule(rf"{_S}\.(linear1|linear2)\.{_WB}", r"single_blocks.\1.\2.\3"),
        Rule(rf"{_S}\.(q_norm|k_norm)\.weight", r"single_blocks.\1.\2.weight"),
        Rule(rf"{_S}\.modulation\.linear\.{_WB}", r"single_blocks.\1.modulation.\2"),
        Rule(rf"final_layer\.linear\.{_WB}", r"final_layer.linear.\1"),
        Rule(rf"final_layer\.adaLN_modulation\.1\.{_WB}", r"final_layer.adaLN_modulation.\1"),
    ],
    transforms=_TRANSFORMS,
)

# ComfyUI loads the official names, with or without its `model.diffusion_model.` prefix (3P: ComfyUI's
# model_detection looks for the official `txt_in.individual_token_refiner.blocks.0.norm1.weight` under an
# optional prefix). Not verified against a Comfy-Org file header.
COMFYUI_TRANSFORMER = KeyMap(
    [Rule(rf"(?:model\.diffusion_model\.)?(?:{pattern.pattern})", rule.target, rule.transform)
     for pattern, rule in OFFICIAL_TRANSFORMER.rules],
    transforms=_TRANSFORMS,
)

_DR = r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)"
_DD = r"transformer_blocks\.(\d+)"
_DS = r"single_transformer_blocks\.(\d+)"
_QKV = {"q": 0, "k": 1, "v": 2}


def _qkv_rules(source: str, target: str) -> list[Rule]:
    """Rules sending `source` with {x} in q/k/v onto the parts 0/1/2 of `target`."""
    return [Rule(source.format(x=x), f"{target}{PART_SEPARATOR}{i}") for x, i in _QKV.items()]


DIFFUSERS_TRANSFORMER = KeyMap(
    [
        Rule(r"x_embedder\.proj\.weight", "img_in.weight", "conv3d_patch_to_linear"),
        Rule(r"x_embedder\.proj\.bias", "img_in.bias"),
        Rule(rf"time_text_embed\.timestep_embedder\.linear_([12])\.{_WB}", r"time_in.linear_\1.\2"),
        Rule(rf"time_text_embed\.guidance_embedder\.linear_([12])\.{_WB}", r"guidance_in.linear_\1.\2"),
        Rule(rf"time_text_embed\.text_embedder\.linear_([12])\.{_WB}", r"vector_in.linear_\1.\2"),
        Rule(rf"context_embedder\.proj_in\.{_WB}", r"txt_in.input_embedder.\1"),
        Rule(
            rf"context_embedder\.time_text_embed\.timestep_embedder\.linear_([12])\.{_WB}",
            r"txt_in.t_embedder.linear_\1.\2",
        ),
        Rule(
            rf"context_embedder\.time_text_embed\.text_embedder\.linear_([12])\.{_WB}",
            r"txt_in.c_embedder.linear_\1.\2",
        ),
        *_qkv_rules(rf"{_DR}\.attn\.to_{{x}}\.{_WB}", r"txt_in.blocks.\1.self_attn_qkv.\2"),
        Rule(rf"{_DR}\.attn\.to_out\.0\.{_WB}", r"txt_in.blocks.\1.self_attn_proj.\2"),
        Rule(rf"{_DR}\.(norm1|norm2)\.{_WB}", r"txt_in.blocks.\1.\2.\3"),
        Rule(rf"{_DR}\.ff\.net\.0\.proj\.{_WB}", r"txt_in.blocks.\1.mlp.fc1.\2"),
        Rule(rf"{_DR}\.ff\.net\.2\.{_WB}", r"txt_in.blocks.\1.mlp.fc2.\2"),
        Rule(rf"{_DR}\.norm_out\.linear\.{_WB}", r"txt_in.blocks.\1.adaLN_modulation.\2"),
        Rule(rf"{_DD}\.norm1\.linear\.{_WB}", r"double_blocks.\1.img.mod.\2"),
        Rule(rf"{_DD}\.norm1_context\.linear\.{_WB}", r"double_blocks.\1.txt.mod.\2"),
        *_qkv_rules(rf"{_DD}\.attn\.to_{{x}}\.{_WB}", r"double_blocks.\1.img.attn_qkv.\2"),
        *_qkv_rules(rf"{_DD}\.attn\.add_{{x}}_proj\.{_WB}", r"double_blocks.\1.txt.attn_qkv.\2"),
        Rule(rf"{_DD}\.attn\.norm_(q|k)\.weight", r"double_blocks.\1.img.attn_\2_norm.weight"),
        Rule(rf"{_DD}\.attn\.norm_added_(q|k)\.weight", r"double_blocks.\1.txt.attn_\2_norm.weight"),
        Rule(rf"{_DD}\.attn\.to_out\.0\.{_WB}", r"double_blocks.\1.img.attn_proj.\2"),
        Rule(rf"{_DD}\.attn\.to_add_out\.{_WB}", r"double_blocks.\1.txt.attn_proj.\2"),
        Rule(rf"{_DD}\.ff\.net\.0\.proj\.{_WB}", r"double_blocks.\1.img.mlp.fc1.\2"),
        Rule(rf"{_DD}\.ff\.net\.2\.{_WB}", r"double_blocks.\1.img.mlp.fc2.\2"),
        Rule(rf"{_DD}\.ff_context\.net\.0\.proj\.{_WB}", r"double_blocks.\1.txt.mlp.fc1.\2"),
        Rule(rf"{_DD}\.ff_context\.net\.2\.{_WB}", r"double_blocks.\1.txt.mlp.fc2.\2"),
        *_qkv_rules(rf"{_DS}\.attn\.to_{{x}}\.{_WB}", r"single_blocks.\1.linear1.\2"),
        Rule(rf"{_DS}\.proj_mlp\.{_WB}", rf"single_blocks.\1.linear1.\2{PART_SEPARATOR}3"),
        Rule(rf"{_DS}\.proj_out\.{_WB}", r"single_blocks.\1.linear2.\2"),
        Rule(rf"{_DS}\.attn\.norm_(q|k)\.weight", r"single_blocks.\1.\2_norm.weight"),
        Rule(rf"{_DS}\.norm\.linear\.{_WB}", r"single_blocks.\1.modulation.\2"),
        Rule(rf"norm_out\.linear\.{_WB}", r"final_layer.adaLN_modulation.\1", "swap_halves"),
        Rule(rf"proj_out\.{_WB}", r"final_layer.linear.\1"),
    ],
    transforms=_TRANSFORMS,
)


def transformer_config_from_diffusers(config_json: dict) -> HunyuanTransformerConfig:
    """Our config from a diffusers `HunyuanVideoTransformer3DModel` config.json (T2V, or I2V by its
    `image_condition_type`)."""
    name = config_json.get("_class_name", "HunyuanVideoTransformer3DModel")
    if name != "HunyuanVideoTransformer3DModel":
        raise ValueError(f"expected a HunyuanVideoTransformer3DModel config, got {name!r}")
    if config_json.get("qk_norm", "rms_norm") != "rms_norm":
        raise ValueError(f"qk_norm={config_json['qk_norm']!r} is not supported (HunyuanVideo uses rms_norm)")
    d = HunyuanTransformerConfig()
    patch = config_json.get("patch_size", 2)
    in_channels = config_json.get("in_channels", d.in_channels)
    return HunyuanTransformerConfig(
        num_heads=config_json.get("num_attention_heads", d.num_heads),
        head_dim=config_json.get("attention_head_dim", d.head_dim),
        mlp_ratio=float(config_json.get("mlp_ratio", d.mlp_ratio)),
        num_double_blocks=config_json.get("num_layers", d.num_double_blocks),
        num_single_blocks=config_json.get("num_single_layers", d.num_single_blocks),
        num_refiner_blocks=config_json.get("num_refiner_layers", d.num_refiner_blocks),
        rope_axes=tuple(config_json.get("rope_axes_dim", d.rope_axes)),
        rope_theta=float(config_json.get("rope_theta", d.rope_theta)),
        patch_size=(config_json.get("patch_size_t", 1), patch, patch),
        in_channels=in_channels,
        out_channels=config_json.get("out_channels") or in_channels,
        text_dim=config_json.get("text_embed_dim", d.text_dim),
        pooled_dim=config_json.get("pooled_projection_dim", d.pooled_dim),
        guidance_embed=bool(config_json.get("guidance_embeds", d.guidance_embed)),
        image_condition=config_json.get("image_condition_type"),
    )


# --- VAE ---------------------------------------------------------------------------------------------------

_SIDE = r"(encoder|decoder)"
_BLOCK = r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)"
_RES = r"((?:encoder\.down_blocks|decoder\.up_blocks)\.\d+|(?:encoder|decoder)\.mid_block)\.resnets\.(\d+)"

# The official `vae/pytorch_model.pt` uses these names too (diffusers' converter renames nothing).
DIFFUSERS_VAE = KeyMap(
    [
        Rule(rf"{_SIDE}\.(conv_in|conv_out)\.conv\.weight", r"\1.\2.conv.weight", "conv3d_channels_last"),
        Rule(rf"{_SIDE}\.(conv_in|conv_out)\.conv\.bias", r"\1.\2.conv.bias"),
        Rule(rf"{_SIDE}\.conv_norm_out\.{_WB}", r"\1.conv_norm_out.\2"),
        Rule(rf"{_RES}\.(conv1|conv2|conv_shortcut)\.conv\.weight", r"\1.resnets.\2.\3.conv.weight",
             "conv3d_channels_last"),
        Rule(rf"{_RES}\.(conv1|conv2|conv_shortcut)\.conv\.bias", r"\1.resnets.\2.\3.conv.bias"),
        Rule(rf"{_RES}\.(norm1|norm2)\.{_WB}", r"\1.resnets.\2.\3.\4"),
        Rule(rf"{_BLOCK}\.(downsamplers|upsamplers)\.0\.conv\.conv\.weight", r"\1.\2.\3.0.conv.conv.weight",
             "conv3d_channels_last"),
        Rule(rf"{_BLOCK}\.(downsamplers|upsamplers)\.0\.conv\.conv\.bias", r"\1.\2.\3.0.conv.conv.bias"),
        Rule(rf"{_SIDE}\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.{_WB}",
             r"\1.mid_block.attentions.0.\2.\3"),
        Rule(r"(quant_conv|post_quant_conv)\.weight", r"\1.weight", "conv3d_channels_last"),
        Rule(r"(quant_conv|post_quant_conv)\.bias", r"\1.bias"),
    ],
    transforms=_TRANSFORMS,
)


def comfyui_vae_keymap(levels: int) -> KeyMap:
    """ComfyUI's names for the HunyuanVideo VAE (Comfy-Org's `hunyuan_video_vae_bf16.safetensors`), for a VAE of
    `levels` resolution levels (len(block_out_channels); 4 for the published one).

    ComfyUI runs this VAE as its generic `AutoencoderKL` with `conv3d=True, time_compress=4` (comfyanonymous/ComfyUI comfy/sd.py, the
    `decoder.conv_in.conv.weight` branch) and saves that module's state dict; the module names are those of
    comfy/ldm/modules/diffusionmodules/model.py `Encoder` / `Decoder`: `down.i.block.j`, `down.i.downsample.conv`,
    `mid.block_1|block_2|attn_1`, `up.k.block.j`, `up.k.upsample.conv`, `norm_out`, `nin_shortcut`; every 3x3x3
    and shortcut conv a `VideoConv3d` (hence `.conv.weight`); the mid attention's q/k/v/proj_out plain 1x1x1 Conv3d
    (5-D weights). comfy/diffusers_convert.py `convert_vae_state_dict` is the same renaming from the official /
    diffusers names (up blocks counted from the other end: `up.{levels-1-i}` is `up_blocks.i`; the attention's
    linear weights reshaped to 1x1x1 convs). Inferred, not read from the file: that the repackaged file holds these
    names (3P: kijai's HunyuanVideoWrapper refuses that file for lacking `decoder.conv_norm_out.weight` and asks for
    its own copy in the official names), and that it carries no wrapper prefix (`vae.` / `first_stage_model.`
    would be removed by ComponentSource anyway)."""
    rules = [
        Rule(rf"{_SIDE}\.(conv_in|conv_out)\.conv\.weight", r"\1.\2.conv.weight", "conv3d_channels_last"),
        Rule(rf"{_SIDE}\.(conv_in|conv_out)\.conv\.bias", r"\1.\2.conv.bias"),
        Rule(rf"{_SIDE}\.norm_out\.{_WB}", r"\1.conv_norm_out.\2"),
        Rule(rf"{_SIDE}\.mid\.attn_1\.norm\.{_WB}", r"\1.mid_block.attentions.0.group_norm.\2"),
        Rule(rf"{_SIDE}\.mid\.attn_1\.(q|k|v)\.weight", r"\1.mid_block.attentions.0.to_\2.weight",
             "conv1x1x1_to_linear"),
        Rule(rf"{_SIDE}\.mid\.attn_1\.(q|k|v)\.bias", r"\1.mid_block.attentions.0.to_\2.bias"),
        Rule(rf"{_SIDE}\.mid\.attn_1\.proj_out\.weight", r"\1.mid_block.attentions.0.to_out.0.weight",
             "conv1x1x1_to_linear"),
        Rule(rf"{_SIDE}\.mid\.attn_1\.proj_out\.bias", r"\1.mid_block.attentions.0.to_out.0.bias"),
        Rule(r"(quant_conv|post_quant_conv)\.weight", r"\1.weight", "conv3d_channels_last"),
        Rule(r"(quant_conv|post_quant_conv)\.bias", r"\1.bias"),
    ]

    def resnet(src: str, dst: str, groups: int) -> None:
        """A resnet `src` (a pattern with `groups` groups) onto our resnet `dst`."""
        for theirs, name in (("conv1", "conv1"), ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut")):
            rules.append(Rule(rf"{src}\.{theirs}\.conv\.weight", f"{dst}.{name}.conv.weight", "conv3d_channels_last"))
            rules.append(Rule(rf"{src}\.{theirs}\.conv\.bias", f"{dst}.{name}.conv.bias"))
        rules.append(Rule(rf"{src}\.(norm1|norm2)\.{_WB}", rf"{dst}.\{groups + 1}.\{groups + 2}"))

    def sampler(src: str, dst: str) -> None:
        rules.append(Rule(rf"{src}\.conv\.conv\.weight", f"{dst}.0.conv.conv.weight", "conv3d_channels_last"))
        rules.append(Rule(rf"{src}\.conv\.conv\.bias", f"{dst}.0.conv.conv.bias"))

    resnet(r"encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2", 2)
    sampler(r"encoder\.down\.(\d+)\.downsample", r"encoder.down_blocks.\1.downsamplers")
    for i in range(levels):
        resnet(rf"decoder\.up\.{levels - 1 - i}\.block\.(\d+)", rf"decoder.up_blocks.{i}.resnets.\1", 1)
        sampler(rf"decoder\.up\.{levels - 1 - i}\.upsample", f"decoder.up_blocks.{i}.upsamplers")
    for j in range(2):
        resnet(rf"{_SIDE}\.mid\.block_{j + 1}", rf"\1.mid_block.resnets.{j}", 1)
    return KeyMap(rules, transforms=_TRANSFORMS)


def vae_config_from_diffusers(config_json: dict) -> HunyuanVAEConfig:
    """Our config from a diffusers `AutoencoderKLHunyuanVideo` config.json (or the official vae/config.json)."""
    name = config_json.get("_class_name", "AutoencoderKLHunyuanVideo")
    if name not in ("AutoencoderKLHunyuanVideo", "AutoencoderKLCausal3D"):
        raise ValueError(f"expected an AutoencoderKLHunyuanVideo config, got {name!r}")
    if config_json.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn={config_json['act_fn']!r} is not supported")
    for field in ("down_block_types", "up_block_types"):
        kinds = set(config_json.get(field) or ())
        if kinds - {"HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D", "DownEncoderBlockCausal3D",
                    "UpDecoderBlockCausal3D"}:
            raise ValueError(f"{field}={sorted(kinds)} is not supported")
    d = HunyuanVAEConfig()
    return HunyuanVAEConfig(
        in_channels=config_json.get("in_channels", d.in_channels),
        out_channels=config_json.get("out_channels", d.out_channels),
        latent_channels=config_json.get("latent_channels", d.latent_channels),
        block_out_channels=tuple(config_json.get("block_out_channels", d.block_out_channels)),
        layers_per_block=config_json.get("layers_per_block", d.layers_per_block),
        norm_num_groups=config_json.get("norm_num_groups", d.norm_num_groups),
        scaling_factor=config_json.get("scaling_factor", d.scaling_factor),
        spatial_compression=config_json.get("spatial_compression_ratio", d.spatial_compression),
        temporal_compression=config_json.get(
            "temporal_compression_ratio", config_json.get("time_compression_ratio", d.temporal_compression)
        ),
        mid_block_attention=config_json.get("mid_block_add_attention", d.mid_block_attention),
    )


# --- LLaVA-Llama-3 language model (onto mlx_lm's LlamaModel, held as `model` by our encoder) ----------------

# A bare LlamaModel (diffusers' text_encoder/), LlamaForCausalLM (the official preprocessed text_encoder/),
# or a LLaVA checkpoint (older transformers `language_model.model.`, newer `model.language_model.`). ComfyUI's
# `llava_llama3_fp16` / `llava_llama3_fp8_scaled` are the state dict of comfy/text_encoders/llama.py `Llama2`
# (`model.embed_tokens`, `model.layers.N.self_attn.q_proj|k_proj|v_proj|o_proj`, `mlp.gate_proj|up_proj|down_proj`,
# `input_layernorm`, `post_attention_layernorm`, `model.norm`; no lm_head), with `scaled_fp8` (ComfyUI
# comfy/text_encoders/hunyuan_video.py `llama_detect`) and per-layer `scale_weight` in the fp8 one. Which layers that
# file stores in fp8 was not read (inferred: the layers' linears); any choice converts.
_LLAMA_PREFIX = r"(?:model\.|language_model\.model\.|model\.language_model\.)?"
_L = rf"{_LLAMA_PREFIX}layers\.(\d+)"

TRANSFORMERS_LLAMA = KeyMap(
    [
        Rule(rf"{_LLAMA_PREFIX}embed_tokens\.weight", "model.embed_tokens.weight"),
        Rule(rf"{_L}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", r"model.layers.\1.self_attn.\2.weight"),
        Rule(rf"{_L}\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
        Rule(rf"{_L}\.(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.weight"),
        Rule(rf"{_LLAMA_PREFIX}norm\.weight", "model.norm.weight"),
    ],
    ignore=[
        r"(?:language_model\.)?lm_head\.weight",
        r"(?:model\.)?(?:vision_tower|multi_modal_projector)\..*",
        rf"{_L}\.self_attn\.rotary_emb\.inv_freq",
    ],
)


# --- CLIP-L text model -------------------------------------------------------------------------------------

# Older transformers (and the hub's CLIP-L files) prefix every key with `text_model.`; transformers 5 does not.
# ComfyUI's `clip_l` is the state dict of comfy/clip_model.py `CLIPTextModel`: `text_model.` + these names and
# `text_projection.weight` (ComfyUI's comfy/text_encoders/hunyuan_video.py routes a file holding
# `text_model.encoder.layers.1.mlp.fc1.weight` to CLIP-L).
_CP = r"(?:text_model\.)?"
_C = rf"{_CP}encoder\.layers\.(\d+)"

TRANSFORMERS_CLIP = KeyMap(
    [
        Rule(rf"{_CP}embeddings\.(token_embedding|position_embedding)\.weight", r"embeddings.\1.weight"),
        Rule(rf"{_C}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.{_WB}", r"layers.\1.self_attn.\2.\3"),
        Rule(rf"{_C}\.(layer_norm1|layer_norm2)\.{_WB}", r"layers.\1.\2.\3"),
        Rule(rf"{_C}\.mlp\.(fc1|fc2)\.{_WB}", r"layers.\1.mlp.\2.\3"),
        Rule(rf"{_CP}final_layer_norm\.{_WB}", r"final_layer_norm.\1"),
    ],
    ignore=[rf"{_CP}embeddings\.position_ids", r"text_projection\.weight", r"logit_scale",
            r"vision_model\..*", r"visual_projection\.weight"],
)


# --- LLaVA's vision side (HunyuanVideo-I2V's text encoder, transformers LlavaForConditionalGeneration) ------
# The CLIP vision tower (transformers 5 saves it under `model.vision_tower.`, older ones under `vision_tower.`)
# and the projector, into mlx_video.text_encoders.llava.LlavaImageEncoder; the language model is TRANSFORMERS_LLAMA's.
_VT = r"(?:model\.)?vision_tower\."
_MP = r"(?:model\.)?multi_modal_projector\."


def _llava_image_keymap() -> KeyMap:
    vision = [Rule(_VT + rule.source, "vision." + rule.target, rule.transform)
              for _, rule in TRANSFORMERS_CLIP_VISION.rules]
    return KeyMap(
        [*vision, Rule(rf"{_MP}(linear_[12])\.{_WB}", r"\1.\2")],
        ignore=[_VT + r"(?:vision_model\.)?embeddings\.position_ids", r"(?:model\.)?language_model\..*",
                r"lm_head\.weight"],
        transforms=TRANSFORMERS_CLIP_VISION.transforms,
    )


LLAVA_IMAGE = _llava_image_keymap()
