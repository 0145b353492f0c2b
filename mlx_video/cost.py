"""The engine's cost arithmetic that no family owns: bytes per stored weight, FLOP and memory records, the
published figures of Apple chips, and the time prediction built on a family's cost model.

Each family has one cost model (`mlx_video.families.cost_model(name)`, e.g. `mlx_video/families/wan/cost_model.py`)
used by both the memory preflight and the benchmarks. It provides:

    tokens(spec, width, height, frames) -> int                           transformer tokens of a video
    step_flops(spec, width, height, frames, guidance, layers) -> FlopBreakdown
    video_flops(spec, width, height, frames, steps, guidance) -> dict    with "per_step", "text_encoder", "total"
    weight_bytes(spec, dtype, quantize, group_size) -> dict              "transformer_expert", "text_encoder", "vae"
    estimate_peak_memory(spec, width, height, frames, ...) -> PeakEstimate

Everything here is arithmetic (no weights, no device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANT_BITS = {"q8": 8, "q4": 4, "fp8": 8}
DEFAULT_GROUP_SIZE = 64
GB = 1e9


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}") from None


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one component, split into the block linear weights (what --quantize stores in low
    precision, see convert/quantize.py) and everything else."""

    block_linear: int
    other: int

    @property
    def total(self) -> int:
        return self.block_linear + self.other


def bytes_per_weight(dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Stored bytes per weight of a block linear layer. Affine q8/q4: the codes plus one scale and one bias
    (in `dtype`) per group; fp8: one byte (its single float32 scale per tensor is negligible)."""
    if quantize is None:
        return dtype_bytes(dtype)
    if quantize not in QUANT_BITS:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_BITS)}, not {quantize!r}")
    codes = QUANT_BITS[quantize] / 8
    if quantize == "fp8":
        return codes
    return codes + 2 * dtype_bytes(dtype) / group_size


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


def generation_flops(per_step: float, steps: int, text_encoder: float) -> dict:
    """The record a family's `video_flops` returns: denoising (per step x steps) plus the text encoder."""
    return {"per_step": per_step, "steps": steps, "denoising": per_step * steps, "text_encoder": text_encoder,
            "total": per_step * steps + text_encoder}


@dataclass(frozen=True)
class PeakEstimate:
    stages: dict  # stage -> {"weights": bytes, "activations": bytes, "total": bytes}
    peak_stage: str

    @property
    def peak_bytes(self) -> int:
        return self.stages[self.peak_stage]["total"]

    def to_dict(self) -> dict:
        return {"stages": self.stages, "peak_stage": self.peak_stage, "peak_bytes": self.peak_bytes}


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
            steps: int | None = None, guidance: bool | None = None, dtype: str = "bf16", quantize: str | None = None,
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
    guidance = spec.cfg_by_default if guidance is None else guidance  # None: as the published settings run
    if measured_tflops is not None:
        peak = measured_tflops * 1e12
        efficiency = 1.0 if efficiency is None else efficiency
    else:
        peak = (chip.fp32_tflops if dtype == "fp32" else chip.fp16_tflops) * 1e12
        efficiency = DEFAULT_EFFICIENCY if efficiency is None else efficiency
    from .families import cost_model

    model = cost_model(spec.family)
    flops = model.video_flops(spec, width, height, frames, steps, guidance)
    weights = model.weight_bytes(spec, dtype, quantize)
    compute_s = flops["per_step"] / (peak * efficiency)
    memory_s = weights["transformer_expert"] / (chip.bandwidth_gbs * GB)
    step_s = max(compute_s, memory_s)
    text_s = flops["text_encoder"] / (peak * efficiency)
    total_s = step_s * steps + text_s
    at_peak_s = max(compute_s * efficiency, memory_s) * steps + text_s * efficiency
    mem = model.estimate_peak_memory(spec, width, height, frames, dtype, quantize, guidance=guidance)
    return {
        "chip": chip.name, "chip_source": chip.source, "chip_verified": chip.verified,
        "model": spec.id, "width": width, "height": height, "frames": frames, "steps": steps, "guidance": guidance,
        "dtype": dtype, "quantize": quantize, "tokens": model.tokens(spec, width, height, frames),
        "peak_tflops": peak / 1e12, "efficiency": efficiency, "flops_per_step": flops["per_step"],
        "flops_total": flops["total"], "seconds_per_step": step_s,
        "step_bound": "compute" if compute_s >= memory_s else "memory",
        "minutes_per_video": total_s / 60, "minutes_per_video_at_peak": at_peak_s / 60,
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_stage": mem.peak_stage,
        "fits_in_gb": [m for m in chip.memory_gb if m * GB > mem.peak_bytes],
        "not_included": "VAE decode, model loading, the allocator's overheads",
    }
