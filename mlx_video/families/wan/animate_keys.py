"""Wan2.2-Animate-14B transformer checkpoints (diffusers `WanAnimateTransformer3DModel` and the official
`WanAnimateModel` names, which ComfyUI's single files keep) onto `WanAnimateTransformer`.

The official names are those of Wan-Video/Wan2.2 `wan/modules/animate/` (model_animate.py, motion_encoder.py,
face_blocks.py); the diffusers names those of diffusers 0.42.1 `transformer_wan_animate.py`. The backbone's
keys are the Wan 14B ones (`keys.py`); the rules here add the CLIP image context, the pose patch embedding and
the face-motion path. The official motion encoder keeps its fixed blur kernels as buffers (`...0.kernel`):
they are the [1, 3, 3, 1] filter our model builds in, and are dropped.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.image_encoders.clip_vision import conv2d_patch_to_linear
from mlx_video.families.wan.keys import (
    DIFFUSERS_IMAGE_CONTEXT_RULES,
    DIFFUSERS_TRANSFORMER,
    OFFICIAL_IMAGE_CONTEXT_RULES,
    OFFICIAL_TRANSFORMER,
)

_N = r"blocks\.(\d+)"
_WB = r"(weight|bias)"
_ME = r"motion_encoder\."
_APP = _ME + r"enc\.net_app\.convs\."


def conv2d_channels_last(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, kh, kw) -> MLX (O, kh, kw, I)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D Conv2d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 3, 1)


def conv1d_channels_last(w: mx.array) -> mx.array:
    """torch Conv1d weight (O, I, k) -> MLX (O, k, I)."""
    if w.ndim != 3:
        raise ValueError(f"expected a 3-D Conv1d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 1)


def flatten(w: mx.array) -> mx.array:
    """A vector stored with unit axes ((1, C, 1, 1) biases, the (1, 1, 1, dim) padding token) -> (C,)."""
    if sum(n != 1 for n in w.shape) > 1:
        raise ValueError(f"expected a vector with unit axes, got shape {tuple(w.shape)}")
    return w.reshape(-1)


TRANSFORMS = {"conv2d_channels_last": conv2d_channels_last, "conv1d_channels_last": conv1d_channels_last,
              "flatten": flatten}


def _res_block(param: str):
    """The target of an official `convs.<i>.<layer>...` key: residual block i - 1 (convs.0 is the input conv)."""
    return lambda m: f"motion_encoder.blocks.{int(m.group(1)) - 1}.{m.group(2)}.{param}"


_ANIMATE_DIFFUSERS = [
    Rule(r"pose_patch_embedding\.weight", "pose_embedding.weight", "conv3d_patch_to_linear"),
    Rule(r"pose_patch_embedding\.bias", "pose_embedding.bias"),
    *DIFFUSERS_IMAGE_CONTEXT_RULES,
    Rule(_ME + r"conv_in\.weight", "motion_encoder.conv_in.weight", "conv2d_channels_last"),
    Rule(_ME + r"conv_in\.act_fn\.bias", "motion_encoder.conv_in.bias"),
    Rule(_ME + r"res_blocks\.(\d+)\.(conv1|conv2)\.weight", r"motion_encoder.blocks.\1.\2.weight", "conv2d_channels_last"),
    Rule(_ME + r"res_blocks\.(\d+)\.(conv1|conv2)\.act_fn\.bias", r"motion_encoder.blocks.\1.\2.bias"),
    Rule(_ME + r"res_blocks\.(\d+)\.conv_skip\.weight", r"motion_encoder.blocks.\1.skip.weight", "conv2d_channels_last"),
    Rule(_ME + r"conv_out\.weight", "motion_encoder.conv_out.weight", "conv2d_channels_last"),
    Rule(_ME + rf"motion_network\.(\d+)\.{_WB}", r"motion_encoder.linears.\1.\2"),
    Rule(_ME + r"motion_synthesis_weight", "motion_encoder.direction"),
    Rule(r"face_encoder\.conv1_local\.weight", "face_encoder.conv1.weight", "conv1d_channels_last"),
    Rule(r"face_encoder\.conv1_local\.bias", "face_encoder.conv1.bias"),
    Rule(r"face_encoder\.(conv[23])\.weight", r"face_encoder.\1.weight", "conv1d_channels_last"),
    Rule(r"face_encoder\.(conv[23])\.bias", r"face_encoder.\1.bias"),
    Rule(rf"face_encoder\.out_proj\.{_WB}", r"face_encoder.out_proj.\1"),
    Rule(r"face_encoder\.padding_tokens", "face_encoder.padding_tokens", "flatten"),
    Rule(rf"face_adapter\.(\d+)\.to_q\.{_WB}", r"face_blocks.\1.q.\2"),
    Rule(rf"face_adapter\.(\d+)\.to_k\.{_WB}", r"face_blocks.\1.kv.\2#0"),
    Rule(rf"face_adapter\.(\d+)\.to_v\.{_WB}", r"face_blocks.\1.kv.\2#1"),
    Rule(rf"face_adapter\.(\d+)\.to_out\.{_WB}", r"face_blocks.\1.o.\2"),
    Rule(r"face_adapter\.(\d+)\.norm_([qk])\.weight", r"face_blocks.\1.norm_\2.weight"),
]

_ANIMATE_OFFICIAL = [
    Rule(r"pose_patch_embedding\.weight", "pose_embedding.weight", "conv3d_patch_to_linear"),
    Rule(r"pose_patch_embedding\.bias", "pose_embedding.bias"),
    *OFFICIAL_IMAGE_CONTEXT_RULES,
    Rule(_APP + r"0\.0\.weight", "motion_encoder.conv_in.weight", "conv2d_channels_last"),
    Rule(_APP + r"0\.1\.bias", "motion_encoder.conv_in.bias", "flatten"),
    Rule(_APP + r"(\d+)\.(conv1)\.0\.weight", _res_block("weight"), "conv2d_channels_last"),
    Rule(_APP + r"(\d+)\.(conv1)\.1\.bias", _res_block("bias"), "flatten"),
    Rule(_APP + r"(\d+)\.(conv2)\.1\.weight", _res_block("weight"), "conv2d_channels_last"),
    Rule(_APP + r"(\d+)\.(conv2)\.2\.bias", _res_block("bias"), "flatten"),
    Rule(_APP + r"(\d+)\.(skip)\.1\.weight", _res_block("weight"), "conv2d_channels_last"),
    Rule(_APP + r"\d+\.weight", "motion_encoder.conv_out.weight", "conv2d_channels_last"),
    Rule(_ME + rf"enc\.fc\.(\d+)\.{_WB}", r"motion_encoder.linears.\1.\2"),
    Rule(_ME + r"dec\.direction\.weight", "motion_encoder.direction"),
    Rule(r"face_encoder\.conv1_local\.conv\.weight", "face_encoder.conv1.weight", "conv1d_channels_last"),
    Rule(r"face_encoder\.conv1_local\.conv\.bias", "face_encoder.conv1.bias"),
    Rule(r"face_encoder\.(conv[23])\.conv\.weight", r"face_encoder.\1.weight", "conv1d_channels_last"),
    Rule(r"face_encoder\.(conv[23])\.conv\.bias", r"face_encoder.\1.bias"),
    Rule(rf"face_encoder\.out_proj\.{_WB}", r"face_encoder.out_proj.\1"),
    Rule(r"face_encoder\.padding_tokens", "face_encoder.padding_tokens", "flatten"),
    Rule(rf"face_adapter\.fuser_blocks\.(\d+)\.linear1_q\.{_WB}", r"face_blocks.\1.q.\2"),
    Rule(rf"face_adapter\.fuser_blocks\.(\d+)\.linear1_kv\.{_WB}", r"face_blocks.\1.kv.\2"),
    Rule(rf"face_adapter\.fuser_blocks\.(\d+)\.linear2\.{_WB}", r"face_blocks.\1.o.\2"),
    Rule(r"face_adapter\.fuser_blocks\.(\d+)\.([qk])_norm\.weight", r"face_blocks.\1.norm_\2.weight"),
]

DIFFUSERS_ANIMATE = KeyMap([*_ANIMATE_DIFFUSERS, *(r for _, r in DIFFUSERS_TRANSFORMER.rules)], transforms=TRANSFORMS)
OFFICIAL_ANIMATE = KeyMap([*_ANIMATE_OFFICIAL, *(r for _, r in OFFICIAL_TRANSFORMER.rules)],
                          ignore=[_APP + r"\d+\.(conv2|skip)\.0\.kernel"], transforms=TRANSFORMS)


# ---- the CLIP image encoder (mlx_video.image_encoders.clip_vision.CLIPVisionEncoder) ----
# transformers' CLIPVisionModel names (the diffusers folder's image_encoder/): TRANSFORMERS_CLIP_VISION, kept with
# the encoder, which HunyuanVideo-I2V's LLaVA tower shares.
_CLIP_TRANSFORMS = {"conv2d_patch_to_linear": conv2d_patch_to_linear, "flatten": flatten}


# the official open-clip XLM-RoBERTa ViT-H/14 file (Wan-Video/Wan2.2 wan/modules/animate/clip.py names): its
# vision tower; the text tower, the projection head and the logit scale are not used.
OFFICIAL_CLIP_VISION = KeyMap(
    [
        Rule(r"visual\.patch_embedding\.weight", "patch_embedding.weight", "conv2d_patch_to_linear"),
        Rule(r"visual\.cls_embedding", "class_embedding", "flatten"),
        Rule(r"visual\.pos_embedding", "position_embedding", "drop_leading_unit_axis"),
        Rule(rf"visual\.pre_norm\.{_WB}", r"pre_layernorm.\1"),
        Rule(rf"visual\.post_norm\.{_WB}", r"post_layernorm.\1"),
        Rule(rf"visual\.transformer\.(\d+)\.norm([12])\.{_WB}", r"layers.\1.layer_norm\2.\3"),
        Rule(rf"visual\.transformer\.(\d+)\.attn\.to_qkv\.{_WB}", r"layers.\1.qkv.\2"),
        Rule(rf"visual\.transformer\.(\d+)\.attn\.proj\.{_WB}", r"layers.\1.out_proj.\2"),
        Rule(rf"visual\.transformer\.(\d+)\.mlp\.0\.{_WB}", r"layers.\1.fc1.\2"),
        Rule(rf"visual\.transformer\.(\d+)\.mlp\.2\.{_WB}", r"layers.\1.fc2.\2"),
    ],
    ignore=[r"textual\..*", r"visual\.head(\..*)?", r"log_scale"],
    transforms=_CLIP_TRANSFORMS,
)
