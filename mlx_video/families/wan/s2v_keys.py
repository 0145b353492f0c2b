"""Wan2.2-S2V-14B transformer checkpoints (the official `WanModel_S2V` names) onto `WanS2VTransformer`.

The backbone keys are those of the Wan 14B T2V model (`OFFICIAL_TRANSFORMER`); the S2V-only keys are the audio
encoder (upstream spells it `casual_audio_encoder`), the audio injectors, the segment embedding, the pose
encoder and the FramePack projections.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.families.wan.keys import OFFICIAL_TRANSFORMER

_WB = r"(weight|bias)"
_AUDIO = r"casual_audio_encoder\.encoder"
_INJ = r"audio_injector\.injector\.(\d+)"


def conv1d_channels_last(w: mx.array) -> mx.array:
    """torch Conv1d weight (O, I, k) -> MLX (O, k, I)."""
    if w.ndim != 3:
        raise ValueError(f"expected a 3-D Conv1d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 1)


def flatten(w: mx.array) -> mx.array:
    """(1, n, 1, 1) audio layer weights or a (1, 1, 1, dim) padding token -> 1-D."""
    return w.reshape(-1)


S2V_RULES = [
    Rule(r"casual_audio_encoder\.weights", "audio_encoder.layer_weights", "flatten"),
    Rule(rf"{_AUDIO}\.(conv1_local|conv1_global|conv2|conv3)\.conv\.weight", r"audio_encoder.\1.conv.weight",
         "conv1d_channels_last"),
    Rule(rf"{_AUDIO}\.(conv1_local|conv1_global|conv2|conv3)\.conv\.bias", r"audio_encoder.\1.conv.bias"),
    Rule(rf"{_AUDIO}\.final_linear\.{_WB}", r"audio_encoder.final_linear.\1"),
    Rule(rf"{_AUDIO}\.padding_tokens", "audio_encoder.padding_token", "flatten"),
    Rule(rf"{_INJ}\.([qkvo])\.{_WB}", r"audio_injectors.\1.attn.\2.\3"),
    Rule(rf"{_INJ}\.norm_([qk])\.weight", r"audio_injectors.\1.attn.norm_\2.weight"),
    # diffusers' AdaLayerNorm(chunk_dim=1): the linear's output is (shift, scale), the order the model splits it
    Rule(rf"audio_injector\.injector_adain_layers\.(\d+)\.linear\.{_WB}", r"audio_injectors.\1.adanorm.\2"),
    Rule(r"trainable_cond_mask\.weight", "cond_mask.weight"),
    Rule(r"cond_encoder\.weight", "cond_encoder.weight", "conv3d_patch_to_linear"),
    Rule(r"cond_encoder\.bias", "cond_encoder.bias"),
    Rule(r"frame_packer\.proj\.weight", "frame_packer.proj_1x.weight", "conv3d_patch_to_linear"),
    Rule(r"frame_packer\.proj\.bias", "frame_packer.proj_1x.bias"),
    Rule(r"frame_packer\.proj_(2x|4x)\.weight", r"frame_packer.proj_\1.weight", "conv3d_patch_to_linear"),
    Rule(r"frame_packer\.proj_(2x|4x)\.bias", r"frame_packer.proj_\1.bias"),
]

OFFICIAL_S2V_TRANSFORMER = KeyMap(
    [rule for _, rule in OFFICIAL_TRANSFORMER.rules] + S2V_RULES,
    ignore=[pattern.pattern for pattern in OFFICIAL_TRANSFORMER.ignore],
    transforms={"conv1d_channels_last": conv1d_channels_last, "flatten": flatten},
)


def s2v_config_from_official(config_json: dict):
    """Our `WanS2VConfig` from the official `WanModel_S2V` config.json; refuses variants the release does not use.

    `motion_frames` (73) is a pipeline setting that config.json may lack; the wav2vec2 layer count is fixed at 25
    by the official audio encoder (it is not a constructor argument)."""
    from mlx_video.families.wan.s2v_model import WAN_S2V_14B, WanS2VConfig

    required = {
        "enable_adain": True, "adain_mode": "attn_norm", "enable_framepack": True, "enable_motioner": False,
        "zero_timestep": True, "trainable_token_pos_emb": False, "enable_tsm": False,
    }
    for field, value in required.items():
        if field in config_json and config_json[field] != value:
            raise ValueError(f"{field}={config_json[field]!r} is not supported (Wan2.2-S2V uses {value!r})")
    if not config_json.get("add_last_motion", True):
        raise ValueError("add_last_motion=False is not supported (Wan2.2-S2V uses True)")
    from dataclasses import asdict

    from mlx_video.families.wan.config_from_shapes import transformer_config_from_official

    d = WAN_S2V_14B
    return WanS2VConfig(
        **asdict(transformer_config_from_official(config_json)),
        audio_dim=config_json.get("audio_dim", d.audio_dim),
        num_audio_tokens=config_json.get("num_audio_token", d.num_audio_tokens),
        audio_layers=config_json.get("audio_layers", d.audio_layers),
        audio_inject_layers=tuple(config_json.get("audio_inject_layers", d.audio_inject_layers)),
        cond_dim=config_json.get("cond_dim", d.cond_dim),
        motion_frames=config_json.get("motion_frames", d.motion_frames),
    )
