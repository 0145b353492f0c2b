"""CLIP vision tower (transformers `CLIPVisionModel`; Wan2.2-Animate's image encoder is open-clip ViT-H/14) and
its image preprocessing (transformers `CLIPImageProcessor`).

The Animate pipeline (diffusers `WanAnimatePipeline.encode_image`) takes `hidden_states[-2]`: the tokens (class
token first) after all but the last encoder layer, without the final LayerNorm; `penultimate` returns exactly
that. Pre-LN blocks, no mask; q, k and v are one fused projection (as the official open-clip file stores them;
transformers' three are joined at conversion).

Preprocessing follows `CLIPImageProcessor` with its published settings (shortest edge 224, bicubic, centre
crop 224x224, rescale by 1/255, the OpenAI mean and std): the image's shorter side is resized to `size` with
Pillow's bicubic filter on the 8-bit image (the longer side to int(size * long / short)), the centre
`crop` x `crop` is cut at ((h - crop) // 2, (w - crop) // 2), then normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.json_config import JsonConfig
from mlx_video.nn.attention import attention

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# transformers' CLIPVisionConfig defaults (ViT-B/32), for config files that leave fields out
TRANSFORMERS_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass(frozen=True)
class CLIPVisionConfig(JsonConfig):
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config_json: dict) -> "CLIPVisionConfig":
        """From a CLIPVisionModel config.json, or a full CLIPModel one (its `vision_config`). A field the file leaves
        out takes transformers' `CLIPVisionConfig` default (older transformers save only the fields that differ
        from those, e.g. no `hidden_act` for quick_gelu)."""
        config = {**TRANSFORMERS_DEFAULTS, **config_json.get("vision_config", config_json)}
        if config["hidden_act"] not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported")
        return cls.from_dict(config)


# Published: open-clip ViT-H/14 (the "clip-vit-huge-patch14" image encoder of the Wan 2.1 I2V / Animate releases).
CLIP_VIT_H14 = CLIPVisionConfig()


@dataclass(frozen=True)
class CLIPPreprocess(JsonConfig):
    """`CLIPImageProcessor`'s settings (from its preprocessor_config.json)."""

    size: int = 224  # the shortest edge after resizing
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_transformers(cls, config_json: dict) -> "CLIPPreprocess":
        size, crop = config_json.get("size", {}), config_json.get("crop_size", {})
        size = size.get("shortest_edge", 224) if isinstance(size, dict) else int(size)
        crop = crop.get("height", 224) if isinstance(crop, dict) else int(crop)
        if isinstance(config_json.get("crop_size"), dict) and crop != config_json["crop_size"].get("width", crop):
            raise ValueError(f"a non-square CLIP crop is not supported: {config_json['crop_size']}")
        if config_json.get("resample", 3) != 3 or not config_json.get("do_center_crop", True):
            raise ValueError("only CLIPImageProcessor's bicubic resize with a centre crop is supported")
        return cls(size, crop, tuple(config_json.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(config_json.get("image_std", OPENAI_CLIP_STD)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (crop, crop, 3) float32, normalised."""
        from PIL import Image

        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        if top < 0 or left < 0:
            raise ValueError(f"the resized image {new_w}x{new_h} is smaller than the {self.crop}x{self.crop} crop")
        pixels = resized[top:top + self.crop, left:left + self.crop].astype(np.float64) / 255.0
        return ((pixels - np.array(self.mean)) / np.array(self.std)).astype(np.float32)


ACTIVATIONS = {"quick_gelu": lambda x: x * mx.sigmoid(1.702 * x), "gelu": nn.gelu}


class VisionLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, dim)
        self.activation = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dim = x.shape
        q, k, v = (t.reshape(batch, length, self.heads, -1) for t in mx.split(self.qkv(self.layer_norm1(x)), 3, axis=-1))
        x = x + self.out_proj(attention(q, k, v))
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))


class CLIPVisionEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Linear(p * p * config.num_channels, dim, bias=False)
        self.class_embedding = mx.zeros((dim,))
        self.position_embedding = mx.zeros((config.num_positions, dim))
        self.pre_layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = [VisionLayer(config) for _ in range(config.num_hidden_layers)]
        self.post_layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)  # loaded, unused by `penultimate`

    def embed(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) normalised pixels (S = image_size) -> (B, 1 + patches, dim), after the pre-LayerNorm."""
        cfg = self.config
        batch, h, w, c = pixels.shape
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"CLIP takes {cfg.image_size}x{cfg.image_size} images, got {w}x{h}")
        p = cfg.patch_size
        patches = pixels.reshape(batch, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch_embedding(patches.reshape(batch, (h // p) * (w // p), p * p * c))
        cls = mx.broadcast_to(self.class_embedding, (batch, 1, tokens.shape[-1]))
        return self.pre_layernorm(mx.concatenate([cls, tokens], axis=1) + self.position_embedding)

    def penultimate(self, pixels: mx.array) -> mx.array:
        """`hidden_states[-2]` of transformers' CLIPVisionModel: the tokens after all but the last layer."""
        return self.hidden_state(pixels, -2)

    def hidden_state(self, pixels: mx.array, index: int) -> mx.array:
        """`hidden_states[index]` of transformers' CLIPVisionModel (0: the embeddings; the last: after every
        layer, without the post-LayerNorm)."""
        count = len(self.layers) + 1
        if not -count <= index < count:
            raise ValueError(f"hidden state {index} of a {len(self.layers)}-layer CLIP tower")
        x = self.embed(pixels)
        for layer in self.layers[:index % count]:
            x = layer(x)
        return x


# ---- key table: transformers' CLIPVisionModel -> this encoder (shared by Wan's image context and Animate, and
# HunyuanVideo-I2V's LLaVA vision tower) ----
_WB = r"(weight|bias)"


def conv2d_patch_to_linear(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, p, p) with kernel == stride -> Linear weight (O, p*p*I), features (kh, kw, I)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D Conv2d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


_V = r"(?:vision_model\.)?"  # transformers 4 files have the prefix, transformers 5 saves without it
_L = r"layers\.(\d+)"

# transformers CLIPVisionModel (the diffusers folder's image_encoder/)
TRANSFORMERS_CLIP_VISION = KeyMap(
    [
        Rule(_V + r"embeddings\.patch_embedding\.weight", "patch_embedding.weight", "conv2d_patch_to_linear"),
        Rule(_V + r"embeddings\.class_embedding", "class_embedding"),
        Rule(_V + r"embeddings\.position_embedding\.weight", "position_embedding"),
        Rule(_V + rf"pre_layrnorm\.{_WB}", r"pre_layernorm.\1"),
        Rule(_V + rf"post_layernorm\.{_WB}", r"post_layernorm.\1"),
        Rule(_V + rf"encoder\.{_L}\.(layer_norm[12])\.{_WB}", r"layers.\1.\2.\3"),
        Rule(_V + rf"encoder\.{_L}\.self_attn\.q_proj\.{_WB}", r"layers.\1.qkv.\2#0"),
        Rule(_V + rf"encoder\.{_L}\.self_attn\.k_proj\.{_WB}", r"layers.\1.qkv.\2#1"),
        Rule(_V + rf"encoder\.{_L}\.self_attn\.v_proj\.{_WB}", r"layers.\1.qkv.\2#2"),
        Rule(_V + rf"encoder\.{_L}\.self_attn\.out_proj\.{_WB}", r"layers.\1.out_proj.\2"),
        Rule(_V + rf"encoder\.{_L}\.mlp\.(fc[12])\.{_WB}", r"layers.\1.\2.\3"),
    ],
    ignore=[_V + r"embeddings\.position_ids", r"visual_projection\.weight"],
    transforms={"conv2d_patch_to_linear": conv2d_patch_to_linear},
)
