"""HunyuanVideo 1.5's cost model: parameters, stored bytes, FLOPs and an activation-memory estimate of a
generation, from the configurations alone (no weights, no device). `Hunyuan15Pipeline.estimate_memory` (the
preflight), `mlxvid models` and `mlx_video.cost` use it.

FLOP convention (as the other families'): a linear layer costs 2 * rows * in * out; attention 4 * N_q * N_kv * d
per block (d = heads * head_dim); norms, RoPE and elementwise work are not counted. Over N video tokens and L text
tokens (an upper bound: the prompt's real tokens, at most 1000 Qwen tokens + 256 glyph bytes + 729 image tokens):
  - per block, each stream: q, k, v and output projections (4 d^2) and the MLP (2 d mlp) over its tokens, one joint
    attention over N + L;
  - the patch embedding and the output layer over N; the token refiner (its linear layers and its attention) over
    the Qwen tokens, `byt5_in` over the glyph bytes, `vision_in` over the image tokens (I2V);
  - the vectors of each sample: the time embeddings, the pooled-text embedding, the adaLN modulations.
These are the matrix products torch's FlopCounterMode counts on diffusers' HunyuanVideo15Transformer3DModel
(tests/test_bench.py compares the two at the reference's padded lengths).
The text encoders are Qwen2.5-VL-7B-Instruct's language model up to hidden state -3 (26 of its 28 layers:
hidden 3584, MLP 18944, 28 query / 4 key-value heads of 128, vocabulary 152064; its published config.json) and
ByT5-small's encoder (d_model 1472, 12 layers, d_ff 3584, 6 heads of 64), SigLIP so400m (1152 wide, 27 layers,
MLP 4304) for I2V. Decoding is the VAE module's own estimate (`vae.decode_memory_bytes`), its weights in float32.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from mlx_video.cost import DEFAULT_GROUP_SIZE, FlopBreakdown, ParamCount, PeakEstimate, bytes_per_weight, dtype_bytes

from .config import Hunyuan15Config

# What --quantize stores in low precision (the planner uses the same pattern).
BLOCK_LINEAR = re.compile(
    r"double_blocks\.\d+\.(img|txt)\.(mod|attn_[qkv]|attn_proj|mlp\.fc[12])\.weight"
    r"|txt_in\.blocks\.\d+\.(self_attn_qkv|self_attn_proj|mlp\.fc[12]|adaLN_modulation)\.weight"
)
QWEN = dict(dim=3584, mlp=18944, heads=28, kv_heads=4, head_dim=128, layers_used=26, vocab=152064)
BYT5 = dict(dim=1472, inner=384, ffn=3584, layers=12, vocab=384)
SIGLIP = dict(dim=1152, mlp=4304, layers=27, tokens=729, patch=14)
TEXT_TOKENS, GLYPH_TOKENS = 1000, 256


def token_grid(spec, width: int, height: int, frames: int, config: Hunyuan15Config | None = None):
    t, h, w = spec.latent_grid(width, height, frames)
    pt, ph, pw = (config or spec.transformer).patch_size
    return t // pt, h // ph, w // pw


def tokens(spec, width: int, height: int, frames: int, config: Hunyuan15Config | None = None) -> int:
    return math.prod(token_grid(spec, width, height, frames, config))


def text_tokens(spec) -> int:
    """The joint text sequence's upper bound: Qwen tokens, glyph bytes, and the image's tokens for I2V."""
    return TEXT_TOKENS + GLYPH_TOKENS + (SIGLIP["tokens"] if spec.task == "i2v" else 0)


@lru_cache(maxsize=8)
def transformer_params(config: Hunyuan15Config) -> ParamCount:
    from mlx.utils import tree_flatten

    from .transformer import Hunyuan15Transformer

    linear = other = 0
    for name, value in tree_flatten(Hunyuan15Transformer(config).parameters()):
        if BLOCK_LINEAR.fullmatch(name):
            linear += value.size
        else:
            other += value.size
    return ParamCount(linear, other)


def qwen_params() -> ParamCount:
    q = QWEN
    kv = q["kv_heads"] * q["head_dim"]
    layer = 2 * q["dim"] * q["dim"] + 2 * q["dim"] * kv + 3 * q["dim"] * q["mlp"]
    return ParamCount(q["layers_used"] * layer, q["vocab"] * q["dim"])


def byt5_params() -> int:
    b = BYT5
    return b["layers"] * (4 * b["dim"] * b["inner"] + 3 * b["dim"] * b["ffn"]) + b["vocab"] * b["dim"]


def siglip_params() -> int:
    s = SIGLIP
    return s["layers"] * (4 * s["dim"] ** 2 + 2 * s["dim"] * s["mlp"]) + 3 * s["patch"] ** 2 * s["dim"]


@lru_cache(maxsize=4)
def vae_params(config=None) -> int:
    from mlx.utils import tree_flatten

    from .vae import HUNYUAN15_VAE, Hunyuan15VAE

    return sum(v.size for _, v in tree_flatten(Hunyuan15VAE(config or HUNYUAN15_VAE).parameters()))


def _bytes(count: ParamCount, dtype: str, quantize: str | None, group_size: int) -> int:
    return int(count.block_linear * bytes_per_weight(dtype, quantize, group_size) + count.other * dtype_bytes(dtype))


def weight_bytes(spec, dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 transformer: Hunyuan15Config | None = None) -> dict[str, int]:
    """Bytes of each component as a converted folder stores them (the small encoders in --dtype)."""
    expert = _bytes(transformer_params(transformer or spec.transformer), dtype, quantize, group_size)
    encoders = byt5_params() + (siglip_params() if spec.task == "i2v" else 0)
    out = {"transformer_expert": expert, "transformer_all_experts": expert,
           "text_encoder": _bytes(qwen_params(), dtype, quantize, group_size),
           "text_encoder_2": encoders * dtype_bytes(dtype), "vae": vae_params() * 4}
    out["total_on_disk"] = sum(v for k, v in out.items() if k != "transformer_all_experts")
    return out


def forward_flops(config: Hunyuan15Config, n_tokens: int, text_len: int, batch: int = 1,
                  qwen_tokens: int = TEXT_TOKENS, glyph_tokens: int = GLYPH_TOKENS, image_tokens: int = 0,
                  timestep_r: bool | None = None) -> FlopBreakdown:
    """One forward over `n_tokens` video tokens and a joint text sequence of `text_len` tokens in the blocks; the
    token refiner runs over `qwen_tokens`, `byt5_in` over `glyph_tokens`, `vision_in` over `image_tokens` (each
    the length its embedder is given: diffusers' model runs them over the pipeline's padded 1000 / 256 / 729 and
    masks the padding; ours first drops the columns that are padding in every sample). "conditioning" is the
    work on one vector per sample: the time embeddings (`timestep_r`: MeanFlow's second one; default: the
    config's use_meanflow), the refiner's pooled-text embedding, every adaLN modulation."""
    c, d, n, L, blocks = config, config.hidden_size, n_tokens, text_len, config.num_blocks
    q, g, i, r, gh, p = qwen_tokens, glyph_tokens, image_tokens, config.num_refiner_blocks, config.glyph_hidden, \
        math.prod(config.patch_size)
    times = 2 if (c.use_meanflow if timestep_r is None else timestep_r) else 1
    per_sample = {
        "patch_embed": 2 * n * p * c.in_channels * d,
        "text_embed": 2 * q * (c.text_dim * d + r * (4 * d * d + 8 * d * d)) + r * 4 * q * q * d,
        "glyph_embed": 2 * g * (c.glyph_dim * gh + gh * gh + gh * d),
        "image_embed": 2 * i * (c.image_dim * c.image_dim + c.image_dim * d),
        "conditioning": 2 * (times + 1) * (c.freq_dim * d + d * d) + 2 * (c.text_dim * d + d * d)
        + r * 2 * d * 2 * d + blocks * 2 * 2 * d * 6 * d + 2 * d * 2 * d,
        "visual_linear": blocks * 2 * n * (4 * d * d + 2 * d * c.mlp_dim),
        "text_linear": blocks * 2 * L * (4 * d * d + 2 * d * c.mlp_dim),
        "self_attention": blocks * 4 * (n + L) * (n + L) * d,
        "cross_attention": 0,
        "final_layer": 2 * n * d * p * c.out_channels,
    }
    return FlopBreakdown({k: float(v) * batch for k, v in per_sample.items()})


def step_flops(spec, width: int, height: int, frames: int, guidance: bool = True, layers: int | None = None) -> FlopBreakdown:
    """One denoising step: two forwards with classifier-free guidance, one without; `layers` limits the depth."""
    from dataclasses import replace

    config = spec.transformer if layers is None else replace(spec.transformer, num_blocks=min(layers, spec.transformer.num_blocks))
    return forward_flops(config, tokens(spec, width, height, frames), text_tokens(spec), batch=2 if guidance else 1,
                         image_tokens=SIGLIP["tokens"] if spec.task == "i2v" else 0)


def text_encoder_flops(prompts: int = 1) -> float:
    q, b = QWEN, BYT5
    qwen = 2 * TEXT_TOKENS * qwen_params().block_linear + 4 * TEXT_TOKENS**2 * q["heads"] * q["head_dim"] * q["layers_used"]
    byt5 = 2 * GLYPH_TOKENS * byt5_params() + 4 * GLYPH_TOKENS**2 * b["inner"] * b["layers"]
    return float(prompts * (qwen + byt5))


def video_flops(spec, width: int, height: int, frames: int, steps: int | None = None, guidance: bool | None = None) -> dict:
    """Transformer and text-encoder FLOPs of a generation (`guidance`: CFG, default: the model's default scale > 1)."""
    steps = spec.steps if steps is None else steps
    guidance = spec.default("guidance", 1.0) > 1.0 if guidance is None else guidance
    per_step = step_flops(spec, width, height, frames, guidance).total
    text = text_encoder_flops(2 if guidance else 1)
    return {"per_step": per_step, "steps": steps, "denoising": per_step * steps, "text_encoder": text,
            "total": per_step * steps + text}


def activation_bytes(config: Hunyuan15Config, n_tokens: int, text_len: int, batch: int = 1, dtype: str = "bf16",
                     fused_attention: bool = True, attention=None) -> int:
    """Estimated peak activations of one forward (weights excluded), by the rule of the other families' models:
    resident are the float32 image and text streams (each with the block's new value being formed: twice), the
    RoPE tables and the input latents; the widest stage is the larger of the attention (the modulated input in
    float32 and its cast, q, k, v over N + L, q and k after norm and RoPE in float32, the output) and the MLP
    (the modulated input, fc1's output and its GELU); without a fused attention kernel the score blocks of
    `mlx_video.nn.attention` are added (`attention`: the run's sparse self-attention, e.g. radial, which counts its
    own scores and gathered keys). The allocator's cache is not modelled."""
    d, f, e = config.hidden_size, config.mlp_dim, dtype_bytes(dtype)
    n, s = n_tokens, n_tokens + text_len
    resident = batch * 2 * s * d * 4 + n * d * 4 + 2 * batch * n * config.in_channels * 4
    attention_stage = batch * (s * d * (4 + e) + s * (3 * d * e + 2 * d * 4 + d * e))
    mlp = batch * n * (d * (4 + e) + 2 * f * e)
    if not fused_attention:
        from mlx_video.nn.attention import blocked_score_bytes

        attention_stage += blocked_score_bytes(batch, config.num_heads, s, s, sparse=attention,
                                               head_dim=config.head_dim, itemsize=e)
    return int(resident + max(attention_stage, mlp))


def text_encoding_activation_bytes(prompts: int = 1) -> int:
    """Qwen over 1000 tokens (plus the template) per prompt: a few hidden-wide float32 states, the MLP's three
    intermediates, one layer's scores (heads x L^2 float32, and softmax)."""
    q, length = QWEN, TEXT_TOKENS + 108
    return int(prompts * length * (6 * q["dim"] + 3 * q["mlp"]) * 4 + 2 * prompts * q["heads"] * length**2 * 4)


def decode_activation_bytes(width: int, height: int, frames: int, vae_config=None, vae_tiling="tiled") -> int:
    from .vae import HUNYUAN15_VAE, VAETiling, decode_memory_bytes

    tiling = VAETiling() if vae_tiling == "tiled" else vae_tiling
    return decode_memory_bytes(width, height, frames, vae_config or HUNYUAN15_VAE, tiling)["total"]


def estimate_peak_memory(spec, width: int, height: int, frames: int, dtype: str = "bf16", quantize: str | None = None,
                         group_size: int = DEFAULT_GROUP_SIZE, guidance: bool | None = None,
                         fused_attention: bool = True, transformer: Hunyuan15Config | None = None,
                         stored: dict | None = None, vae_config=None, vae_tiling="tiled", image_encoding: bool = False,
                         attention=None, **_ignored) -> PeakEstimate:
    """Peak bytes of each stage, run one after the other with only that stage's weights resident: text_encoding
    (Qwen; two prompts with CFG) and denoising (the transformer; `guidance`: CFG batched, batch 2; default: the
    model's default scale > 1), decoding (the VAE with `vae_tiling`: a `VAETiling`, or "tiled" for its
    default 256-pixel tiles) and, with `image_encoding`, the I2V image's encoding (the VAE over one frame in
    256-pixel tiles, as the pipeline runs it; SigLIP runs after it, on 729 tokens). `attention`: the run's sparse
    self-attention (`Pipeline.attention_estimate`), None when dense."""
    config = transformer or spec.transformer
    guidance = spec.default("guidance", 1.0) > 1.0 if guidance is None else guidance
    weights = weight_bytes(spec, dtype, quantize, group_size, config)
    if stored:
        weights.update({k: v for k, v in stored.items() if v})
    batch = 2 if guidance else 1
    n = tokens(spec, width, height, frames, config)
    stages = {
        "text_encoding": {"weights": weights["text_encoder"], "activations": text_encoding_activation_bytes(batch)},
        "denoising": {"weights": weights["transformer_expert"],
                      "activations": activation_bytes(config, n, text_tokens(spec), batch, dtype, fused_attention,
                                                     attention)},
    }
    if image_encoding:
        from .vae import HUNYUAN15_VAE, VAETiling, encode_memory_bytes

        encode = encode_memory_bytes(width, height, 1, vae_config or HUNYUAN15_VAE, VAETiling())
        stages["image_encoding"] = {"weights": weights["vae"], "activations": encode["total"]}
    stages["decoding"] = {"weights": weights["vae"],
                          "activations": decode_activation_bytes(width, height, frames, vae_config, vae_tiling)}
    for stage in stages.values():
        stage["total"] = stage["weights"] + stage["activations"]
    peak = max(stages, key=lambda k: stages[k]["total"])
    return PeakEstimate(stages, peak)
