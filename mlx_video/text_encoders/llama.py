"""HunyuanVideo's LLM text encoder: the LLaVA-Llama-3-8B language model, run with mlx_lm's Llama.

HunyuanVideo (`dit-llm-encode-video`) wraps the prompt in a fixed system/user template, tokenizes it to
256 + 95 tokens (right padding), runs the language model with the padding masked out, takes the hidden state
`hidden_states[-(2 + 1)]` (the output of the third-to-last decoder layer, i.e. after all but the last two
layers, without the final norm) and drops the 95 template positions: (B, 256, 4096) plus a (B, 256) mask.

Tokenization reads `tokenizer.json` with the `tokenizers` library: transformers 5 rebuilds Llama 3's
byte-level tokenizer as a SentencePiece-style one that splits the template into 174 tokens instead of 95.

Importing this module (the template, the tokenizer) imports neither mlx_lm nor transformers. Building the
encoder (`llama_args`, `LlamaTextEncoder`), i.e. encoding a prompt, imports `mlx_lm.models.llama`, and the
`mlx_lm` package imports transformers (and torch, where installed) when it is first imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxVideoError

if TYPE_CHECKING:
    from mlx_lm.models.llama import ModelArgs

VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
VIDEO_TEMPLATE_CROP_START = 95
TEXT_TOKENS = 256
SKIP_LAYERS = 2


class JsonTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library, padded on the right to a fixed length.

    The pad id is the `pad_token` of a `tokenizer_config.json` beside the file, else `pad_token` given here.
    """

    def __init__(self, path: str | Path, pad_token: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
            raise MlxVideoError(f"could not read the tokenizer file {path}: {e}") from e
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        config_file = path.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                configured = json.loads(config_file.read_text()).get("pad_token")
            except (ValueError, RecursionError, AttributeError):
                raise MlxVideoError(f"{config_file} is not a JSON object; re-run `mlxvid convert`") from None
            if isinstance(configured, dict):
                configured = configured.get("content")
            pad_token = configured or pad_token
        if pad_token is None:
            raise MlxVideoError(f"no pad token configured for {path}")
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise MlxVideoError(f"the pad token {pad_token!r} is not in the vocabulary of {path}")
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens (Llama 3: a leading <|begin_of_text|>)."""
        return self.tokenizer.encode(text).ids

    def __call__(self, texts: Sequence[str], max_length: int, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (len(texts), max_length) int32; mask is 1 on real tokens.

        A text longer than max_length raises unless `truncate`, which keeps the first max_length tokens."""
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            if len(tokens) > max_length:
                if not truncate:
                    raise MlxVideoError(f"the text is {len(tokens)} tokens long, more than the {max_length} allowed")
                tokens = tokens[:max_length]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


def template_crop_start(tokenizer: JsonTokenizer, template: str = VIDEO_TEMPLATE) -> int:
    """Tokens before the prompt, counted as diffusers does: the template's tokens minus `{}` and <|eot_id|>."""
    return len(tokenizer.encode(template)) - 2


# transformers' LlamaConfig defaults: a LLaVA config.json saved by transformers 4 keeps in its `text_config` only
# the fields that differ from these (LLaVA-Llama-3-8B's has no hidden_size, num_hidden_layers, num_attention_heads)
TRANSFORMERS_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                                   tie_word_embeddings=False)


def llama_args(config_json: dict) -> ModelArgs:
    """mlx_lm ModelArgs from a transformers Llama config.json, old (`rope_theta`, `rope_scaling`) or
    transformers 5 style (`rope_parameters`), or from a LLaVA config (its `text_config`); a field left out takes
    transformers' default. Imports mlx_lm."""
    from mlx_lm.models.llama import ModelArgs

    config = {**TRANSFORMERS_LLAMA_DEFAULTS, **config_json.get("text_config", config_json)}
    rope = config.pop("rope_parameters", None)
    if rope:
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config["model_type"] = "llama"
    return ModelArgs.from_dict(config)


class TruncatedDecoder(nn.Module):
    """An mlx_lm decoder model (as `model`) returning the hidden state `skip_layers + 1` from the end, unnormed.

    The last `skip_layers` decoder layers and the final norm never contribute, so they are not built
    (0.44B parameters for Llama-3-8B); `drop_unused` removes their tensors from converted weights.
    """

    def __init__(self, model: nn.Module, num_layers: int, skip_layers: int):
        super().__init__()
        if not 0 <= skip_layers < num_layers:
            raise ValueError(f"skip_layers={skip_layers} for a {num_layers}-layer model")
        self.skip_layers = skip_layers
        self.model = model
        self.model.layers = self.model.layers[: num_layers - skip_layers]
        del self.model["norm"]

    def is_unused(self, key: str) -> bool:
        """Whether a converted key names a tensor of the layers (or the final norm) this encoder does not build
        (a conversion plan's key map can drop those)."""
        parts = key.split(".")
        if key == "model.norm.weight":
            return True
        return parts[:2] == ["model", "layers"] and int(parts[2]) >= len(self.model.layers)

    def drop_unused(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Converted weights without the tensors of the layers (and final norm) this encoder does not build."""
        return {k: v for k, v in weights.items() if not self.is_unused(k)}

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """input_ids, attention_mask: (B, L). Returns (B, L, hidden) float32; padding keys are masked out."""
        return self.from_embeddings(self.model.embed_tokens(input_ids), attention_mask)

    def from_embeddings(self, h: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """The same from the input embeddings (B, L, hidden) (e.g. text with image features spliced in)."""
        length = h.shape[1]
        positions = mx.arange(length)
        mask = positions[None, :] <= positions[:, None]  # (query, key) causal
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]
        for layer in self.model.layers:
            h = layer(h, mask)
        return h.astype(mx.float32)


class LlamaTextEncoder(TruncatedDecoder):
    """mlx_lm's LlamaModel (as `model`) returning the hidden state `skip_layers + 1` from the end, unnormed."""

    def __init__(self, args: ModelArgs | dict, skip_layers: int = SKIP_LAYERS):
        from mlx_lm.models.llama import LlamaModel  # here, not at the top: mlx_lm's package imports transformers

        if isinstance(args, dict):
            args = llama_args(args)
        super().__init__(LlamaModel(args), args.num_hidden_layers, skip_layers)
        self.args = args


def encode_prompts(
    encoder: LlamaTextEncoder,
    tokenizer: JsonTokenizer,
    prompts: Sequence[str],
    template: str = VIDEO_TEMPLATE,
    crop_start: int | None = VIDEO_TEMPLATE_CROP_START,
    text_tokens: int = TEXT_TOKENS,
    truncate: bool = False,
) -> tuple[mx.array, mx.array]:
    """Text states (B, text_tokens, hidden) float32 and mask (B, text_tokens) int32 for the prompts.

    `crop_start` is checked against the tokenizer (None: take the tokenizer's count, as diffusers does), so a
    tokenizer that splits the template differently fails here instead of shifting every prompt.
    A prompt longer than `text_tokens` tokens raises unless `truncate`.
    """
    counted = template_crop_start(tokenizer, template)
    if crop_start is None:
        crop_start = counted
    elif counted != crop_start:
        raise MlxVideoError(
            f"the tokenizer splits the prompt template into {counted} tokens before the prompt, expected "
            f"{crop_start}; it is not the Llama 3 tokenizer HunyuanVideo was trained with"
        )
    texts = [template.format(p) for p in prompts]
    ids, mask = tokenizer(texts, crop_start + text_tokens, truncate=truncate)
    states = encoder(mx.array(ids), mx.array(mask))
    return states[:, crop_start:], mx.array(mask[:, crop_start:])
