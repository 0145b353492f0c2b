"""SigLIP vision encoder (the so400m-patch14-384 tower of FLUX.1-Redux-dev, HunyuanVideo 1.5's image encoder)
and its image preprocessing.

Usage (a converted `image_encoder/` with its `config.json`; the released `feature_extractor/
preprocessor_config.json` for the preprocessing, or the defaults):

    encoder = SiglipVisionEncoder(SiglipVisionConfig.from_dict(folder.config("image_encoder")))
    folder.load_module("image_encoder", encoder)
    states = encode_image(encoder, image)  # image (H, W, 3) uint8 -> (1, 729, 1152) float32

The output is transformers' `SiglipVisionModel(...).last_hidden_state`: patch embedding (a convolution with
stride = kernel = patch) plus learned position embeddings, pre-norm encoder layers (LayerNorm, attention with
biases, LayerNorm, MLP with tanh-approximated GELU), then the post-LayerNorm. The attention-pooling head is
not part of it and is not built.

Preprocessing is `SiglipImageProcessor`'s: RGB, resized to 384 x 384 (no crop) with bicubic filtering, scaled
by 1/255, normalized with mean 0.5 and std 0.5. The resize is PIL's bicubic (antialiased when shrinking), as
transformers 4's `SiglipImageProcessor` (which the official HunyuanVideo-1.5 code pins) and transformers 5's
PIL backend do. transformers 5's default backend, where torchvision is installed, resizes with torch's
antialiased bicubic instead: up to 3 levels of 255 apart, 0.14 on average, on the tests' image (a bilinear
resize is 1.1 apart on average).

We wrote this encoder instead of importing mlx-vlm's (0.7.10): mlx-vlm declares a large runtime dependency set
(datasets, mlx-audio, opencv-python, fastapi, ...), and its SigLIP module is the text-image embedding model with
an exact-erf GELU, where this tower uses the tanh approximation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mlx_video.convert.rules import KeyMap, Rule

from ..errors import MlxVideoError
from ..json_config import JsonConfig

_ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu_new": nn.gelu_approx, "gelu": nn.gelu}


@dataclass(frozen=True)
class SiglipVisionConfig(JsonConfig):
    """google/siglip-so400m-patch14-384's vision tower: 27 layers of 1152 (16 heads), MLP 4304, 27 x 27 patches."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config_json: dict) -> "SiglipVisionConfig":
        """From a SiglipVisionModel config.json (or a SiglipModel one, through its `vision_config`)."""
        c = config_json.get("vision_config") or config_json
        act = c.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTIVATIONS:
            raise MlxVideoError(f"SigLIP vision config: hidden_act {act!r} is not supported "
                                f"(expected one of {sorted(_ACTIVATIONS)})")
        if c.get("hidden_size", 768) % c.get("num_attention_heads", 12):
            raise MlxVideoError("SigLIP vision config: hidden_size is not a multiple of num_attention_heads")
        return cls(hidden_size=c.get("hidden_size", 768), intermediate_size=c.get("intermediate_size", 3072),
                   num_layers=c.get("num_hidden_layers", 12), num_heads=c.get("num_attention_heads", 12),
                   image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 16),
                   num_channels=c.get("num_channels", 3), eps=c.get("layer_norm_eps", 1e-6), hidden_act=act)


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = (config.hidden_size // config.num_heads) ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.eps)
        self.mlp = SiglipMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)
        self.layers = [SiglipLayer(config) for _ in range(config.num_layers)]
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        """pixels (B, image_size, image_size, C) normalized, channels last -> (B, patches, hidden) float32."""
        expected = (self.config.image_size, self.config.image_size, self.config.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise MlxVideoError(f"SigLIP expects pixels of shape (B, {', '.join(map(str, expected))}), "
                                f"got {tuple(pixels.shape)}")
        dtype = self.post_layernorm.weight.dtype
        x = self.patch_embedding(pixels.astype(dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position_embedding.weight
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x).astype(mx.float32)


# --- preprocessing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiglipPreprocess:
    """The fields of a SigLIP `preprocessor_config.json` that the preprocessing uses (defaults: so400m-384's)."""

    height: int = 384
    width: int = 384
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_file(cls, path: str | Path) -> "SiglipPreprocess":
        try:
            c = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise MlxVideoError(f"could not read the SigLIP preprocessor config {path}: {e}") from e
        if c.get("resample", 3) != 3 or c.get("do_resize", True) is False:
            raise MlxVideoError(f"{path}: only bicubic resizing (resample 3) is supported")
        size = c.get("size") or {}
        d = cls()
        return cls(height=size.get("height", d.height), width=size.get("width", d.width),
                   rescale_factor=c.get("rescale_factor", d.rescale_factor),
                   image_mean=tuple(c.get("image_mean", d.image_mean)), image_std=tuple(c.get("image_std", d.image_std)))


def preprocess_image(image: np.ndarray, settings: SiglipPreprocess = SiglipPreprocess()) -> mx.array:
    """(H, W, 3) uint8 RGB -> (1, height, width, 3) float32 pixels, as SiglipImageProcessor prepares them."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise MlxVideoError(f"SigLIP preprocessing expects an (H, W, 3) uint8 RGB image, got {image.shape} "
                            f"{image.dtype}")
    resized = Image.fromarray(image).resize((settings.width, settings.height), Image.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) * np.float32(settings.rescale_factor)
    pixels = (pixels - np.array(settings.image_mean, np.float32)) / np.array(settings.image_std, np.float32)
    return mx.array(pixels[None])


def encode_image(encoder: SiglipVisionEncoder, image: np.ndarray,
                 settings: SiglipPreprocess = SiglipPreprocess()) -> mx.array:
    """An (H, W, 3) uint8 RGB image -> (1, patches, hidden) float32 SigLIP states (last_hidden_state)."""
    return encoder(preprocess_image(image, settings))


# --- checkpoint names -------------------------------------------------------------------------------------


def conv2d_channels_last(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, kh, kw) -> MLX (O, kh, kw, I)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D Conv2d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 3, 1)


# transformers SiglipVisionModel names (transformers 5; older saves, such as FLUX.1-Redux-dev's image_encoder/, prefix
# them with `vision_model.`), also inside a full SiglipModel; the attention-pooling
# head, the text tower and the logit scale/bias are not used.
_V = r"(?:vision_model\.)?"

SIGLIP_VISION_KEYS = KeyMap(
    [
        Rule(rf"{_V}embeddings\.patch_embedding\.weight", "patch_embedding.weight", "conv2d_channels_last"),
        Rule(rf"{_V}embeddings\.patch_embedding\.bias", "patch_embedding.bias"),
        Rule(rf"{_V}embeddings\.position_embedding\.weight", "position_embedding.weight"),
        Rule(rf"{_V}encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)", r"layers.\1.\2.\3"),
        Rule(rf"{_V}encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
             r"layers.\1.self_attn.\2.\3"),
        Rule(rf"{_V}encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
        Rule(rf"{_V}post_layernorm\.(weight|bias)", r"post_layernorm.\1"),
    ],
    ignore=[rf"{_V}head\..*", rf"{_V}embeddings\.position_ids", r"text_model\..*", r"logit_(scale|bias)"],
    transforms={"conv2d_channels_last": conv2d_channels_last},
)
