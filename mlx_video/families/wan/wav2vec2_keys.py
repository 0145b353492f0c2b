"""Key map for wav2vec 2.0 (transformers `Wav2Vec2Model` / `Wav2Vec2ForCTC` checkpoints) onto
`mlx_video.audio.wav2vec2.Wav2Vec2Model`.

Our parameter names are transformers' own, minus the `wav2vec2.` prefix of the task-head models. Two things
change on the way:

- Conv1d weights go from torch's (out, in, kernel) to MLX's channels-last (out, kernel, in).
- The positional convolution is stored weight-normalised (norm over every axis but the kernel axis, dim=2):
  either as `weight_g` / `weight_v` (older torch `weight_norm`, e.g. the 2021 xlsr-53 fine-tunes) or as
  `parametrizations.weight.original0` / `original1` (torch >= 2.1 parametrizations). The pair is folded into one
  plain weight, w = g * v / ||v||, before the rules run.
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx

from mlx_video.convert.formats import TensorFile
from mlx_video.convert.rules import KeyMap, Rule

_P = r"(?:wav2vec2\.)?"
_POS_CONV = "encoder.pos_conv_embed.conv"
# (magnitude g, direction v) key suffixes of the two weight-norm spellings.
_WEIGHT_NORM_PAIRS = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def conv1d_to_channels_last(w: mx.array) -> mx.array:
    """torch Conv1d weight (out, in/groups, kernel) -> MLX (out, kernel, in/groups)."""
    if w.ndim != 3:
        raise ValueError(f"expected a Conv1d weight (out, in, kernel), got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 1)


TRANSFORMERS_WAV2VEC2 = KeyMap(
    [
        Rule(_P + r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight",
             r"feature_extractor.conv_layers.\1.conv.weight", "conv1d_to_channels_last"),
        Rule(_P + r"feature_extractor\.conv_layers\.(\d+)\.(conv\.bias|layer_norm\.weight|layer_norm\.bias)",
             r"feature_extractor.conv_layers.\1.\2"),
        Rule(_P + r"feature_projection\.(layer_norm|projection)\.(weight|bias)", r"feature_projection.\1.\2"),
        Rule(_P + r"encoder\.pos_conv_embed\.conv\.weight", "encoder.pos_conv_embed.conv.weight",
             "conv1d_to_channels_last"),
        Rule(_P + r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv_embed.conv.bias"),
        Rule(_P + r"encoder\.layers\.(\d+)\.attention\.([qkv]_proj|out_proj)\.(weight|bias)",
             r"encoder.layers.\1.attention.\2.\3"),
        Rule(_P + r"encoder\.layers\.(\d+)\.(layer_norm|final_layer_norm)\.(weight|bias)",
             r"encoder.layers.\1.\2.\3"),
        Rule(_P + r"encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)",
             r"encoder.layers.\1.feed_forward.\2.\3"),
        Rule(_P + r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    ],
    # The CTC head and the SpecAugment mask embedding (training only) are not used for features.
    ignore=[r"lm_head\.(weight|bias)", _P + r"masked_spec_embed"],
    transforms={"conv1d_to_channels_last": conv1d_to_channels_last},
)


def fold_weight_norm(g: mx.array, v: mx.array, dim: int = 2) -> mx.array:
    """The weight that torch's weight_norm(dim=dim) computes from magnitude g and direction v (in float32)."""
    v32 = v.astype(mx.float32)
    axes = tuple(a for a in range(v.ndim) if a != dim)
    norm = mx.sqrt(mx.sum(v32 * v32, axis=axes, keepdims=True))
    if tuple(g.shape) != tuple(norm.shape):
        raise ValueError(f"weight-norm magnitude has shape {tuple(g.shape)}, expected {tuple(norm.shape)}")
    return (v32 * (g.astype(mx.float32) / norm)).astype(v.dtype)


def _fold_positional_conv(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    out = dict(weights)
    for prefix in ("", "wav2vec2."):
        base = prefix + _POS_CONV
        for g_name, v_name in _WEIGHT_NORM_PAIRS:
            g_key, v_key = f"{base}.{g_name}", f"{base}.{v_name}"
            if g_key in out or v_key in out:
                if g_key not in out or v_key not in out:
                    raise KeyError(f"weight-norm pair is incomplete: need both {g_key!r} and {v_key!r}")
                if f"{base}.weight" in out:
                    raise KeyError(f"{base!r} holds both a plain weight and a weight-norm pair")
                out[f"{base}.weight"] = fold_weight_norm(out.pop(g_key), out.pop(v_key))
    return out


def convert_wav2vec2_weights(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Rename (and reshape) a transformers wav2vec2 state dict onto Wav2Vec2Model's parameters.

    Raises KeyError listing keys that no rule maps, or when two source keys land on one parameter.
    """
    weights = _fold_positional_conv(weights)
    unknown = TRANSFORMERS_WAV2VEC2.unknown_keys(weights)
    if unknown:
        raise KeyError(f"keys that no wav2vec2 rule maps: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        hit = TRANSFORMERS_WAV2VEC2.apply(key, value)
        if hit is None:
            continue
        new_key, value = hit
        if new_key in out:
            raise KeyError(f"two source keys map to {new_key!r} (the second is {key!r})")
        out[new_key] = value
    return out


class WeightNormFolded(TensorFile):
    """A wav2vec2 checkpoint whose positional convolution is stored weight-normalised, shown with that pair
    folded into the one plain weight the rules above expect (the other tensors pass through unread)."""

    def __init__(self, inner: TensorFile):
        self.inner, self.paths, self.metadata = inner, inner.paths, inner.metadata
        self._shapes = {k: inner.shape(k) for k in inner.keys()}
        self._codes = {k: inner.code(k) for k in inner.keys()}
        self._folded: dict[str, tuple[str, str]] = {}
        for prefix in ("", "wav2vec2."):
            base = prefix + _POS_CONV
            for g_name, v_name in _WEIGHT_NORM_PAIRS:
                g_key, v_key = f"{base}.{g_name}", f"{base}.{v_name}"
                if g_key in self._shapes and v_key in self._shapes:
                    self._shapes[f"{base}.weight"] = self._shapes.pop(v_key)
                    self._codes[f"{base}.weight"] = "F32"
                    del self._shapes[g_key], self._codes[g_key], self._codes[v_key]
                    self._folded[f"{base}.weight"] = (g_key, v_key)

    def read(self, key, start=None, stop=None):
        if key not in self._folded:
            return self.inner.read(key, start, stop)
        g_key, v_key = self._folded[key]
        weight = fold_weight_norm(self.inner.read(g_key).astype(mx.float32), self.inner.read(v_key).astype(mx.float32))
        return weight[start:stop]

    def describe(self) -> str:
        return self.inner.describe()
