"""Conversion of Wan2.1 I2V-14B and FLF2V-14B: the Wan backbone (planned as every Wan transformer, `planner.py`)
with the CLIP image context (`image_model.py`), recognised by the image embedding's tensors, and the CLIP image
encoder planned as Wan2.2-Animate's (`animate_planner.image_encoder_plan`: the diffusers folder's
image_encoder/, or the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`).
"""

from __future__ import annotations

from dataclasses import fields

from mlx_video.convert.formats import ComponentSource
from mlx_video.errors import MlxVideoError

# our names -> (diffusers, official) names of the image embedding's tensors
_IMAGE_KEYS = {
    "linear_1": ("condition_embedder.image_embedder.ff.net.0.proj.weight", "img_emb.proj.1.weight"),
    "positions": ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
}
_IMAGE_FIELDS = ("image_dim", "image_embed_dim", "added_kv_proj_dim", "pos_embed_seq_len")
I2V_MODELS = {False: "wan2.1-i2v-14b-720p", True: "wan2.1-flf2v-14b"}  # by whether it has FLF2V's positions


def has_image_context(source: ComponentSource) -> bool:
    return any(name in source for name in _IMAGE_KEYS["linear_1"])


def backbone_config_json(config_json: dict) -> dict:
    """A Wan2.1 I2V / FLF2V config.json as the backbone's: the image fields left out (the shapes tell them),
    the official `model_type: flf2v` read as i2v; any other config unchanged."""
    backbone = {k: v for k, v in config_json.items() if k not in _IMAGE_FIELDS}
    if backbone.get("model_type") == "flf2v":
        backbone["model_type"] = "i2v"
    return backbone


def image_config(backbone, source: ComponentSource, config_json: dict | None):
    """The `WanImageConfig` of the backbone config and the checkpoint's image-embedding shapes."""
    from mlx_video.families.wan.image_model import WanImageConfig

    config_json = config_json or {}
    if config_json.get("added_kv_proj_dim") not in (None, backbone.dim):
        raise MlxVideoError(f"{source.what}: added_kv_proj_dim {config_json['added_kv_proj_dim']} is not the "
                            f"model width {backbone.dim} (the image keys and values project from it)")
    linear = next(name for name in _IMAGE_KEYS["linear_1"] if name in source)
    image_dim = source.shape(linear)[1]
    positions = next((source.shape(n) for n in _IMAGE_KEYS["positions"] if n in source), None)
    return WanImageConfig(**{f.name: getattr(backbone, f.name) for f in fields(backbone)}, image_dim=image_dim,
                          image_positions=None if positions is None else positions[-2])


def image_transformer(naming: str, cfg):
    """(key map, module) of a Wan2.1 I2V / FLF2V transformer."""
    from mlx_video.families.wan.image_model import WanImageTransformer
    from mlx_video.families.wan.keys import DIFFUSERS_IMAGE_TRANSFORMER, OFFICIAL_IMAGE_TRANSFORMER

    keymap = OFFICIAL_IMAGE_TRANSFORMER if naming == "official" else DIFFUSERS_IMAGE_TRANSFORMER
    return keymap, WanImageTransformer(cfg)
