"""A FLOP and memory model of a registry model's generation, and a time prediction for Apple chips.

Everything here is arithmetic on the published configurations (no weights, no device): token counts,
FLOPs per transformer forward / step / video, bytes of weights per component, an activation estimate for one
transformer forward, `estimate_peak_memory` (meant for the runtime's preflight) and `predict`.

FLOP convention (the one of /work/shared/MODELS.md §8, and what `torch.utils.flop_counter` counts):
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
from dataclasses import dataclass, field, replace
from functools import lru_cache

from .models.wan.config import WanTransformerConfig

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANT_BITS = {"q8": 8, "q4": 4, "fp8": 8}
DEFAULT_GROUP_SIZE = 64
GB = 1e9
GIB = 2**30


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}") from None


# ---------------------------------------------------------------------------------------------- geometry


def latent_grid(spec, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a video of `frames` frames of width x height."""
    st, sh, sw = spec.vae_stride
    if (frames - 1) % st:
        raise ValueError(f"{spec.id} needs a frame count of the form {st}k+1, got {frames}")
    m = spec.size_multiple
    if width % m or height % m:
        raise ValueError(f"{spec.id} needs width and height multiples of {m}, got {width}x{height}")
    return (frames - 1) // st + 1, height // sh, width // sw


def token_grid(spec, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """The transformer's token grid (f, h, w) after patching the latent."""
    t, h, w = latent_grid(spec, width, height, frames)
    pt, ph, pw = spec.transformer.patch_size
    return t // pt, h // ph, w // pw


def tokens(spec, width: int, height: int, frames: int) -> int:
    return math.prod(token_grid(spec, width, height, frames))


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one component, split into the block linear weights (what --quantize stores in low
    precision, see convert/quantize.py) and everything else."""

    block_linear: int
    other: int

    @property
    def total(self) -> int:
        return self.block_linear + self.other


def transformer_params(config: WanTransformerConfig) -> dict[str, ParamCount]:
    """Closed-form parameter count of `WanTransformer(config)`, per component."""
    d, f, p = config.dim, config.ffn_dim, math.prod(config.patch_size)
    attn_w = 4 * d * d
    block = ParamCount(
        block_linear=2 * attn_w + 2 * d * f,
        # q/k/v/o biases and q/k RMSNorm gains (x2 attentions), cross-attention LayerNorm, FFN biases, modulation
        other=2 * (4 * d + 2 * d) + 2 * d + (f + d) + 6 * d,
    )
    return {
        "patch_embedding": ParamCount(0, p * config.in_channels * d + d),
        "text_embedding": ParamCount(0, config.text_dim * d + d + d * d + d),
        "time_embedding": ParamCount(0, config.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d),
        "blocks": ParamCount(block.block_linear * config.num_layers, block.other * config.num_layers),
        "head": ParamCount(0, d * p * config.out_channels + p * config.out_channels + 2 * d),
    }


def umt5_params(config=None) -> int:
    """UMT5-XXL encoder parameters (embedding, per-layer attention, gated FFN, norms, relative position bias)."""
    from .text_encoders.umt5 import UMT5Config

    c = config or UMT5Config()
    inner = c.attn_dim
    layer = 4 * c.dim * inner + 3 * c.dim * c.ffn_dim + 2 * c.dim + c.num_buckets * c.num_heads
    return c.vocab_size * c.dim + c.num_layers * layer + c.dim


def vae_config_for(spec):
    from .models.wan.vae import WAN21_VAE, WAN22_VAE

    return WAN22_VAE if spec.vae_stride[1] == 16 else WAN21_VAE


@lru_cache(maxsize=16)
def vae_params(vae_config, decoder_only: bool = False) -> int:
    """Counted from the module tree; building `WanVAE` is lazy (no parameter is materialised)."""
    from mlx.utils import tree_flatten

    from .models.wan.vae import WanVAE

    vae = WanVAE(vae_config)
    tree = vae.decoder.parameters() if decoder_only else vae.parameters()
    n = sum(v.size for _, v in tree_flatten(tree))
    if decoder_only:
        n += sum(v.size for _, v in tree_flatten(vae.post_quant_conv.parameters()))
    return n


def bytes_per_weight(dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Stored bytes per weight of a block linear layer. Affine q8/q4: the codes plus one scale and one bias
    (in `dtype`) per group; fp8: one byte (its single float32 scale per tensor is negligible)."""
    if quantize is None:
        return _dtype_bytes(dtype)
    if quantize not in QUANT_BITS:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_BITS)}, not {quantize!r}")
    codes = QUANT_BITS[quantize] / 8
    if quantize == "fp8":
        return codes
    return codes + 2 * _dtype_bytes(dtype) / group_size


def transformer_weight_bytes(config: WanTransformerConfig, dtype: str = "bf16", quantize: str | None = None,
                             group_size: int = DEFAULT_GROUP_SIZE) -> int:
    counts = transformer_params(config)
    linear = sum(c.block_linear for c in counts.values())
    other = sum(c.other for c in counts.values())
    return int(linear * bytes_per_weight(dtype, quantize, group_size) + other * _dtype_bytes(dtype))


def weight_bytes(spec, dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 text_dtype: str | None = None, vae_dtype: str = "fp32") -> dict[str, int]:
    """Bytes of each component as the converted folder stores them. The text encoder is never quantized
    (convert/quantize.py) and the VAE runs in float32 (the pipeline keeps it so, as the official code does)."""
    expert = transformer_weight_bytes(spec.transformer, dtype, quantize, group_size)
    experts = 2 if spec.two_experts else 1
    out = {
        "transformer_expert": expert,
        "transformer_all_experts": expert * experts,
        "text_encoder": umt5_params() * _dtype_bytes(text_dtype or dtype),
        "vae": vae_params(vae_config_for(spec)) * _dtype_bytes(vae_dtype),
    }
    out["total_on_disk"] = out["transformer_all_experts"] + out["text_encoder"] + out["vae"]
    return out


# ---------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one transformer forward, by component (see the module docstring for what is counted)."""

    components: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.components.values()))

    @property
    def attention(self) -> float:
        return float(self.components["self_attention"] + self.components["cross_attention"])

    @property
    def linear(self) -> float:
        return self.total - self.attention

    def scaled(self, factor: float) -> "FlopBreakdown":
        return FlopBreakdown({k: v * factor for k, v in self.components.items()})


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


def per_block_flops(config: WanTransformerConfig, n_tokens: int, text_len: int = 512, batch: int = 1) -> float:
    one = forward_flops(config, n_tokens, text_len, batch, layers=1).total
    none = forward_flops(config, n_tokens, text_len, batch, layers=0).total
    return one - none


def _timestep_groups(spec, width, height, frames) -> int:
    # TI2V-5B gives each latent frame its own timestep; the runtime embeds one vector per frame (group).
    return token_grid(spec, width, height, frames)[0] if spec.per_frame_timesteps else 1


def step_flops(spec, width: int, height: int, frames: int, guidance: bool = True,
               layers: int | None = None) -> FlopBreakdown:
    """One denoising step: one forward, or two (conditional and unconditional) with classifier-free guidance."""
    n = tokens(spec, width, height, frames)
    return forward_flops(spec.transformer, n, spec.text_len, batch=2 if guidance else 1,
                         timestep_groups=_timestep_groups(spec, width, height, frames), layers=layers)


def text_encoder_flops(prompts: int = 2, text_len: int = 512) -> float:
    """UMT5 forward over `prompts` prompts of at most `text_len` tokens (an upper bound: the pipeline encodes
    only up to the longest prompt). Linear layers plus attention (4 L^2 inner per layer)."""
    from .text_encoders.umt5 import UMT5Config

    c = UMT5Config()
    linear = 2 * text_len * (4 * c.dim * c.attn_dim + 3 * c.dim * c.ffn_dim) * c.num_layers
    attn = 4 * text_len * text_len * c.attn_dim * c.num_layers
    return float(prompts * (linear + attn))


def video_flops(spec, width: int, height: int, frames: int, steps: int | None = None, guidance: bool = True) -> dict:
    """Transformer FLOPs of a whole generation (the VAE decode is not modelled: see `predict`)."""
    steps = spec.steps if steps is None else steps
    per_step = step_flops(spec, width, height, frames, guidance).total
    text = text_encoder_flops(2 if guidance else 1, spec.text_len)
    return {"per_step": per_step, "steps": steps, "denoising": per_step * steps, "text_encoder": text,
            "total": per_step * steps + text}


# ---------------------------------------------------------------------------------------------- activations


def activation_bytes(config: WanTransformerConfig, n_tokens: int, batch: int = 2, dtype: str = "bf16",
                     text_len: int = 512, fused_attention: bool = True) -> dict:
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
    s = _dtype_bytes(dtype)
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
        attn_stage += 2 * batch * h * n_tokens * n_tokens * s
    ffn_stage = 2 * bn * d * 4 + bn * d * s + 2 * bn * f * s + bn * d * s
    stages = {"self_attention": attn_stage, "ffn": ffn_stage}
    peak_stage = max(stages, key=stages.get)
    return {"resident": resident, "stages": stages, "peak_stage": peak_stage,
            "peak": sum(resident.values()) + stages[peak_stage]}


def vae_decode_chunk_bytes(vae_config, width: int, height: int) -> int:
    """Rough activation bytes of decoding one latent frame (float32): the widest full-resolution stage holds
    about 6 copies of a (4 output frames + 2 cached) x H x W x C activation, the rule of thumb the pipeline's
    tiling decision uses. An estimate; `mlx_video.bench vae` measures the real figure."""
    channels = vae_config.decoder_dim // vae_config.patch
    return 6 * 6 * width * height * channels * 4


@dataclass(frozen=True)
class PeakEstimate:
    stages: dict  # stage -> {"weights": bytes, "activations": bytes, "total": bytes}
    peak_stage: str

    @property
    def peak_bytes(self) -> int:
        return self.stages[self.peak_stage]["total"]

    def to_dict(self) -> dict:
        return {"stages": self.stages, "peak_stage": self.peak_stage, "peak_bytes": self.peak_bytes}


def estimate_peak_memory(spec, width: int | None = None, height: int | None = None, frames: int | None = None,
                         dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                         guidance: bool = True, fused_attention: bool = True, vae_dtype: str = "fp32",
                         vae_tile: tuple[int, int] | None = None) -> PeakEstimate:
    """Peak memory of a generation, stage by stage, as the pipeline runs them one after the other (it frees
    each stage's model before loading the next; A14B keeps only the active expert resident).

    text_encoding: UMT5 weights + its activations (small: 2 prompts x 512 x 4096, a few copies).
    denoising: one expert's weights + `activation_bytes` + the latents and context.
    decoding: VAE weights (float32) + `vae_decode_chunk_bytes` for the whole frame, or for one tile of
    `vae_tile` output pixels (tile_w, tile_h) when tiling.
    Not modelled: the allocator's cache, the Python process and anything else on the machine.
    """
    w0, h0 = spec.default_size
    width, height, frames = width or w0, height or h0, frames or spec.frames
    n = tokens(spec, width, height, frames)
    batch = 2 if guidance else 1
    s = _dtype_bytes(dtype)
    weights = weight_bytes(spec, dtype, quantize, group_size, vae_dtype=vae_dtype)
    t, lh, lw = latent_grid(spec, width, height, frames)
    latents = t * lh * lw * spec.transformer.in_channels * 4 * 3  # latents, velocity and the sampler's history
    text_act = batch * spec.text_len * 4096 * 4 * 8
    act = activation_bytes(spec.transformer, n, batch, dtype, spec.text_len, fused_attention)["peak"]
    tw, th = vae_tile if vae_tile else (width, height)
    vae_act = vae_decode_chunk_bytes(vae_config_for(spec), tw, th)
    stages = {
        "text_encoding": {"weights": weights["text_encoder"], "activations": text_act},
        "denoising": {"weights": weights["transformer_expert"],
                      "activations": act + latents + batch * spec.text_len * 4096 * s},
        "decoding": {"weights": weights["vae"], "activations": vae_act + frames * width * height * 3},
    }
    for v in stages.values():
        v["total"] = int(v["weights"] + v["activations"])
    peak_stage = max(stages, key=lambda k: stages[k]["total"])
    return PeakEstimate(stages, peak_stage)


# ---------------------------------------------------------------------------------------------- chips


@dataclass(frozen=True)
class Chip:
    """Published peak figures of a chip's GPU. `verified` is False wherever the figure was not read in a
    primary source here; `source` says where each number comes from."""

    name: str
    gpu_cores: int
    fp32_tflops: float
    fp16_tflops: float  # MLX runs bf16 on the same ALUs; taken as the fp16 rate
    bandwidth_gbs: float
    memory_gb: tuple[int, ...]
    source: str
    verified: bool = False


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in [
        # philipturner/metal-benchmarks README (@dc2adc6, 2024-09): M1 Ultra 64 cores, 1.296 GHz,
        # GOPS32 = GOPS16 = 21233 (Apple GPUs run FP16 at the FP32 rate). Bandwidth 800 GB/s: Apple's published
        # figure, quoted by third parties (not opened here).
        Chip("m1-ultra", 64, 21.2, 21.2, 800, (64, 128),
             "TFLOPS: philipturner/metal-benchmarks table; "
             "bandwidth: Apple spec as quoted by third parties (unverified)"),
        # philipturner/metal-benchmarks: M2 Max 38 cores, 1.398 GHz, GOPS32 = GOPS16 = 13600.
        Chip("m2-max", 38, 13.6, 13.6, 400, (32, 64, 96),
             "TFLOPS: philipturner/metal-benchmarks table; bandwidth: Apple spec (unverified here)"),
        # M2 Ultra = two M2 Max dies: 2 x 13.6 (computed; huggingface.js hardware.ts lists 27.2 too).
        Chip("m2-ultra", 76, 27.2, 27.2, 800, (64, 128, 192),
             "TFLOPS: 2 x M2 Max of philipturner/metal-benchmarks (computed), matches huggingface.js hardware.ts; "
             "bandwidth: Apple spec 800 GB/s (unverified here)"),
        # huggingface.co/hardware/apple-m3-max lists 14.2 TFLOPS (third party, method not stated).
        Chip("m3-max", 40, 14.2, 14.2, 400, (36, 48, 64, 96, 128),
             "TFLOPS: huggingface.co/hardware/apple-m3-max (third party, unverified); FP16 = FP32 assumed; "
             "bandwidth: Apple spec for the 40-core GPU part (unverified here)"),
        # huggingface.co/hardware/apple-m3-ultra lists 28.4 TFLOPS; a press article's table ("Apple announces M3
        # Ultra...", as copied on inforeader.com) lists 819.2 GB/s for the M3 Ultra (and for the M1/M2 Ultra).
        Chip("m3-ultra", 80, 28.4, 28.4, 819, (96, 256, 512),
             "TFLOPS: huggingface.co/hardware/apple-m3-ultra (third party, unverified); FP16 = FP32 assumed; "
             "bandwidth: 819.2 GB/s per a press article's table (Apple spec, not opened here)"),
        # huggingface.js PR #1044 ("M4 Max 18.4 (FP32, 40 cores)", from "benchmark websites plus Apple references");
        # 546 GB/s: Apple's figure for the 40-core-GPU M4 Max, quoted in third-party M3 Ultra vs M4 Max articles.
        Chip("m4-max", 40, 18.4, 18.4, 546, (36, 48, 64, 128),
             "TFLOPS: huggingface.js PR #1044 (third party, unverified); FP16 = FP32 assumed; "
             "bandwidth: Apple spec 546 GB/s as quoted by third parties (unverified here)"),
    ]
}

# Fraction of peak the denoising loop is assumed to reach when no measurement from the target machine is given.
# An assumption, not a measurement (no Mac was available where this was written): pass `efficiency=` or a
# `measured_tflops` from `mlxvid bench peak` run on the target machine.
DEFAULT_EFFICIENCY = 0.5


def get_chip(name: str) -> Chip:
    key = name.lower().replace(" ", "-").replace("apple-", "")
    if key not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[key]


def predict(chip: str | Chip, spec, width: int | None = None, height: int | None = None, frames: int | None = None,
            steps: int | None = None, guidance: bool = True, dtype: str = "bf16", quantize: str | None = None,
            efficiency: float | None = None, measured_tflops: float | None = None) -> dict:
    """Predicted time of a generation on `chip`.

    Each step takes max(FLOPs / (peak x efficiency), bytes of the active expert's weights / bandwidth) (the
    weights are read once per forward; with these token counts the compute term dominates by far). `peak` is
    the chip's published fp16 (bf16, fp16) or fp32 rate, or `measured_tflops` (e.g. `bench peak` on that Mac,
    then efficiency defaults to 1 for matmul-like work; attention usually reaches less). The VAE decode and
    model loading are not included.
    """
    chip = get_chip(chip) if isinstance(chip, str) else chip
    w0, h0 = spec.default_size
    width, height, frames = width or w0, height or h0, frames or spec.frames
    steps = spec.steps if steps is None else steps
    if measured_tflops is not None:
        peak = measured_tflops * 1e12
        efficiency = 1.0 if efficiency is None else efficiency
    else:
        peak = (chip.fp32_tflops if dtype == "fp32" else chip.fp16_tflops) * 1e12
        efficiency = DEFAULT_EFFICIENCY if efficiency is None else efficiency
    flops = video_flops(spec, width, height, frames, steps, guidance)
    weights = weight_bytes(spec, dtype, quantize)
    compute_s = flops["per_step"] / (peak * efficiency)
    memory_s = weights["transformer_expert"] / (chip.bandwidth_gbs * GB)
    step_s = max(compute_s, memory_s)
    text_s = flops["text_encoder"] / (peak * efficiency)
    total_s = step_s * steps + text_s
    at_peak_s = max(compute_s * efficiency, memory_s) * steps + text_s * efficiency
    mem = estimate_peak_memory(spec, width, height, frames, dtype, quantize, guidance=guidance)
    return {
        "chip": chip.name, "chip_source": chip.source, "chip_verified": chip.verified,
        "model": spec.id, "width": width, "height": height, "frames": frames, "steps": steps, "guidance": guidance,
        "dtype": dtype, "quantize": quantize, "tokens": tokens(spec, width, height, frames),
        "peak_tflops": peak / 1e12, "efficiency": efficiency, "flops_per_step": flops["per_step"],
        "flops_total": flops["total"], "seconds_per_step": step_s,
        "step_bound": "compute" if compute_s >= memory_s else "memory",
        "minutes_per_video": total_s / 60, "minutes_per_video_at_peak": at_peak_s / 60,
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_stage": mem.peak_stage,
        "fits_in_gb": [m for m in chip.memory_gb if m * GB > mem.peak_bytes],
        "not_included": "VAE decode, model loading, the allocator's overheads",
    }


def with_layers(config: WanTransformerConfig, layers: int) -> WanTransformerConfig:
    return replace(config, num_layers=layers)
