"""Conversion of Wan2.2-Animate-14B: its transformer (recognised by the pose patch embedding) and its CLIP image
encoder, from the diffusers layout (`WanAnimatePipeline`: transformer/, image_encoder/, image_processor/) and
the official release (the model shards, `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`). The rest
(UMT5, the Wan 2.1 VAE, the tokenizer) is planned as for every Wan model (`planner.py`).

The configuration is read from the checkpoint's shapes, through the key tables (`animate_keys.py`): every
Animate-specific size (motion encoder resolution and widths, face encoder width and heads, how often a face
block follows) is a tensor's shape; the head count is config.json's when there is one, else dim / 128 (the
published head width).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from mlx_video.convert.convert import ComponentPlan, component_input, read_json
from mlx_video.convert.formats import ComponentSource, FusedParts, fused_keymap, open_tensors
from mlx_video.convert.rules import PART_SEPARATOR, KeyMap
from mlx_video.errors import MlxVideoError

OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
ANIMATE_MODEL = "wan2.2-animate-14b"
IMAGE_ENCODER = "image_encoder"


def is_animate(source: ComponentSource) -> bool:
    return "pose_patch_embedding.weight" in source


def target_shapes(source: ComponentSource, keymap: KeyMap) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes as the checkpoint gives them (transforms applied to lazy arrays, parts joined)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key in source.keys():
        hit = keymap.target(key)
        if hit is None:
            continue
        target, transform = hit
        shape = source.shape(key)
        if transform is not None:
            shape = tuple(keymap.transforms[transform](mx.zeros(shape)).shape)
        name, sep, _ = target.rpartition(PART_SEPARATOR)
        if sep:
            joined = shapes.get(name)
            shape = shape if joined is None else (joined[0] + shape[0], *shape[1:])
            target = name
        shapes[target] = shape
    return shapes


def _count(shapes: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def animate_config(shapes: dict, heads: int | None):
    """Our `WanAnimateConfig` from our parameter shapes; `heads` from a config.json, else dim / 128."""
    from mlx_video.families.wan.animate_model import WanAnimateConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise MlxVideoError(f"the Animate transformer has no {key} (after conversion of its names)")
        return shapes[key]

    dim, patch_in = shape("patch_embedding.weight")
    layers = _count(shapes, "blocks.")
    face_blocks = _count(shapes, "face_blocks.")
    res_blocks = _count(shapes, "motion_encoder.blocks.")
    heads = heads or max(1, dim // 128)
    size = 2 ** (res_blocks + 2)  # each residual block halves the crop, down to 4x4
    widths = [(size, shape("motion_encoder.conv_in.weight")[0])]
    widths += [(size >> (i + 1), shape(f"motion_encoder.blocks.{i}.conv2.weight")[0]) for i in range(res_blocks)]
    face_hidden = shape("face_encoder.conv2.weight")[0]
    pose_volume = shape("pose_embedding.weight")[1]
    patch = (1, 2, 2)
    if not face_blocks or layers % face_blocks:
        raise MlxVideoError(f"{face_blocks} face blocks do not divide {layers} transformer blocks evenly")
    return WanAnimateConfig(
        dim=dim, ffn_dim=shape("blocks.0.ffn.fc1.weight")[0], freq_dim=shape("time_embedding.linear_1.weight")[1],
        text_dim=shape("text_embedding.linear_1.weight")[1], num_heads=heads, num_layers=layers,
        in_channels=patch_in // 4, out_channels=shape("head.linear.weight")[0] // 4, patch_size=patch,
        image_dim=shape("image_embedding.linear_1.weight")[1], pose_channels=pose_volume // 4,
        motion_size=size, motion_style_dim=shape("motion_encoder.conv_out.weight")[0],
        motion_dim=shape("motion_encoder.direction")[1], motion_out_dim=shape("motion_encoder.direction")[0],
        motion_channels=tuple(sorted(widths)), face_hidden_dim=face_hidden,
        face_heads=shape("face_encoder.conv1.weight")[0] // face_hidden, face_every=layers // face_blocks,
    )


def transformer_plan(inp, source: ComponentSource, naming: str) -> tuple[ComponentPlan, object]:
    from mlx_video.families.wan.animate_keys import DIFFUSERS_ANIMATE, OFFICIAL_ANIMATE
    from mlx_video.families.wan.animate_model import WanAnimateTransformer

    keymap = OFFICIAL_ANIMATE if naming == "official" else DIFFUSERS_ANIMATE
    if naming != "official":  # diffusers' face blocks split k and v, which ours (as the official) keep fused
        source, keymap = fused(source, keymap)
    config_json = inp.config_json or {}
    if config_json.get("_class_name") == "WanAnimateTransformer3DModel":
        _check_diffusers_config(config_json)
        heads = config_json.get("num_attention_heads")
    else:
        heads = config_json.get("num_heads")
    cfg = animate_config(target_shapes(source, keymap), heads)
    if config_json.get("rope_max_seq_len"):
        cfg = replace(cfg, rope_max_positions=config_json["rope_max_seq_len"])
    plan = ComponentPlan("transformer", source, keymap, cfg.to_dict(), WanAnimateTransformer(cfg), origin=inp.origin)
    return plan, cfg


def _check_diffusers_config(config_json: dict) -> None:
    if config_json.get("added_kv_proj_dim") is None:
        raise MlxVideoError("the Animate transformer's config has no added_kv_proj_dim: without the image key/value "
                            "projections it is not the published model")
    if config_json.get("pos_embed_seq_len") is not None:
        raise MlxVideoError("pos_embed_seq_len (a learned image position embedding) is not part of Wan2.2-Animate")
    if tuple(config_json.get("patch_size", (1, 2, 2))) != (1, 2, 2):
        raise MlxVideoError(f"patch_size {config_json['patch_size']} is not supported (Wan uses 1x2x2)")


def image_encoder_plan(src: Path | None, fmt: str, model: str = ANIMATE_MODEL) -> ComponentPlan:
    """The CLIP image encoder: the diffusers folder's image_encoder/ (+ image_processor/), or the official file."""
    from mlx_video.families.wan.animate_keys import OFFICIAL_CLIP_VISION
    from mlx_video.image_encoders.clip_vision import TRANSFORMERS_CLIP_VISION
    from mlx_video.image_encoders.clip_vision import CLIPPreprocess, CLIPVisionConfig, CLIPVisionEncoder

    if src is None:
        raise MlxVideoError(f"{model} needs its CLIP image encoder: convert the whole model folder")
    if fmt == "diffusers":
        folder = src / IMAGE_ENCODER
        inp = component_input(IMAGE_ENCODER, folder, f"{src.name}/{IMAGE_ENCODER}")
        if not folder.is_dir() or inp.config_json is None:
            raise MlxVideoError(f"{src} has no {IMAGE_ENCODER}/ with its config.json (the CLIP vision model)")
        cfg = CLIPVisionConfig.from_transformers(inp.config_json)
        processor = src / "image_processor" / "preprocessor_config.json"
        preprocess = CLIPPreprocess.from_transformers(read_json(processor, "the CLIP image processor")) \
            if processor.is_file() else CLIPPreprocess()
        origin = inp.origin
        source, keymap = fused(ComponentSource(open_tensors(folder, origin), origin), TRANSFORMERS_CLIP_VISION)
    else:
        path = src / OFFICIAL_CLIP
        if not path.is_file():
            raise MlxVideoError(f"{model} needs its CLIP image encoder: {src} has no {OFFICIAL_CLIP}")
        source = ComponentSource(open_tensors(path, OFFICIAL_CLIP), OFFICIAL_CLIP)
        cfg, preprocess, keymap, origin = _official_clip_config(source), CLIPPreprocess(), OFFICIAL_CLIP_VISION, OFFICIAL_CLIP
    config = {**cfg.to_dict(), "preprocess": preprocess.to_dict()}
    return ComponentPlan(IMAGE_ENCODER, source, keymap, config, CLIPVisionEncoder(cfg), origin=origin)


def fused(source: ComponentSource, keymap: KeyMap) -> tuple[ComponentSource, KeyMap]:
    """The source with the pieces the keymap sends to part keys shown as one fused tensor (read as rows of
    the pieces), and the keymap that reads it."""
    return ComponentSource(FusedParts(source.tensors, keymap, source.what), source.what), fused_keymap(keymap)


def _official_clip_config(source: ComponentSource):
    """ViT sizes from the official file's shapes (its heads are 80 wide, as in ViT-H/14)."""
    from mlx_video.image_encoders.clip_vision import CLIPVisionConfig

    width, _, patch, _ = source.shape("visual.patch_embedding.weight")
    positions = source.shape("visual.pos_embedding")[1]
    layers = len({k.split(".")[2] for k in source.keys() if k.startswith("visual.transformer.")})
    grid = int(round((positions - 1) ** 0.5))
    if width % 80:
        raise MlxVideoError(f"{source.what}: a {width}-wide CLIP tower does not split into 80-wide heads")
    return CLIPVisionConfig(hidden_size=width, intermediate_size=source.shape("visual.transformer.0.mlp.0.weight")[0],
                            num_hidden_layers=layers, num_attention_heads=width // 80, image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu")
