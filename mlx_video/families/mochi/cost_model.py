"""Mochi 1 preview's cost model: parameters, stored bytes, FLOPs and an activation-memory estimate of a
generation, from the configurations alone (no weights, no device). `MochiPipeline.estimate_memory` (the
preflight) and `mlx_video.cost.predict` use it.

FLOP convention (as Wan's, mlx_video/families/wan/cost_model.py): a linear layer costs 2 * rows * in * out; attention costs
4 * N_q * N_kv * d per layer (d = heads * head_dim); norms, RoPE and elementwise work are not counted. Over N
visual tokens and L text tokens (all L positions: an upper bound, padding is dropped):
  - per block: the visual stream's q|k|v (dim -> 3 dim), output projection and SwiGLU over N; the text stream's
    q|k|v (text_dim -> 3 dim), output projection (dim -> text_dim) and SwiGLU over L (the last block has no
    text output projection nor text MLP); the modulations are per sample, not per token (not counted); one
    joint attention over N + L;
  - the patch embedding and the output layer over N, the text projection (4096 -> text_dim) over L.
The T5-v1.1-XXL encoder runs over 256 tokens per prompt.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from mlx_video.cost import (
    DEFAULT_GROUP_SIZE, FlopBreakdown, ParamCount, PeakEstimate, bytes_per_weight, dtype_bytes, generation_flops,
)
from mlx_video.families.mochi.config import MOCHI_1_PREVIEW, MOCHI_VAE, MochiTransformerConfig, MochiVAEConfig

# What --quantize stores in low precision (mlx_video/families/mochi/planner.py uses the same pattern).
BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(attn\.(qkv_x|qkv_y|proj_x|proj_y)|mlp_[xy]\.w[12]|mod_[xy])\.weight")
T5_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.(gate|fc1|fc2))\.weight")
T5_XXL = dict(dim=4096, ffn=10240, heads=64, layers=24)


def token_grid(spec, width: int, height: int, frames: int,
               config: MochiTransformerConfig | None = None) -> tuple[int, int, int]:
    t, h, w = spec.latent_grid(width, height, frames)
    p = (config or spec.transformer).patch_size
    return t, h // p, w // p


def tokens(spec, width: int, height: int, frames: int, config: MochiTransformerConfig | None = None) -> int:
    return math.prod(token_grid(spec, width, height, frames, config))


def _count(module, pattern: re.Pattern) -> ParamCount:
    """Parameters of a lazily built module (nothing is materialised), split by `pattern`."""
    from mlx.utils import tree_flatten

    linear = other = 0
    for name, value in tree_flatten(module.parameters()):
        if pattern.fullmatch(name):
            linear += value.size
        else:
            other += value.size
    return ParamCount(linear, other)


@lru_cache(maxsize=8)
def transformer_params(config: MochiTransformerConfig = MOCHI_1_PREVIEW) -> ParamCount:
    from mlx_video.families.mochi.transformer import MochiTransformer

    return _count(MochiTransformer(config), BLOCK_LINEAR)


@lru_cache(maxsize=4)
def t5_params() -> ParamCount:
    """T5-v1.1-XXL encoder (our `T5Encoder` with its published config, the defaults of `T5Config`)."""
    from mlx_video.text_encoders.t5 import T5Config, T5Encoder

    return _count(T5Encoder(T5Config()), T5_BLOCK_LINEAR)


@lru_cache(maxsize=8)
def vae_params(vae_config: MochiVAEConfig = MOCHI_VAE, decoder_only: bool = False) -> int:
    from mlx.utils import tree_flatten

    from mlx_video.families.mochi.vae import MochiVAE

    vae = MochiVAE(vae_config)
    tree = vae.decoder.parameters() if decoder_only else vae.parameters()
    return sum(v.size for _, v in tree_flatten(tree))


def _bytes(count: ParamCount, dtype: str, quantize: str | None, group_size: int) -> int:
    return int(count.block_linear * bytes_per_weight(dtype, quantize, group_size) + count.other * dtype_bytes(dtype))


def weight_bytes(spec, dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 transformer: MochiTransformerConfig | None = None) -> dict[str, int]:
    """Bytes of each component as a converted folder stores them (the VAE in float32)."""
    expert = _bytes(transformer_params(transformer or spec.transformer), dtype, quantize, group_size)
    out = {
        "transformer_expert": expert,
        "transformer_all_experts": expert,
        "text_encoder": _bytes(t5_params(), dtype, quantize, group_size),
        "vae": vae_params() * 4,
    }
    out["total_on_disk"] = sum(v for k, v in out.items() if k != "transformer_all_experts")
    return out


def forward_flops(config: MochiTransformerConfig, n_tokens: int, text_len: int = 256, batch: int = 1) -> FlopBreakdown:
    d, dy, n, L = config.dim, config.text_dim, n_tokens, text_len
    layers = config.num_layers
    per_sample = {
        "patch_embed": 2 * n * config.patch_size**2 * config.in_channels * d,
        "text_embed": 2 * L * config.t5_dim * dy,
        "visual_linear": layers * 2 * n * (3 * d * d + d * d + 3 * d * config.ffn_dim),
        "text_linear": layers * 2 * L * 3 * dy * d + (layers - 1) * 2 * L * (d * dy + 3 * dy * config.text_ffn_dim),
        "self_attention": layers * 4 * (n + L) * (n + L) * d,
        "cross_attention": 0,
        "final_layer": 2 * n * d * config.patch_size**2 * config.out_channels,
    }
    return FlopBreakdown({k: float(v) * batch for k, v in per_sample.items()})


def step_flops(spec, width: int, height: int, frames: int, guidance: bool = True, layers: int | None = None) -> FlopBreakdown:
    """One denoising step: two forwards with classifier-free guidance, one without. `layers` limits the depth
    (reduced-depth benchmarks)."""
    from dataclasses import replace

    config = spec.transformer
    if layers is not None:
        config = replace(config, num_layers=min(layers, config.num_layers))
    return forward_flops(config, tokens(spec, width, height, frames), spec.default("text_len", 256),
                         batch=2 if guidance else 1)


def text_encoder_flops(prompts: int = 1, text_len: int = 256) -> float:
    c = T5_XXL
    linear = 2 * text_len * t5_params().block_linear
    attn = 4 * text_len * text_len * c["dim"] * c["layers"]
    return float(prompts * (linear + attn))


def video_flops(spec, width: int, height: int, frames: int, steps: int | None = None, guidance: bool = True) -> dict:
    """Transformer and text-encoder FLOPs of a generation (`guidance`: CFG, two prompts; the VAE is not modelled)."""
    steps = spec.steps if steps is None else steps
    text = text_encoder_flops(2 if guidance else 1, spec.default("text_len", 256))
    return generation_flops(step_flops(spec, width, height, frames, guidance).total, steps, text)


def activation_bytes(config: MochiTransformerConfig, n_tokens: int, batch: int = 1, dtype: str = "bf16",
                     text_len: int = 256, fused_attention: bool = True, attention=None) -> int:
    """Estimated peak activations of one transformer forward (weights excluded). Assumptions: MLX frees a buffer
    after its last consumer, so inside a block one stage is alive at a time; resident are the float32 visual and
    text streams (each with the block's new value being formed: twice), the RoPE tables (cos and sin, N x dim/2
    float32 each) and the input/output latents. The widest stage is the larger of
      attention: the modulated input (float32 and its cast), q|k|v (3 dim) over N + L in the compute dtype, q and
        k after norm and RoPE in float32 (their rotation's copies), the attention output (dim);
      visual MLP: the modulated input (float32 and its cast), w1's output (2 ffn), the gated product (ffn);
    without a fused attention kernel (MLX on CPU) the attention stage adds the float32 scores and their softmax,
    which `mlx_video.nn.attention` computes in query blocks kept under its budget (1 GiB by default).
    `attention`: the run's sparse self-attention (e.g. radial), which counts its own scores. The allocator's
    cache is not modelled."""
    d, f = config.dim, config.ffn_dim
    n, s = n_tokens, n_tokens + text_len
    e = dtype_bytes(dtype)
    resident = batch * 2 * (n * d + text_len * config.text_dim) * 4 + n * d * 4 + 2 * batch * n * config.in_channels * 4
    attention_stage = batch * (n * d * (4 + e) + s * (3 * d * e + 2 * d * 4 + d * e))
    mlp = batch * n * (d * (4 + e) + 3 * f * e)
    if not fused_attention:
        from mlx_video.nn.attention import blocked_score_bytes

        attention_stage += blocked_score_bytes(batch, config.num_heads, s, s, sparse=attention, head_dim=config.head_dim,
                                               itemsize=e)
    return int(resident + max(attention_stage, mlp))


def text_encoding_activation_bytes(prompts: int = 1, text_len: int = 256) -> int:
    """The T5 forward over `text_len` tokens per prompt: a few hidden-wide float32 states, the FFN's
    intermediates (gate, fc1, product) and one layer's attention scores (heads x L^2 float32, and softmax)."""
    c = T5_XXL
    return int(prompts * text_len * (6 * c["dim"] + 3 * c["ffn"]) * 4 + 2 * prompts * c["heads"] * text_len**2 * 4)


def decode_activation_bytes(width: int, height: int, frames: int, vae_config: MochiVAEConfig = MOCHI_VAE,
                            chunk_frames: int | None = None) -> int:
    """The VAE decoder's working set when it decodes `chunk_frames` latent frames at a time (all at once when
    None), by the rule `mlx_video/families/mochi/vae.py` states and measured: about 20 A + 256 MiB, where A is the
    widest activation (decoder channels[0] x (temporal_compression x chunk + 2) frames at full size, float32),
    plus the decoded video held as float32 twice (the chunks and their concatenation). Measured on MLX's CPU
    back-end at real widths (benchmarks/RESULTS.md, "Mochi 1"): 1.55 GiB against 1.53 GiB by this rule."""
    latent_frames = (frames - 1) // vae_config.temporal_compression + 1
    chunk = latent_frames if chunk_frames is None else min(chunk_frames, latent_frames)
    widest = vae_config.decoder_channels[0] * (vae_config.temporal_compression * chunk + 2) * height * width * 4
    return int(20 * widest + 256 * 2**20 + 2 * frames * height * width * 3 * 4)


def estimate_peak_memory(spec, width: int, height: int, frames: int, dtype: str = "bf16", quantize: str | None = None,
                         group_size: int = DEFAULT_GROUP_SIZE, guidance: bool = True, fused_attention: bool = True,
                         vae_chunk_frames: int | None = 1, transformer: MochiTransformerConfig | None = None,
                         vae_config: MochiVAEConfig | None = None, stored: dict | None = None,
                         text_len: int | None = None, attention=None, **_ignored) -> PeakEstimate:
    """Peak bytes of each stage, run one after the other with only that stage's weights resident:
    text_encoding (T5; two prompts with guidance), denoising (the transformer; `guidance`: CFG batched, batch 2),
    decoding (the VAE, `vae_chunk_frames` latent frames at a time, None: all at once). `stored`: the bytes the converted components
    hold ("text_encoder", "transformer_expert", "vae"), else computed from the published configs."""
    config = transformer or spec.transformer
    text_len = spec.default("text_len", 256) if text_len is None else text_len
    weights = weight_bytes(spec, dtype, quantize, group_size, config)
    if stored:
        weights.update({k: v for k, v in stored.items() if v})
    n = tokens(spec, width, height, frames, config)
    batch = 2 if guidance else 1
    stages = {
        "text_encoding": {"weights": weights["text_encoder"],
                          "activations": text_encoding_activation_bytes(batch, text_len)},
        "denoising": {"weights": weights["transformer_expert"],
                      "activations": activation_bytes(config, n, batch, dtype, text_len, fused_attention, attention)},
        "decoding": {"weights": weights["vae"],
                     "activations": decode_activation_bytes(width, height, frames, vae_config or MOCHI_VAE,
                                                            vae_chunk_frames)},
    }
    for stage in stages.values():
        stage["total"] = stage["weights"] + stage["activations"]
    peak = max(stages, key=lambda k: stages[k]["total"])
    return PeakEstimate(stages, peak)
