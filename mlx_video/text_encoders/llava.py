"""HunyuanVideo-I2V's text encoder: LLaVA-Llama-3-8B (transformers `LlavaForConditionalGeneration`) reading the
prompt together with the image, as diffusers' `HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds` runs it.

- The prompt goes into a system/user/assistant template whose system turn holds one `<image>` token.
- The image (CLIP-preprocessed, 336 x 336 in the release) goes through the CLIP ViT-L/14 vision tower; its hidden
  state `vision_feature_layer` (-2) without the class token ("default" selection: 576 tokens) goes through the
  projector (linear, GELU, linear) into the language model's width, and those features take the place of the
  `<image>` token in the input embeddings.
- The language model runs as for HunyuanVideo T2V (`llama.py`: hidden state -3, padding keys masked).
- Cropping keeps, in this order: every `image_embed_interleave`-th image token (4 for the token-replace
  transformer, 2 for the latent-concat one), then the prompt's tokens and what follows the assistant header
  (its "\\n\\n" and the padding), leaving out the template before the prompt and the 4 tokens between the
  prompt and that "\\n\\n" (<|eot_id|>, <|start_header_id|>, assistant, <|end_header_id|>).

The vision tower and projector are one converted component (`image_encoder/`, `LlavaImageEncoder`); the
language model is the same `text_encoder/` as T2V's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxVideoError
from ..image_encoders.clip_vision import CLIPPreprocess, CLIPVisionConfig, CLIPVisionEncoder
from ..json_config import JsonConfig
from .llama import TEXT_TOKENS, JsonTokenizer, TruncatedDecoder

I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
I2V_TEMPLATE_CROP_START = 103  # the template's tokens before the prompt (the <image> token counted once)
IMAGE_TOKEN = "<image>"
END_HEADER = "<|end_header_id|>"
ASSISTANT_HEADER_TOKENS = 4  # <|eot_id|> <|start_header_id|> assistant <|end_header_id|>: cut after the prompt


@dataclass(frozen=True)
class LlavaImageConfig(JsonConfig):
    """The vision side of a LLaVA model: the CLIP tower's config, the layer read, the projector, the image token."""

    vision: dict = field(default_factory=dict)  # a CLIPVisionConfig's fields
    text_dim: int = 4096
    feature_layer: int = -2
    keep_class_token: bool = False  # LLaVA's vision_feature_select_strategy "full" (True) or "default"
    projector_bias: bool = True
    image_token_id: int = 128257
    preprocess: dict = field(default_factory=dict)  # a CLIPPreprocess's fields

    @classmethod
    def from_transformers(cls, config_json: dict, processor_json: dict | None = None) -> "LlavaImageConfig":
        """From a `LlavaForConditionalGeneration` config.json (and the image processor's preprocessor_config)."""
        vision = config_json.get("vision_config") or {}
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"the vision tower is {vision.get('model_type')!r}; only a CLIP one is supported")
        layer = config_json.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only one layer is supported")
        if config_json.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act={config_json['projector_hidden_act']!r} is not supported")
        strategy = config_json.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported")
        text = config_json.get("text_config") or {}
        preprocess = CLIPPreprocess.from_transformers(processor_json) if processor_json else CLIPPreprocess(336, 336)
        image_token = config_json.get("image_token_index", config_json.get("image_token_id", 128257))
        return cls(CLIPVisionConfig.from_transformers(vision).to_dict(), int(text.get("hidden_size", 4096)), layer,
                   strategy == "full", bool(config_json.get("multimodal_projector_bias", True)), int(image_token),
                   preprocess.to_dict())

    @property
    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig.from_dict(self.vision)

    @property
    def image_tokens(self) -> int:
        cfg = self.vision_config
        return (cfg.image_size // cfg.patch_size) ** 2 + (1 if self.keep_class_token else 0)


class LlavaImageEncoder(nn.Module):
    """CLIP vision tower + multi-modal projector: preprocessed pixels -> the features the `<image>` token becomes."""

    def __init__(self, config: LlavaImageConfig):
        super().__init__()
        self.config = config
        vision = config.vision_config
        self.vision = CLIPVisionEncoder(vision)
        self.linear_1 = nn.Linear(vision.hidden_size, config.text_dim, bias=config.projector_bias)
        self.linear_2 = nn.Linear(config.text_dim, config.text_dim, bias=config.projector_bias)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) normalised pixels -> (B, image_tokens, text_dim) float32."""
        states = self.vision.hidden_state(pixels, self.config.feature_layer)
        if not self.config.keep_class_token:
            states = states[:, 1:]
        return self.linear_2(nn.gelu(self.linear_1(states))).astype(mx.float32)

    def encode_image(self, image: np.ndarray) -> mx.array:
        """(H, W, 3) uint8 RGB -> (1, image_tokens, text_dim): `CLIPImageProcessor`'s preprocessing, then the tower."""
        pixels = CLIPPreprocess.from_dict(self.config.preprocess)(image) if self.config.preprocess \
            else CLIPPreprocess(336, 336)(image)
        return self(mx.array(pixels)[None])


def template_crop_start(tokenizer: JsonTokenizer, template: str = I2V_TEMPLATE) -> int:
    """The template's tokens before the prompt."""
    return len(tokenizer.encode(template.split("{}")[0]))


def splice(embeddings: mx.array, mask: mx.array, at: int, features: mx.array) -> tuple[mx.array, mx.array]:
    """The token at `at` replaced by the image's features (B, n, dim) (as LLaVA does), its mask by n ones."""
    batch, n = embeddings.shape[0], features.shape[1]
    features = mx.broadcast_to(features.astype(embeddings.dtype), (batch, n, embeddings.shape[2]))
    h = mx.concatenate([embeddings[:, :at], features, embeddings[:, at + 1:]], axis=1)
    m = mx.concatenate([mask[:, :at], mx.ones((batch, n), dtype=mask.dtype), mask[:, at + 1:]], axis=1)
    return h, m


def image_position(ids: np.ndarray, image_token_id: int) -> int:
    """Where the one `<image>` token is (the same in every row)."""
    rows, cols = np.nonzero(ids == image_token_id)
    if len(rows) != ids.shape[0] or len(set(cols.tolist())) != 1:
        raise MlxVideoError(f"the prompt template must hold exactly one {IMAGE_TOKEN} token, at the same place in "
                            "every prompt (is it in the tokenizer's vocabulary?)")
    return int(cols[0])


def crop(states: mx.array, ids: np.ndarray, mask: np.ndarray, at: int, image_tokens: int, crop_start: int,
         end_header_id: int, interleave: int) -> tuple[mx.array, mx.array]:
    """(states, mask) kept for the transformer: every `interleave`-th image token, then the prompt and what follows
    the assistant header (positions in `ids` / `mask`, before the image was spliced in)."""
    shift = image_tokens - 1
    rows, masks = [], []
    for b in range(ids.shape[0]):
        headers = np.nonzero(ids[b] == end_header_id)[0]
        if len(headers) == 0 or headers[-1] - ASSISTANT_HEADER_TOKENS + 1 < crop_start:
            raise MlxVideoError("the prompt template lost its assistant header (the prompt is too long)")
        after = int(headers[-1]) + 1
        cut = after - ASSISTANT_HEADER_TOKENS
        text = mx.concatenate([states[b, crop_start + shift:cut + shift], states[b, after + shift:]], axis=0)
        text_mask = np.concatenate([mask[b, crop_start:cut], mask[b, after:]])
        image = states[b, at:at + image_tokens][::interleave]
        rows.append(mx.concatenate([image, text], axis=0))
        masks.append(np.concatenate([np.ones(image.shape[0], np.int32), text_mask]))
    return mx.stack(rows), mx.array(np.stack(masks).astype(np.int32))


def encode_prompts_with_image(
    llama: TruncatedDecoder,
    image_encoder: LlavaImageEncoder,
    tokenizer: JsonTokenizer,
    prompts: Sequence[str],
    image: np.ndarray,
    interleave: int,
    crop_start: int = I2V_TEMPLATE_CROP_START,
    text_tokens: int = TEXT_TOKENS,
    template: str = I2V_TEMPLATE,
) -> tuple[mx.array, mx.array]:
    """Text states (B, image_tokens / interleave + text_tokens - 4, hidden) float32 and their mask (int32) for the
    prompts read with the (H, W, 3) uint8 image. A prompt longer than `text_tokens` tokens raises."""
    counted = template_crop_start(tokenizer, template)
    if counted != crop_start:
        raise MlxVideoError(f"the tokenizer splits the image prompt template into {counted} tokens before the "
                            f"prompt, expected {crop_start}; it is not LLaVA-Llama-3's tokenizer")
    end_header = tokenizer.tokenizer.token_to_id(END_HEADER)
    if end_header is None:
        raise MlxVideoError(f"the tokenizer has no {END_HEADER} token; it is not LLaVA-Llama-3's tokenizer")
    ids, mask = tokenizer([template.format(p) for p in prompts], crop_start + text_tokens)
    at = image_position(ids, image_encoder.config.image_token_id)
    features = image_encoder.encode_image(image)
    text_ids = np.where(ids == image_encoder.config.image_token_id, 0, ids)  # the image token has no embedding
    h, m = splice(llama.model.embed_tokens(mx.array(text_ids)), mx.array(mask), at, features)
    states = llama.from_embeddings(h, m)
    return crop(states, ids, mask, at, features.shape[1], crop_start, end_header, interleave)
