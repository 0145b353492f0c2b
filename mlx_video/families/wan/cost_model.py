"""Wan 2.2's cost model: parameters, stored bytes, FLOPs and activation memory of a generation, from the
configurations alone (no weights, no device). The memory preflight (`WanPipeline.estimate_memory`) and the
benchmarks both use it; `mlx_video/cost.py` holds what is not Wan's.

FLOP convention (what `torch.utils.flop_counter` counts; tests/test_bench.py checks it against FlopCounterMode):
  - a linear layer costs 2 * rows * in_features * out_features (biases, norms, activations, RoPE and other
    elementwise work are not counted);
  - attention costs 4 * N_q * N_kv * d per layer (QK^T and PV, d = the model width = heads * head_dim);
  - per block, over N video tokens and L text tokens: self-attention q, k, v, o (4 linears over N), cross-
    attention q and o over N and k, v over L, the FFN (2 linears over N), self-attention 4 N^2 d and cross-
    attention 4 N L d. Around the blocks: the patch embedding (a linear over N), the text embedding (2 linears
    over L), the time embedding and projection (over one row per timestep group) and the output head (over N).
"""

from __future__ import annotations

import math
from functools import lru_cache

from mlx_video.cost import (
    DEFAULT_GROUP_SIZE,
    FlopBreakdown,
    ParamCount,
    PeakEstimate,
    bytes_per_weight,
    dtype_bytes,
    generation_flops,
)
from mlx_video.families.wan.config import WanTransformerConfig


def token_grid(spec, width: int, height: int, frames: int, config: WanTransformerConfig | None = None) -> tuple[int, int, int]:
    """The transformer's token grid (f, h, w) after patching the latent."""
    t, h, w = spec.latent_grid(width, height, frames)
    pt, ph, pw = (config or spec.transformer).patch_size
    return t // pt, h // ph, w // pw


def tokens(spec, width: int, height: int, frames: int, config: WanTransformerConfig | None = None) -> int:
    return math.prod(token_grid(spec, width, height, frames, config))


def transformer_params(config: WanTransformerConfig) -> dict[str, ParamCount]:
    """Closed-form parameter count of `WanTransformer(config)`, per component."""
    d, f, p = config.dim, config.ffn_dim, math.prod(config.patch_size)
    attn_w = 4 * d * d
    block = ParamCount(
        block_linear=2 * attn_w + 2 * d * f,
        # q/k/v/o biases and q/k RMSNorm gains (x2 attentions), cross-attention LayerNorm, FFN biases, modulation
        other=2 * (4 * d + 2 * d) + 2 * d + (f + d) + 6 * d,
    )
    counts = {
        "patch_embedding": ParamCount(0, p * config.in_channels * d + d),
        "text_embedding": ParamCount(0, config.text_dim * d + d + d * d + d),
        "time_embedding": ParamCount(0, config.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d),
        "blocks": ParamCount(block.block_linear * config.num_layers, block.other * config.num_layers),
        "head": ParamCount(0, d * p * config.out_channels + p * config.out_channels + 2 * d),
    }
    context_blocks = len(getattr(config, "vace_layers", ()))
    if context_blocks:  # VACE: the context blocks (each a block, its hint projection; block 0 its input one)
        counts["vace_patch_embedding"] = ParamCount(0, p * config.vace_in_channels * d + d)
        counts["vace_blocks"] = ParamCount((block.block_linear + d * d) * context_blocks + d * d,
                                           (block.other + d) * context_blocks + d)
    return counts


def umt5_params(config=None) -> int:
    """UMT5-XXL encoder parameters (embedding, per-layer attention, gated FFN, norms, relative position bias)."""
    from mlx_video.text_encoders.umt5 import UMT5Config

    c = config or UMT5Config()
    inner = c.attn_dim
    layer = 4 * c.dim * inner + 3 * c.dim * c.ffn_dim + 2 * c.dim + c.num_buckets * c.num_heads
    return c.vocab_size * c.dim + c.num_layers * layer + c.dim


def vae_config_for(spec):
    from mlx_video.families.wan.vae import WAN21_VAE, WAN22_VAE

    return WAN22_VAE if spec.vae_stride[1] == 16 else WAN21_VAE


@lru_cache(maxsize=16)
def vae_params(vae_config, decoder_only: bool = False) -> int:
    """Counted from the module tree; building `WanVAE` is lazy (no parameter is materialised)."""
    from mlx.utils import tree_flatten

    from mlx_video.families.wan.vae import WanVAE

    vae = WanVAE(vae_config)
    tree = vae.decoder.parameters() if decoder_only else vae.parameters()
    n = sum(v.size for _, v in tree_flatten(tree))
    if decoder_only:
        n += sum(v.size for _, v in tree_flatten(vae.post_quant_conv.parameters()))
    return n


def transformer_weight_bytes(config: WanTransformerConfig, dtype: str = "bf16", quantize: str | None = None,
                             group_size: int = DEFAULT_GROUP_SIZE) -> int:
    counts = transformer_params(config)
    linear = sum(c.block_linear for c in counts.values())
    other = sum(c.other for c in counts.values())
    return int(linear * bytes_per_weight(dtype, quantize, group_size) + other * dtype_bytes(dtype))


def weight_bytes(spec, dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 text_dtype: str | None = None, vae_dtype: str = "fp32",
                 transformer: WanTransformerConfig | None = None) -> dict[str, int]:
    """Bytes of each component as the converted folder stores them. The text encoder is never quantized
    (convert/quantize.py) and the VAE runs in float32 (the pipeline keeps it so, as the official code does)."""
    expert = transformer_weight_bytes(transformer or spec.transformer, dtype, quantize, group_size)
    experts = spec.experts
    out = {
        "transformer_expert": expert,
        "transformer_all_experts": expert * experts,
        "text_encoder": umt5_params() * dtype_bytes(text_dtype or dtype),
        "vae": vae_params(vae_config_for(spec)) * dtype_bytes(vae_dtype),
    }
    out["total_on_disk"] = out["transformer_all_experts"] + out["text_encoder"] + out["vae"]
    return out


def forward_flops(config: WanTransformerConfig, n_tokens: int, text_len: int = 512, batch: int = 1,
                  timestep_groups: int = 1, layers: int | None = None) -> FlopBreakdown:
    """FLOPs of one transformer forward over `batch` samples of `n_tokens` video tokens each."""
    d, f, p = config.dim, config.ffn_dim, math.prod(config.patch_size)
    n, L = n_tokens, text_len
    depth = config.num_layers if layers is None else layers
    per_sample = {
        "patch_embedding": 2 * n * p * config.in_channels * d,
        "text_embedding": 2 * L * (config.text_dim * d + d * d),
        "time_embedding": 2 * timestep_groups * (config.freq_dim * d + d * d + 6 * d * d),
        "self_attn_qkvo": depth * 2 * n * 4 * d * d,
        "cross_attn_q_o": depth * 2 * n * 2 * d * d,
        "cross_attn_k_v": depth * 2 * L * 2 * d * d,
        "ffn": depth * 2 * n * 2 * d * f,
        "self_attention": depth * 4 * n * n * d,
        "cross_attention": depth * 4 * n * L * d,
        "head": 2 * n * d * p * config.out_channels,
    }
    return FlopBreakdown({k: float(v) * batch for k, v in per_sample.items()})


def _timestep_groups(spec, width, height, frames) -> int:
    # TI2V-5B gives each latent frame its own timestep; the runtime embeds one vector per frame (group).
    return token_grid(spec, width, height, frames)[0] if spec.default("per_frame_timesteps") else 1


def step_flops(spec, width: int, height: int, frames: int, guidance: bool = True,
               layers: int | None = None) -> FlopBreakdown:
    """One denoising step: one forward, or two (conditional and unconditional) with classifier-free guidance."""
    n = tokens(spec, width, height, frames)
    return forward_flops(spec.transformer, n, spec.default("text_len", 512), batch=2 if guidance else 1,
                         timestep_groups=_timestep_groups(spec, width, height, frames), layers=layers)


def text_encoder_flops(prompts: int = 2, text_len: int = 512) -> float:
    """UMT5 forward over `prompts` prompts of at most `text_len` tokens (an upper bound: the pipeline encodes
    only up to the longest prompt). Linear layers plus attention (4 L^2 inner per layer)."""
    from mlx_video.text_encoders.umt5 import UMT5Config

    c = UMT5Config()
    linear = 2 * text_len * (4 * c.dim * c.attn_dim + 3 * c.dim * c.ffn_dim) * c.num_layers
    attn = 4 * text_len * text_len * c.attn_dim * c.num_layers
    return float(prompts * (linear + attn))


def video_flops(spec, width: int, height: int, frames: int, steps: int | None = None, guidance: bool = True) -> dict:
    """Transformer FLOPs of a whole generation (the VAE decode is not modelled: see `predict`)."""
    steps = spec.steps if steps is None else steps
    text = text_encoder_flops(2 if guidance else 1, spec.default("text_len", 512))
    return generation_flops(step_flops(spec, width, height, frames, guidance).total, steps, text)


def activation_bytes(config: WanTransformerConfig, n_tokens: int, batch: int = 2, dtype: str = "bf16",
                     text_len: int = 512, fused_attention: bool = True, attention_budget_bytes: int | None = None,
                     attention=None) -> dict:
    """Estimated peak of the activations of one transformer forward (weights excluded).

    Assumptions (MLX evaluates the forward as one lazy graph; a buffer is freed after its last consumer ran):
      - resident through the forward: the float32 residual stream (B N d), the embedded context (B L d, compute
        dtype), the RoPE cos/sin tables (2 N head_dim float32), the patch input and the float32 output;
      - inside a block only one stage's intermediates are alive at once. Self-attention stage: the new residual
        (float32) + the modulated input (float32) and its cast + q, k, v after their norms + roped q, k + the
        attention output, all B N d in the compute dtype; without a fused kernel (MLX on CPU) also the score
        matrix and its softmax, 2 B heads N^2 in the compute dtype. FFN stage: the new residual and the
        modulated input (float32) + its cast + fc1 output and GELU output (B N ffn) + fc2 output (B N d);
      - the allocator's cache, fragmentation and MLX's own buffers are not modelled.
    """
    s = dtype_bytes(dtype)
    d, f, h, p = config.dim, config.ffn_dim, config.num_heads, math.prod(config.patch_size)
    bn = batch * n_tokens
    resident = {
        "residual_fp32": bn * d * 4,
        "context": batch * text_len * d * s,
        "rope_tables": 2 * n_tokens * config.head_dim * 4,
        "io": bn * p * (config.in_channels * s + config.out_channels * 4),
    }
    attn_stage = 2 * bn * d * 4 + bn * d * s * (1 + 3 + 2 + 1)
    if not fused_attention:
        # without a fused kernel the scores are materialised, but in query blocks under the attention budget
        # (mlx_video/nn/attention.py), so at most the budget is alive at once; `attention`: the run's sparse
        # attention (e.g. radial), which answers with its own figure
        from mlx_video.nn.attention import blocked_score_bytes

        attn_stage += blocked_score_bytes(batch, h, n_tokens, n_tokens, attention_budget_bytes, sparse=attention,
                                          head_dim=config.head_dim, itemsize=s)
    ffn_stage = 2 * bn * d * 4 + bn * d * s + 2 * bn * f * s + bn * d * s
    stages = {"self_attention": attn_stage, "ffn": ffn_stage}
    peak_stage = max(stages, key=stages.get)
    return {"resident": resident, "stages": stages, "peak_stage": peak_stage,
            "peak": sum(resident.values()) + stages[peak_stage]}


# float32 values alive per output pixel and decoder channel while one chunk (4 output frames) decodes, measured
# with mx.get_peak_memory on MLX's CPU backend: 581-586 at decoder widths 8 and 16 from 64x64 to 256x256, and
# 580-590 at the real width 96 (benchmarks/RESULTS.md, "VAE decode: the cost model against the measured peak").
# MLX's CPU conv3d unfolds the 3x3x3 neighbourhood of every output position before its matrix product, and
# several full-resolution activations are alive at once. On Metal the figure has not been measured: the earlier
# rule of thumb (6 copies of a 6-frame activation, 36) stays there until `mlxvid bench vae` runs on a Mac.
VAE_DECODE_VALUES_PER_PIXEL_CHANNEL = {"cpu": 600, "gpu": 36}


def vae_decode_values_per_pixel_channel() -> int:
    """The rule for this machine's backend (`VAE_DECODE_VALUES_PER_PIXEL_CHANNEL`)."""
    import mlx.core as mx

    return VAE_DECODE_VALUES_PER_PIXEL_CHANNEL["gpu" if mx.default_device() == mx.gpu else "cpu"]


def vae_decode_chunk_bytes(vae_config, width: int, height: int) -> int:
    """Activation bytes of decoding one latent frame (float32) at `width` x `height` output pixels, by the rule
    for this backend. The pipeline's tiling decision uses the same rule; `mlxvid bench vae` measures the real
    figure."""
    channels = vae_config.decoder_dim // vae_config.patch
    return vae_decode_values_per_pixel_channel() * width * height * channels * 4


def estimate_peak_memory(spec, width: int | None = None, height: int | None = None, frames: int | None = None,
                         dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                         guidance: bool = True, fused_attention: bool = True, vae_dtype: str = "fp32",
                         vae_tile: tuple[int, int] | None = None, *, transformer: WanTransformerConfig | None = None,
                         vae_config=None, stored: dict | None = None, text_len: int | None = None,
                         image_encoding: bool = False, sequence_ranks: int = 1, attention=None) -> PeakEstimate:
    """Peak memory of a generation, stage by stage, as the pipeline runs them one after the other (it frees
    each stage's model before loading the next; A14B keeps only the active expert resident).

    text_encoding: UMT5 weights + its activations (small: 2 prompts x 512 x 4096, a few copies).
    denoising: one expert's weights + `activation_bytes` + the latents + the prepared text (its embedding and
    every block's cross-attention K/V, at most text_len rows).
    decoding: VAE weights (float32) + `vae_decode_chunk_bytes` for the whole frame, or for one tile of
    `vae_tile` output pixels (tile_w, tile_h) when tiling.
    image_encoding (with an image): the VAE's weights and one chunk of its activations.
    Not modelled: the allocator's cache, the Python process and anything else on the machine.

    By default the published model's configuration and the bytes a conversion would store; a converted folder
    passes its own `transformer` / `vae_config` and the `stored` bytes of its components (keys as
    `weight_bytes`), so that the preflight and the benchmarks compute one and the same estimate. `attention`: the
    run's sparse self-attention (`Pipeline.attention_estimate`), None when dense.
    """
    w0, h0 = spec.default_size
    width, height, frames = width or w0, height or h0, frames or spec.frames
    config = transformer or spec.transformer
    text_len = text_len or spec.default("text_len", 512)
    n = tokens(spec, width, height, frames, config)
    batch = 2 if guidance else 1
    s = dtype_bytes(dtype)
    weights = weight_bytes(spec, dtype, quantize, group_size, vae_dtype=vae_dtype, transformer=config)
    weights.update(stored or {})
    t, lh, lw = spec.latent_grid(width, height, frames)
    latents = t * lh * lw * config.in_channels * 4 * 3  # latents, velocity and the sampler's history
    text_act = batch * text_len * config.text_dim * 4 * 8
    # Sequence-parallel over S ranks (mlx_video.distributed): a rank's activations cover N / S tokens, plus the
    # whole K and V gathered for self-attention.
    act = activation_bytes(config, n // sequence_ranks, batch, dtype, text_len, fused_attention,
                           attention=attention)["peak"]
    if sequence_ranks > 1:
        act += 2 * batch * n * config.dim * s
    # the prepared text: its embedding and every block's cross-attention keys and values, kept through the run
    # (at most text_len rows: the longest prompt's tokens + 1, the padding folded)
    context_blocks = len(getattr(config, "vace_layers", ()))
    prepared_text = batch * text_len * config.dim * s * (1 + 2 * (config.num_layers + context_blocks))
    if context_blocks:  # VACE: the conditioning latents and one float32 hint per context block, kept per pass
        latents += t * lh * lw * config.vace_in_channels * 4
        act += context_blocks * batch * n * config.dim * 4
    tw, th = vae_tile if vae_tile else (width, height)
    vae_act = vae_decode_chunk_bytes(vae_config or vae_config_for(spec), tw, th)
    stages = {
        "text_encoding": {"weights": weights["text_encoder"], "activations": text_act},
        "denoising": {"weights": weights["transformer_expert"], "activations": act + latents + prepared_text},
        "decoding": {"weights": weights["vae"], "activations": vae_act + frames * width * height * 3},
    }
    if image_encoding:
        stages["image_encoding"] = {"weights": weights["vae"], "activations": vae_act}
    for v in stages.values():
        v["total"] = int(v["weights"] + v["activations"])
    if weights["vae"] == 0:  # no VAE: the run stops at latents
        stages.pop("decoding")
    peak_stage = max(stages, key=lambda k: stages[k]["total"])
    return PeakEstimate(stages, peak_stage)
