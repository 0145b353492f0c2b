"""Wan 2.2 transformer checkpoints (diffusers and official / ComfyUI names) onto `WanTransformer`."""

from __future__ import annotations

from mlx_video.families.wan.config import WanTransformerConfig

from mlx_video.convert.rules import KeyMap, Rule

_N = r"blocks\.(\d+)"
_WB = r"(weight|bias)"

DIFFUSERS_TRANSFORMER = KeyMap(
    [
        Rule(r"patch_embedding\.weight", "patch_embedding.weight", "conv3d_patch_to_linear"),
        Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
        Rule(rf"condition_embedder\.text_embedder\.linear_([12])\.{_WB}", r"text_embedding.linear_\1.\2"),
        Rule(rf"condition_embedder\.time_embedder\.linear_([12])\.{_WB}", r"time_embedding.linear_\1.\2"),
        Rule(rf"condition_embedder\.time_proj\.{_WB}", r"time_projection.\1"),
        Rule(rf"{_N}\.attn1\.to_([qkv])\.{_WB}", r"blocks.\1.self_attn.\2.\3"),
        Rule(rf"{_N}\.attn1\.to_out\.0\.{_WB}", r"blocks.\1.self_attn.o.\2"),
        Rule(rf"{_N}\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
        Rule(rf"{_N}\.attn2\.to_([qkv])\.{_WB}", r"blocks.\1.cross_attn.\2.\3"),
        Rule(rf"{_N}\.attn2\.to_out\.0\.{_WB}", r"blocks.\1.cross_attn.o.\2"),
        Rule(rf"{_N}\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
        # diffusers' norm2 is the affine cross-attention norm (the official norm3).
        Rule(rf"{_N}\.norm2\.{_WB}", r"blocks.\1.norm_cross.\2"),
        Rule(rf"{_N}\.ffn\.net\.0\.proj\.{_WB}", r"blocks.\1.ffn.fc1.\2"),
        Rule(rf"{_N}\.ffn\.net\.2\.{_WB}", r"blocks.\1.ffn.fc2.\2"),
        Rule(rf"{_N}\.scale_shift_table", r"blocks.\1.modulation", "drop_leading_unit_axis"),
        Rule(rf"proj_out\.{_WB}", r"head.linear.\1"),
        Rule(r"scale_shift_table", "head.modulation", "drop_leading_unit_axis"),
    ]
)

OFFICIAL_TRANSFORMER = KeyMap(
    [
        Rule(r"patch_embedding\.weight", "patch_embedding.weight", "conv3d_patch_to_linear"),
        Rule(r"patch_embedding\.bias", "patch_embedding.bias"),
        Rule(rf"text_embedding\.0\.{_WB}", r"text_embedding.linear_1.\1"),
        Rule(rf"text_embedding\.2\.{_WB}", r"text_embedding.linear_2.\1"),
        Rule(rf"time_embedding\.0\.{_WB}", r"time_embedding.linear_1.\1"),
        Rule(rf"time_embedding\.2\.{_WB}", r"time_embedding.linear_2.\1"),
        Rule(rf"time_projection\.1\.{_WB}", r"time_projection.\1"),
        Rule(rf"{_N}\.(self_attn|cross_attn)\.([qkvo])\.{_WB}", r"blocks.\1.\2.\3.\4"),
        Rule(rf"{_N}\.(self_attn|cross_attn)\.norm_([qk])\.weight", r"blocks.\1.\2.norm_\3.weight"),
        Rule(rf"{_N}\.norm3\.{_WB}", r"blocks.\1.norm_cross.\2"),
        Rule(rf"{_N}\.ffn\.0\.{_WB}", r"blocks.\1.ffn.fc1.\2"),
        Rule(rf"{_N}\.ffn\.2\.{_WB}", r"blocks.\1.ffn.fc2.\2"),
        Rule(rf"{_N}\.modulation", r"blocks.\1.modulation", "drop_leading_unit_axis"),
        Rule(rf"head\.head\.{_WB}", r"head.linear.\1"),
        Rule(r"head\.modulation", "head.modulation", "drop_leading_unit_axis"),
    ]
)


# The CLIP image context (`image_context.py`) of Wan2.1 I2V / FLF2V-14B and Wan2.2-Animate-14B: diffusers 0.42.1
# `condition_embedder.image_embedder` and `attn2.add_{k,v}_proj`; the official (Wan-Video/Wan2.1
# wan/modules/model.py) `img_emb.proj` (LayerNorm, Linear, GELU, Linear, LayerNorm), `img_emb.emb_pos` (FLF2V)
# and `cross_attn.{k,v}_img`.
DIFFUSERS_IMAGE_CONTEXT_RULES = [
    Rule(rf"condition_embedder\.image_embedder\.norm([12])\.{_WB}", r"image_embedding.norm\1.\2"),
    Rule(rf"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.{_WB}", r"image_embedding.linear_1.\1"),
    Rule(rf"condition_embedder\.image_embedder\.ff\.net\.2\.{_WB}", r"image_embedding.linear_2.\1"),
    Rule(r"condition_embedder\.image_embedder\.pos_embed", "image_embedding.position_embedding",
         "drop_leading_unit_axis"),
    Rule(rf"{_N}\.attn2\.add_([kv])_proj\.{_WB}", r"blocks.\1.cross_attn.\2_img.\3"),
    Rule(rf"{_N}\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
]
OFFICIAL_IMAGE_CONTEXT_RULES = [
    Rule(rf"img_emb\.proj\.0\.{_WB}", r"image_embedding.norm1.\1"),
    Rule(rf"img_emb\.proj\.1\.{_WB}", r"image_embedding.linear_1.\1"),
    Rule(rf"img_emb\.proj\.3\.{_WB}", r"image_embedding.linear_2.\1"),
    Rule(rf"img_emb\.proj\.4\.{_WB}", r"image_embedding.norm2.\1"),
    Rule(r"img_emb\.emb_pos", "image_embedding.position_embedding", "drop_leading_unit_axis"),
    Rule(rf"{_N}\.cross_attn\.([kv])_img\.{_WB}", r"blocks.\1.cross_attn.\2_img.\3"),
    Rule(rf"{_N}\.cross_attn\.norm_k_img\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
]
# Wan2.1 I2V-14B / FLF2V-14B (`image_model.WanImageTransformer`).
DIFFUSERS_IMAGE_TRANSFORMER = KeyMap([*DIFFUSERS_IMAGE_CONTEXT_RULES, *(r for _, r in DIFFUSERS_TRANSFORMER.rules)])
OFFICIAL_IMAGE_TRANSFORMER = KeyMap([*OFFICIAL_IMAGE_CONTEXT_RULES, *(r for _, r in OFFICIAL_TRANSFORMER.rules)])


def transformer_config_from_diffusers(config_json: dict) -> WanTransformerConfig:
    """Our config from a diffusers `WanTransformer3DModel` config.json; refuses what Wan 2.2 does not use."""
    name = config_json.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(f"expected a WanTransformer3DModel config, got {name!r}")
    unsupported = {
        "image_dim": "a CLIP image embedding (Wan 2.1 I2V)",
        "added_kv_proj_dim": "image key/value projections in cross-attention (Wan 2.1 I2V)",
        "pos_embed_seq_len": "a learned image position embedding (Wan 2.1 FLF2V)",
    }
    for field, what in unsupported.items():
        if config_json.get(field) is not None:
            raise ValueError(f"{field}={config_json[field]!r} means {what}, which Wan 2.2 does not use")
    if config_json.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm={config_json['qk_norm']!r} is not supported (Wan 2.2 uses rms_norm_across_heads)")
    if not config_json.get("cross_attn_norm", True):
        raise ValueError("cross_attn_norm=False is not supported (Wan 2.2 normalises the cross-attention input)")

    defaults = WanTransformerConfig()
    heads = config_json.get("num_attention_heads", 40)
    head_dim = config_json.get("attention_head_dim", 128)
    in_channels = config_json.get("in_channels", defaults.in_channels)
    return WanTransformerConfig(
        dim=heads * head_dim,
        ffn_dim=config_json.get("ffn_dim", defaults.ffn_dim),
        freq_dim=config_json.get("freq_dim", defaults.freq_dim),
        text_dim=config_json.get("text_dim", defaults.text_dim),
        num_heads=heads,
        num_layers=config_json.get("num_layers", defaults.num_layers),
        in_channels=in_channels,
        out_channels=config_json.get("out_channels") or in_channels,
        patch_size=tuple(config_json.get("patch_size", defaults.patch_size)),
        eps=config_json.get("eps", defaults.eps),
        rope_max_positions=config_json.get("rope_max_seq_len", defaults.rope_max_positions),
    )
