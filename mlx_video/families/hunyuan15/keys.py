"""HunyuanVideo 1.5 transformer checkpoints onto our modules: the official names (the release's
`transformer/<variant>/diffusion_pytorch_model*.safetensors`, Tencent-Hunyuan/HunyuanVideo-1.5
`hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py`) and diffusers' (`HunyuanVideo15Transformer3DModel`,
as its `scripts/convert_hunyuan_video1_5_to_diffusers.py` renames them).

Our modules keep the official layout: separate q/k/v in the double-stream blocks (as both checkpoints), one fused
q|k|v projection in the token refiner (official `self_attn_qkv`; diffusers splits it into `to_q/to_k/to_v`, which
map onto *part keys* `name#i` that `FusedParts` presents as one tensor). The final layer's modulation is stored in
the official (shift, scale) order; diffusers stores (scale, shift), hence `swap_halves`.
"""

from __future__ import annotations

from mlx_video.convert.rules import PART_SEPARATOR, KeyMap, Rule
from mlx_video.families.hunyuan15.config import Hunyuan15Config

_WB = r"(weight|bias)"
_R = r"txt_in\.individual_token_refiner\.blocks\.(\d+)"
_D = r"double_blocks\.(\d+)"

OFFICIAL_TRANSFORMER = KeyMap([
    Rule(r"img_in\.proj\.weight", "img_in.weight", "conv3d_patch_to_linear"),
    Rule(r"img_in\.proj\.bias", "img_in.bias"),
    Rule(rf"(time_in|time_r_in)\.mlp\.0\.{_WB}", r"\1.linear_1.\2"),
    Rule(rf"(time_in|time_r_in)\.mlp\.2\.{_WB}", r"\1.linear_2.\2"),
    Rule(rf"txt_in\.input_embedder\.{_WB}", r"txt_in.input_embedder.\1"),
    Rule(rf"txt_in\.t_embedder\.mlp\.0\.{_WB}", r"txt_in.t_embedder.linear_1.\1"),
    Rule(rf"txt_in\.t_embedder\.mlp\.2\.{_WB}", r"txt_in.t_embedder.linear_2.\1"),
    Rule(rf"txt_in\.c_embedder\.linear_([12])\.{_WB}", r"txt_in.c_embedder.linear_\1.\2"),
    Rule(rf"{_R}\.(norm1|norm2|self_attn_qkv|self_attn_proj)\.{_WB}", r"txt_in.blocks.\1.\2.\3"),
    Rule(rf"{_R}\.mlp\.(fc1|fc2)\.{_WB}", r"txt_in.blocks.\1.mlp.\2.\3"),
    Rule(rf"{_R}\.adaLN_modulation\.1\.{_WB}", r"txt_in.blocks.\1.adaLN_modulation.\2"),
    Rule(rf"byt5_in\.(layernorm|fc1|fc2|fc3)\.{_WB}", r"byt5_in.\1.\2"),
    Rule(rf"vision_in\.proj\.0\.{_WB}", r"vision_in.norm_in.\1"),
    Rule(rf"vision_in\.proj\.1\.{_WB}", r"vision_in.linear_1.\1"),
    Rule(rf"vision_in\.proj\.3\.{_WB}", r"vision_in.linear_2.\1"),
    Rule(rf"vision_in\.proj\.4\.{_WB}", r"vision_in.norm_out.\1"),
    Rule(r"cond_type_embedding\.weight", "cond_type_embedding.weight"),
    Rule(rf"{_D}\.(img|txt)_mod\.linear\.{_WB}", r"double_blocks.\1.\2.mod.\3"),
    Rule(rf"{_D}\.(img|txt)_attn_(q|k|v|proj)\.{_WB}", r"double_blocks.\1.\2.attn_\3.\4"),
    Rule(rf"{_D}\.(img|txt)_attn_(q|k)_norm\.weight", r"double_blocks.\1.\2.attn_\3_norm.weight"),
    Rule(rf"{_D}\.(img|txt)_mlp\.(fc1|fc2)\.{_WB}", r"double_blocks.\1.\2.mlp.\3.\4"),
    Rule(rf"final_layer\.linear\.{_WB}", r"final_layer.linear.\1"),
    Rule(rf"final_layer\.adaLN_modulation\.1\.{_WB}", r"final_layer.adaLN_modulation.\1"),
])

_DR = r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)"
_DD = r"transformer_blocks\.(\d+)"

DIFFUSERS_TRANSFORMER = KeyMap([
    Rule(r"x_embedder\.proj\.weight", "img_in.weight", "conv3d_patch_to_linear"),
    Rule(r"x_embedder\.proj\.bias", "img_in.bias"),
    Rule(rf"time_embed\.timestep_embedder\.linear_([12])\.{_WB}", r"time_in.linear_\1.\2"),
    Rule(rf"time_embed\.timestep_embedder_r\.linear_([12])\.{_WB}", r"time_r_in.linear_\1.\2"),
    Rule(rf"context_embedder\.proj_in\.{_WB}", r"txt_in.input_embedder.\1"),
    Rule(rf"context_embedder\.time_text_embed\.timestep_embedder\.linear_([12])\.{_WB}",
         r"txt_in.t_embedder.linear_\1.\2"),
    Rule(rf"context_embedder\.time_text_embed\.text_embedder\.linear_([12])\.{_WB}", r"txt_in.c_embedder.linear_\1.\2"),
    *[Rule(rf"{_DR}\.attn\.to_{x}\.{_WB}", rf"txt_in.blocks.\1.self_attn_qkv.\2{PART_SEPARATOR}{i}")
      for i, x in enumerate("qkv")],
    Rule(rf"{_DR}\.attn\.to_out\.0\.{_WB}", r"txt_in.blocks.\1.self_attn_proj.\2"),
    Rule(rf"{_DR}\.(norm1|norm2)\.{_WB}", r"txt_in.blocks.\1.\2.\3"),
    Rule(rf"{_DR}\.ff\.net\.0\.proj\.{_WB}", r"txt_in.blocks.\1.mlp.fc1.\2"),
    Rule(rf"{_DR}\.ff\.net\.2\.{_WB}", r"txt_in.blocks.\1.mlp.fc2.\2"),
    Rule(rf"{_DR}\.norm_out\.linear\.{_WB}", r"txt_in.blocks.\1.adaLN_modulation.\2"),
    Rule(rf"context_embedder_2\.norm\.{_WB}", r"byt5_in.layernorm.\1"),
    Rule(rf"context_embedder_2\.linear_([123])\.{_WB}", r"byt5_in.fc\1.\2"),
    Rule(rf"image_embedder\.(norm_in|linear_1|linear_2|norm_out)\.{_WB}", r"vision_in.\1.\2"),
    Rule(r"cond_type_embed\.weight", "cond_type_embedding.weight"),
    Rule(rf"{_DD}\.norm1\.linear\.{_WB}", r"double_blocks.\1.img.mod.\2"),
    Rule(rf"{_DD}\.norm1_context\.linear\.{_WB}", r"double_blocks.\1.txt.mod.\2"),
    Rule(rf"{_DD}\.attn\.to_(q|k|v)\.{_WB}", r"double_blocks.\1.img.attn_\2.\3"),
    Rule(rf"{_DD}\.attn\.add_(q|k|v)_proj\.{_WB}", r"double_blocks.\1.txt.attn_\2.\3"),
    Rule(rf"{_DD}\.attn\.norm_(q|k)\.weight", r"double_blocks.\1.img.attn_\2_norm.weight"),
    Rule(rf"{_DD}\.attn\.norm_added_(q|k)\.weight", r"double_blocks.\1.txt.attn_\2_norm.weight"),
    Rule(rf"{_DD}\.attn\.to_out\.0\.{_WB}", r"double_blocks.\1.img.attn_proj.\2"),
    Rule(rf"{_DD}\.attn\.to_add_out\.{_WB}", r"double_blocks.\1.txt.attn_proj.\2"),
    Rule(rf"{_DD}\.ff\.net\.0\.proj\.{_WB}", r"double_blocks.\1.img.mlp.fc1.\2"),
    Rule(rf"{_DD}\.ff\.net\.2\.{_WB}", r"double_blocks.\1.img.mlp.fc2.\2"),
    Rule(rf"{_DD}\.ff_context\.net\.0\.proj\.{_WB}", r"double_blocks.\1.txt.mlp.fc1.\2"),
    Rule(rf"{_DD}\.ff_context\.net\.2\.{_WB}", r"double_blocks.\1.txt.mlp.fc2.\2"),
    Rule(rf"norm_out\.linear\.{_WB}", r"final_layer.adaLN_modulation.\1", "swap_halves"),
    Rule(rf"proj_out\.{_WB}", r"final_layer.linear.\1"),
])


# ComfyUI's repackaged transformer files (Comfy-Org/HunyuanVideo_1.5_repackaged, split_files/diffusion_models/
# hunyuanvideo1.5_*.safetensors) keep the official names but hold each double-stream attention's q|k|v as one
# `img_attn_qkv` / `txt_attn_qkv` (weight and bias), the layer of ComfyUI's HunyuanVideo model (musubi-tuner's
# hunyuan_video_1_5_models.py splits them back the same way): read as the official q, k, v, a third of the rows each
# (`mlx_video.convert.formats.SplitRows`).
COMFY_TRANSFORMER_SPLITS = [
    (r"(double_blocks\.\d+\.(?:img|txt)_attn)_qkv", (r"\1_q", r"\1_k", r"\1_v")),
]

# LoRA files in ComfyUI's naming hold each double-stream attention's q|k|v as one layer, `img_attn_qkv` /
# `txt_attn_qkv`, or in ComfyUI's own module names `img_attn.qkv` (the layer ComfyUI's HunyuanVideo model has:
# comfy/lora.py `model_lora_keys_unet` maps `diffusion_model.` / `transformer.` + those names), where the official
# checkpoint and ours keep q, k, v apart: the rows of such a LoRA split in three onto ours
# (`mlx_video.lora.read_lora`'s `splits`). Dots or kohya's underscores.
LORA_SPLITS = [
    (r"(double_blocks[._]\d+[._](?:img|txt)_attn)[._]qkv", (r"\1_q", r"\1_k", r"\1_v")),
]

# ComfyUI's own module names for the layers it shares with the official model, which its LoRA files (e.g. those its
# LoRA-extraction node saves) may use: comfy/lora.py lists them against the official names for HunyuanVideo
# (`_mod.lin` / `_mod.linear`, `_attn.proj` / `_attn_proj`, `mlp.0` / `mlp.fc1`, `mlp.2` / `mlp.fc2`), and
# comfy/ldm/hunyuan_video/model.py names the refiner's attention `self_attn.qkv` / `self_attn.proj` and the
# embedders' MLPs `in_layer` / `out_layer`. LoRA only: no checkpoint is converted from these names.
_MLP = {"0": "fc1", "2": "fc2"}
COMFY_LORA = KeyMap([
    Rule(rf"{_D}\.(img|txt)_mod\.lin\.{_WB}", r"double_blocks.\1.\2.mod.\3"),
    Rule(rf"{_D}\.(img|txt)_attn\.proj\.{_WB}", r"double_blocks.\1.\2.attn_proj.\3"),
    Rule(rf"{_D}\.(img|txt)_mlp\.([02])\.{_WB}", lambda m: f"double_blocks.{m[1]}.{m[2]}.mlp.{_MLP[m[3]]}.{m[4]}"),
    Rule(rf"{_R}\.self_attn\.(qkv|proj)\.{_WB}", r"txt_in.blocks.\1.self_attn_\2.\3"),
    Rule(rf"{_R}\.mlp\.([02])\.{_WB}", lambda m: f"txt_in.blocks.{m[1]}.mlp.{_MLP[m[2]]}.{m[3]}"),
    Rule(rf"(time_in|time_r_in|txt_in\.t_embedder|txt_in\.c_embedder)\.(in|out)_layer\.{_WB}",
         lambda m: f"{m[1]}.linear_{1 if m[2] == 'in' else 2}.{m[3]}"),
])


def config_from_diffusers(config_json: dict) -> Hunyuan15Config:
    """Our config from a diffusers `HunyuanVideo15Transformer3DModel` config.json."""
    name = config_json.get("_class_name", "HunyuanVideo15Transformer3DModel")
    if name != "HunyuanVideo15Transformer3DModel":
        raise ValueError(f"expected a HunyuanVideo15Transformer3DModel config, got {name!r}")
    if config_json.get("qk_norm", "rms_norm") != "rms_norm":
        raise ValueError(f"qk_norm={config_json['qk_norm']!r} is not supported (HunyuanVideo 1.5 uses rms_norm)")
    d = Hunyuan15Config()
    patch = config_json.get("patch_size", 1)
    return Hunyuan15Config(
        num_heads=config_json.get("num_attention_heads", d.num_heads),
        head_dim=config_json.get("attention_head_dim", d.head_dim),
        mlp_ratio=float(config_json.get("mlp_ratio", d.mlp_ratio)),
        num_blocks=config_json.get("num_layers", d.num_blocks),
        num_refiner_blocks=config_json.get("num_refiner_layers", d.num_refiner_blocks),
        rope_axes=tuple(config_json.get("rope_axes_dim", d.rope_axes)),
        rope_theta=float(config_json.get("rope_theta", d.rope_theta)),
        patch_size=(config_json.get("patch_size_t", 1), patch, patch),
        in_channels=config_json.get("in_channels", d.in_channels),
        out_channels=config_json.get("out_channels") or d.out_channels,
        text_dim=config_json.get("text_embed_dim", d.text_dim),
        glyph_dim=config_json.get("text_embed_2_dim", d.glyph_dim),
        image_dim=config_json.get("image_embed_dim", d.image_dim),
        use_meanflow=bool(config_json.get("use_meanflow", d.use_meanflow)),
        target_size=int(config_json.get("target_size", d.target_size)),
    )


def config_from_shapes(keys, shape, config_json: dict | None, published: Hunyuan15Config) -> Hunyuan15Config:
    """Our config from a checkpoint in the official names: every width and count read from the tensors (the
    release's config.json names its input channels before the condition is concatenated, and may be absent); the
    RoPE split of the head, not visible in any shape, and its theta from config.json's `rope_dim_list` /
    `rope_theta` (the official class's arguments), else the published ones for the published head width, else
    the same proportions. The resolution bucket comes from config.json's `ideal_resolution`."""
    from mlx_video.convert.formats import count_blocks

    hidden, in_channels, *patch = shape("img_in.proj.weight")
    head_dim = shape("double_blocks.0.img_attn_q_norm.weight")[0]
    config_json = config_json or {}
    # the official class's `rope_dim_list`, or diffusers' `rope_axes_dim` (a single file over a diffusers folder
    # carries the replaced transformer's config)
    axes = config_json.get("rope_dim_list", config_json.get("rope_axes_dim"))
    if axes is not None:
        rope_axes = tuple(int(d) for d in axes)
    elif head_dim == published.head_dim:
        rope_axes = published.rope_axes
    else:  # the published proportions, rounded to even axes
        t = 2 * round(head_dim * published.rope_axes[0] / published.head_dim / 2)
        t += (head_dim - t) % 4
        rope_axes = (t, (head_dim - t) // 2, (head_dim - t) // 2)
    resolution = str(config_json.get("ideal_resolution"))
    return Hunyuan15Config(
        num_heads=hidden // head_dim, head_dim=head_dim,
        mlp_ratio=shape("double_blocks.0.img_mlp.fc1.weight")[0] / hidden,
        num_blocks=count_blocks(keys, r"double_blocks\.(\d+)\."),
        num_refiner_blocks=count_blocks(keys, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
        rope_axes=rope_axes, rope_theta=float(config_json.get("rope_theta", published.rope_theta)), patch_size=tuple(patch),
        in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=shape("txt_in.input_embedder.weight")[1], glyph_dim=shape("byt5_in.fc1.weight")[1],
        glyph_hidden=shape("byt5_in.fc1.weight")[0], image_dim=shape("vision_in.proj.1.weight")[1],
        freq_dim=shape("time_in.mlp.0.weight")[1], use_meanflow="time_r_in.mlp.0.weight" in keys,
        target_size={"480p": 640, "720p": 960, "1080p": 1440}.get(resolution,
                                                                  int(config_json.get("target_size", published.target_size))),
    )
