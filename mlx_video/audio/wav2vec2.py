"""wav2vec 2.0 speech encoder, "stable layer norm" variant (wav2vec2-large-xlsr-53 and its fine-tunes).

Wan2.2-S2V reads its audio through `wav2vec2-large-xlsr-53-english` and uses every hidden state, so this
module returns all of them. The architecture:

- a feature encoder of 1-D convolutions over the raw 16 kHz waveform, each followed by a LayerNorm over the
  channels and GELU (`feat_extract_norm="layer"`); 320 samples per output step (20 ms) at the default strides;
- a feature projection: LayerNorm, then Linear to the model width;
- a positional embedding added once: a wide grouped convolution ("same" padding, the extra step of an even
  kernel dropped), then GELU; its weight norm is folded into a plain weight at conversion;
- pre-LN transformer layers (`do_stable_layer_norm=True`) and a final LayerNorm.

Hidden states follow transformers <= 4.x, which the official S2V code pins (4.49-4.51.3): state i < L is the
input of layer i (state 0 is the projected features plus the positional embedding) and state L is the final
LayerNorm of the last layer's output. (transformers 5 records the last layer's output before that LayerNorm
instead.) There is no attention mask: the official extraction runs one unpadded waveform.

Channels-last throughout: activations are (batch, time, channels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from ..json_config import JsonConfig
from ..nn.attention import attention


@dataclass(frozen=True)
class Wav2Vec2Config(JsonConfig):
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    # The feature encoder's LayerNorms are built without an eps argument in the reference: torch's 1e-5.
    conv_layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have one entry per convolution")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError("hidden_size must be divisible by num_conv_pos_embedding_groups")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def output_length(self, num_samples: int) -> int:
        """Feature steps produced from `num_samples` waveform samples (valid convolutions, no padding)."""
        length = num_samples
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            length = (length - kernel) // stride + 1
        return length

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_dim"], d["conv_kernel"], d["conv_stride"] = (
            list(self.conv_dim), list(self.conv_kernel), list(self.conv_stride)
        )
        return d

    @classmethod
    def from_transformers(cls, config_json: dict) -> "Wav2Vec2Config":
        """Read a transformers Wav2Vec2 config.json, refusing variants this module does not implement."""
        # name: (value this port implements, transformers' default when the field is missing)
        wanted = {
            "do_stable_layer_norm": (True, False),
            "feat_extract_norm": ("layer", "group"),
            "hidden_act": ("gelu", "gelu"),
            "feat_extract_activation": ("gelu", "gelu"),
            "add_adapter": (False, False),
        }
        for name, (value, default) in wanted.items():
            got = config_json.get(name, default)
            if got != value:
                raise ValueError(f"this wav2vec2 port needs {name}={value!r}; the config.json has {got!r}")
        if config_json.get("adapter_attn_dim") is not None:
            raise ValueError("wav2vec2 attention adapters (adapter_attn_dim) are not supported")
        return cls.from_dict(config_json)


class ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, eps: float):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(out_dim, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.layer_norm(self.conv(x)))


class FeatureEncoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        dims = (1,) + tuple(config.conv_dim)
        self.conv_layers = [
            ConvLayer(dims[i], dims[i + 1], k, s, config.conv_bias, config.conv_layer_norm_eps)
            for i, (k, s) in enumerate(zip(config.conv_kernel, config.conv_stride))
        ]

    def __call__(self, waveform: mx.array) -> mx.array:
        x = waveform[..., None]  # (B, samples, 1)
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.projection(self.layer_norm(x))


class PositionalConv(nn.Module):
    """Grouped convolution over time, weight norm already folded into `conv.weight`."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        kernel = config.num_conv_pos_embeddings
        self.conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            kernel,
            padding=kernel // 2,
            groups=config.num_conv_pos_embedding_groups,
        )
        # Padding by kernel // 2 on both sides yields one step too many for an even kernel; the last is dropped.
        self.drop_last = kernel % 2 == 0

    def __call__(self, x: mx.array) -> mx.array:
        y = self.conv(x)
        if self.drop_last:
            y = y[:, :-1]
        return nn.gelu(y)


class Attention(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v))


class FeedForward(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.output_dense(nn.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attention(self.layer_norm(x))
        return x + self.feed_forward(self.final_layer_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = PositionalConv(config)
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Wav2Vec2Model(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        self.encoder = Encoder(config)

    def hidden_states(self, input_values: mx.array) -> list[mx.array]:
        """All num_hidden_layers + 1 hidden states, each (B, T, hidden_size), for (B, samples) input values.

        `input_values` are the processor's output: the 16 kHz waveform normalised to zero mean and unit
        variance (see `mlx_video.audio.features.normalize_waveform`).
        """
        if input_values.ndim != 2:
            raise ValueError(f"input_values must be (batch, samples), got shape {input_values.shape}")
        x = self.feature_projection(self.feature_extractor(input_values))
        x = x + self.encoder.pos_conv_embed(x)
        states = []
        for layer in self.encoder.layers:
            states.append(x)
            x = layer(x)
        states.append(self.encoder.layer_norm(x))
        return states

    def __call__(self, input_values: mx.array) -> mx.array:
        """The last hidden state (after the final LayerNorm)."""
        return self.hidden_states(input_values)[-1]
