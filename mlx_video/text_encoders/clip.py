"""CLIP text model (HunyuanVideo's `text_encoder_2`, openai/clip-vit-large-patch14): its pooled output.

Written here rather than taken from a package: it is ~100 lines, and the MLX CLIP ports available are example
scripts or bring vision towers and their own loaders; this one loads with our key tables and shares the
project's tokenizer handling. Causal self-attention (no padding mask, as diffusers calls it), pre-LN blocks with
quick-GELU, a final LayerNorm; the pooled output is the final state at the end-of-text token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..json_config import JsonConfig
from .llama import JsonTokenizer

CLIP_TOKENS = 77


@dataclass(frozen=True)
class CLIPTextConfig(JsonConfig):
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # transformers' rule: with the legacy eos_token_id 2 the pooled token is the one with the highest id
    # (<|endoftext|> is the last of the vocabulary); otherwise the first eos_token_id.
    eos_token_id: int = 2

    @classmethod
    def from_transformers(cls, config_json: dict) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json, or a full CLIPModel one (its `text_config`)."""
        config = config_json.get("text_config", config_json)
        if config.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported")
        return cls.from_dict(config)


_ACTIVATIONS = {"quick_gelu": lambda x: x * mx.sigmoid(1.702 * x), "gelu": nn.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, dim = x.shape

        def heads(t):
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scale = 1.0 / math.sqrt(dim // self.num_heads)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.layers = [CLIPLayer(config) for _ in range(config.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        """input_ids (B, L) -> (last hidden state (B, L, hidden), pooled (B, hidden)), float32."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed CLIP's {self.config.max_position_embeddings} positions")
        positions = mx.arange(length)
        mask = positions[None, :] <= positions[:, None]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x).astype(mx.float32)
        if self.config.eos_token_id == 2:
            eos = mx.argmax(input_ids, axis=1)
        else:
            eos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=1)
        pooled = mx.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return x, pooled


def encode_pooled(
    encoder: CLIPTextEncoder, tokenizer: JsonTokenizer, prompts: Sequence[str], truncate: bool = True
) -> mx.array:
    """CLIP pooled output (B, hidden) float32 for the prompts, tokenized to 77 tokens (right padding).

    With `truncate`, a longer prompt keeps its first 76 tokens and its end-of-text token, as transformers'
    truncation does for diffusers and the official code."""
    ids = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        if len(tokens) > CLIP_TOKENS:
            if not truncate:
                raise ValueError(f"the prompt is {len(tokens)} CLIP tokens long, more than {CLIP_TOKENS}")
            tokens = tokens[: CLIP_TOKENS - 1] + tokens[-1:]
        ids.append(tokens + [tokenizer.pad_id] * (CLIP_TOKENS - len(tokens)))
    return encoder(mx.array(ids))[1]
