"""Key maps for the UMT5-XXL text encoder: transformers' UMT5EncoderModel and the official Wan checkpoint.

Both map onto `mlx_video.text_encoders.umt5.UMT5Encoder`. No tensor needs a transform: every weight is stored
(out, in) for linears and (rows, cols) for embeddings in both formats, as in MLX.
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule

_BLOCK = r"encoder\.block\.(\d+)\.layer"

# transformers UMT5EncoderModel (also the encoder half of a full UMT5 / T5 v1.1 checkpoint).
# `shared.weight` and `encoder.embed_tokens.weight` are one tied tensor; a checkpoint may hold either or both,
# and both map to the token embedding (`transformers_umt5_weights` keeps one).
TRANSFORMERS_UMT5 = KeyMap(
    [
        Rule(r"shared\.weight", "token_embedding.weight"),
        Rule(r"encoder\.embed_tokens\.weight", "token_embedding.weight"),
        Rule(_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
        Rule(_BLOCK + r"\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
        Rule(_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", r"blocks.\1.pos_bias.weight"),
        Rule(_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
        Rule(r"encoder\.final_layer_norm\.weight", "norm.weight"),
    ],
    # The decoder and LM head of a full encoder-decoder checkpoint are not used.
    ignore=[r"decoder\..*", r"lm_head\.weight"],
)

# Official Wan checkpoint (models_t5_umt5-xxl-enc-bf16.pth), wan/modules/t5.py module names.
OFFICIAL_UMT5 = KeyMap(
    [
        Rule(r"token_embedding\.weight", "token_embedding.weight"),
        Rule(r"blocks\.(\d+)\.norm1\.weight", r"blocks.\1.norm1.weight"),
        Rule(r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
        Rule(r"blocks\.(\d+)\.pos_embedding\.embedding\.weight", r"blocks.\1.pos_bias.weight"),
        Rule(r"blocks\.(\d+)\.norm2\.weight", r"blocks.\1.norm2.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"blocks.\1.ffn.gate.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.fc1\.weight", r"blocks.\1.ffn.fc1.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.fc2\.weight", r"blocks.\1.ffn.fc2.weight"),
        Rule(r"norm\.weight", "norm.weight"),
    ]
)


def convert_umt5_weights(weights: Mapping[str, mx.array], keymap: KeyMap) -> dict[str, mx.array]:
    """Rename a whole state dict onto UMT5Encoder's parameter names.

    Raises KeyError listing the unknown keys. For transformers checkpoints that store the tied embedding twice,
    `shared.weight` is kept and `encoder.embed_tokens.weight` dropped.
    """
    unknown = keymap.unknown_keys(weights)
    if unknown:
        raise KeyError(f"keys that no UMT5 rule maps: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    keys = list(weights)
    if "shared.weight" in weights and "encoder.embed_tokens.weight" in weights:
        keys.remove("encoder.embed_tokens.weight")
    out: dict[str, mx.array] = {}
    for key in keys:
        hit = keymap.apply(key, weights[key])
        if hit is None:
            continue
        new_key, value = hit
        if new_key in out:
            raise KeyError(f"two source keys map to {new_key!r} (the second is {key!r})")
        out[new_key] = value
    return out
