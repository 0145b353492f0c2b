"""Wan VACE transformer checkpoints onto `WanVACETransformer`: the Wan tables (diffusers and official / ComfyUI
names) for the main blocks, the same block rules under `vace_blocks.N`, and the context branch's own tensors.

diffusers (`WanVACETransformer3DModel`) names the context block's projections `proj_in` / `proj_out`; the
official release (Wan-Video/Wan2.1 wan/modules/vace_model.py) and ComfyUI's single files `before_proj` /
`after_proj`. Both name the conditioning's patch embedding `vace_patch_embedding` (a 3D convolution).
"""

from __future__ import annotations

import re

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER
from mlx_video.families.wan.vace_model import WanVACEConfig, evenly_spaced_vace_layers

_MAIN_BLOCK = r"blocks\.(\d+)"
_WB = r"(weight|bias)"


def _context_block_rules(keymap: KeyMap) -> list[Rule]:
    """Each main-block rule of `keymap` again for the context blocks (`vace_blocks.N.` on both sides)."""
    return [Rule("vace_" + rule.source, "vace_" + rule.target, rule.transform)
            for _, rule in keymap.rules if rule.source.startswith(_MAIN_BLOCK)]


def _vace_keymap(keymap: KeyMap, proj_in: str, proj_out: str) -> KeyMap:
    return KeyMap([
        *(rule for _, rule in keymap.rules),
        *_context_block_rules(keymap),
        Rule(r"vace_patch_embedding\.weight", "vace_patch_embedding.weight", "conv3d_patch_to_linear"),
        Rule(r"vace_patch_embedding\.bias", "vace_patch_embedding.bias"),
        Rule(rf"vace_blocks\.0\.{proj_in}\.{_WB}", r"vace_blocks.0.before_proj.\1"),
        Rule(rf"vace_blocks\.(\d+)\.{proj_out}\.{_WB}", r"vace_blocks.\1.after_proj.\2"),
    ])


DIFFUSERS_VACE_TRANSFORMER = _vace_keymap(DIFFUSERS_TRANSFORMER, "proj_in", "proj_out")
OFFICIAL_VACE_TRANSFORMER = _vace_keymap(OFFICIAL_TRANSFORMER, "before_proj", "after_proj")


# --quantize: the block layers Wan stores in low precision, in the context blocks too
LOW_PRECISION_VACE = re.compile(r"(vace_)?blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.fc[12])\.weight")


def is_vace(keys) -> bool:
    """Whether a transformer checkpoint has the VACE context branch."""
    return any(k.startswith("vace_patch_embedding.") for k in keys)


def vace_config(backbone, config_json: dict | None, shapes: dict) -> WanVACEConfig:
    """The VACE config: the backbone's dimensions (read like any Wan transformer's), the hinted blocks from
    config.json (diffusers `vace_layers`, official `vace_layers`) or, without one, spread evenly over the blocks
    (`evenly_spaced_vace_layers`), and the conditioning channels from the patch embedding's shape."""
    from mlx_video.convert.formats import count_blocks

    count = count_blocks(shapes, r"vace_blocks\.(\d+)\.")
    layers = (config_json or {}).get("vace_layers")
    if layers is None:
        layers = evenly_spaced_vace_layers(backbone.num_layers, count)
    if len(layers) != count:
        raise ValueError(f"config.json lists {len(layers)} vace_layers but the checkpoint has {count} context blocks")
    channels = shapes["vace_patch_embedding.weight"][1]
    return WanVACEConfig(**backbone.to_dict() | {"vace_layers": tuple(layers), "vace_in_channels": channels})


def backbone_config_json(config_json: dict) -> dict:
    """A VACE config.json as the Wan backbone's (diffusers `WanVACETransformer3DModel`, official
    `model_type: vace`), the context fields left out (`vace_config` reads them); any other config unchanged."""
    vace_fields = ("vace_layers", "vace_in_channels", "vace_in_dim")
    if not any(f in config_json for f in vace_fields):
        return config_json
    backbone = {k: v for k, v in config_json.items() if k not in vace_fields}
    if backbone.get("_class_name") == "WanVACETransformer3DModel":
        backbone["_class_name"] = "WanTransformer3DModel"
    elif backbone.get("model_type") == "vace":
        backbone["model_type"] = "t2v"
        backbone.pop("_class_name", None)
    return backbone
