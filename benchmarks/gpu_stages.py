"""The stages of benchmarks/gpu_check.py, each run in its own process there (see that file's docstring).

Each stage takes the run's settings (a dict: dtype, sizes, repeats, the torch device, the stage's deadline) and a
`Record` it fills as it goes: every `record.update(...)` is written to disk at once, so what a stage measured
before it ran out of time or crashed is kept. A stage never decides the machine's fate: it raises, and the
driver reports the error and goes on with the next stage.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    alternate,
    measure_matmul,
    output_agreement,
    step_case,
    step_pair,
    torch_sync,
    vae_pair,
)

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by GPU name, from NVIDIA's datasheets: H100 SXM5 989,
# H100 NVL 835, H100 PCIe 756 (H100 Tensor Core GPU datasheet); H200 SXM 989, H200 NVL 835 (H200 product page);
# A100 312 (A100 datasheet). The datasheets print twice these figures "with sparsity". First match wins.
GPU_BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                        ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


class Record(dict):
    """A stage's results, written to `path` (atomically) after every update; a plain dict without a path."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = Path(path) if path else None

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self, indent=1, default=str))
            os.replace(tmp, self.path)


def seconds_left(settings: dict) -> float:
    return settings["deadline"] - time.time()


# ---------------------------------------------------------------------------------------------- devices


def use_backend(settings: dict) -> None:
    """MLX's default device for the run: the CPU for the dry run, the GPU otherwise."""
    import mlx.core as mx

    mx.set_default_device(mx.cpu if settings["backend"] == "cpu" else mx.gpu)


def bf16_peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(published dense bf16 TFLOP/s, where the figure comes from) for a GPU or Apple chip name."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, f"NVIDIA datasheet, {key} dense bf16"
    from mlx_video import cost

    chip = device_name.lower().removeprefix("apple ").replace(" ", "-")
    if chip in cost.CHIPS:
        return cost.CHIPS[chip].fp16_tflops, f"mlx_video.cost.CHIPS[{chip!r}]: {cost.CHIPS[chip].source}"
    return None, f"no published figure for {device_name!r}"


def device_name(settings: dict) -> str:
    """The accelerator's name: torch's CUDA name, the Metal device name, or the CPU model."""
    if settings["torch_device"].startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    import mlx.core as mx

    if settings["backend"] == "metal":  # mx.device_info in recent MLX, mx.metal.device_info before
        info = getattr(mx, "device_info", None) or mx.metal.device_info
        return str(info().get("device_name", "Apple GPU"))
    from harness import system_info

    return system_info()["device"]


def sdpa_is_fused(settings: dict) -> dict:
    """Whether MLX's scaled_dot_product_attention materialises the score matrix here: the peak memory of one
    call at `sdpa_probe_tokens` tokens, 8 heads of 128, against the bytes its score matrix would take."""
    import mlx.core as mx

    n, dtype = settings["sdpa_probe_tokens"], {"fp32": mx.float32, "bf16": mx.bfloat16}[settings["dtype"]]
    q, k, v = (mx.random.normal((1, 8, n, 128)).astype(dtype) for _ in range(3))
    mx.eval(q, k, v)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5))
    extra = mx.get_peak_memory() - before
    scores = 8 * n * n * q.itemsize
    return {"fused": extra < scores / 2, "extra_bytes": extra, "score_matrix_bytes": scores, "tokens": n}


def torch_peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def torch_peak(device: str) -> int | None:
    """torch's allocator peak since the last reset (CUDA); None where torch keeps no such counter."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def free_memory() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif torch.backends.mps.is_available():
            torch.mps.empty_cache()


# ---------------------------------------------------------------------------------------------- environment


def stage_environment(settings: dict, record: Record) -> None:
    """Versions, the device, whether attention is fused, and the matmul rate both frameworks reach."""
    import platform
    from importlib import metadata

    import mlx.core as mx

    from mlx_video import kernels

    name = device_name(settings)
    peak, source = bf16_peak_tflops(name)
    versions = {d: metadata.version(d) for d in ("torch", "diffusers", "numpy")}
    record.update(device=name, mlx_device=str(mx.default_device()), mlx=mx.__version__, **versions,
                  python=platform.python_version(), os=platform.platform(), kernel_backend=kernels.refresh(),
                  bf16_peak_tflops=peak, bf16_peak_source=source)
    record.update(nvidia_smi=nvidia_smi(), mlx_sdpa=sdpa_is_fused(settings))
    n = settings["matmul_n"]
    record.update(matmul_n=n, mlx_matmul_tflops=measure_matmul(settings["dtype"], n))
    record.update(torch_matmul_tflops=torch_matmul_tflops(settings, n))


def nvidia_smi() -> str | None:
    """nvidia-smi's line for the GPU (name, memory, driver, clocks, power limit), where the tool exists."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.strip() or proc.stderr.strip()


def torch_matmul_tflops(settings: dict, n: int) -> float:
    import torch

    device = settings["torch_device"]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings["dtype"]]
    a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))

    def product():
        _ = a @ b
        torch_sync(device)

    product()
    times = alternate({"matmul": product}, 3)["matmul"]
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------- kernels


@contextlib.contextmanager
def kernel_mode(mode: str):
    """MLXVID_KERNELS set to `mode` ("auto" or "portable") for the block, then restored."""
    from mlx_video import kernels

    previous = os.environ.get(kernels.ENV_VAR)
    os.environ[kernels.ENV_VAR] = mode
    kernels.refresh()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = previous
        kernels.refresh()


def kernel_cases(settings: dict) -> list[dict]:
    """Every kernel variant the models use, at the real widths: (op, variant, call) with call() -> arrays."""
    import mlx.core as mx
    import numpy as np

    from mlx_video import kernels

    k = settings["kernels"]
    tokens, dim, heads = k["tokens"], k["dim"], k["heads"]
    rng = np.random.default_rng(0)

    def normal(shape, dtype=mx.float32, loc=0.0, scale=1.0):
        return mx.array((loc + scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)

    def name(dtype) -> str:
        return str(dtype).removeprefix("mlx.core.")

    x = normal((1, 1, tokens, dim), loc=3, scale=2)
    mod = [normal((1, 1, 1, dim), scale=0.3) for _ in range(3)]
    y = normal((1, 1, tokens, dim))
    codes = mx.array(rng.integers(0, 256, (dim, dim), dtype=np.uint8))
    scales = mx.array(rng.uniform(0.5, 2, dim).astype(np.float32))
    cases = []
    for fmt in ("e4m3fn", "e5m2"):
        for dt in (mx.float32, mx.float16, mx.bfloat16):
            cases.append(dict(op="dequantize_fp8", variant=f"{fmt} -> {name(dt)}", exact=True,
                              call=lambda fmt=fmt, dt=dt: [kernels.dequantize_fp8(codes, fmt, scales, dt)]))
    for split_name, axis_dims in k["rope_splits"].items():
        head_dim = sum(axis_dims)
        per_axis = kernels.rope_tables(k["rope_grid"], head_dim, axis_dims=axis_dims)
        n = math.prod(k["rope_grid"])
        for dt in (mx.float32, mx.float16, mx.bfloat16):
            q, kk = normal((1, n, heads, head_dim), dt), normal((1, n, heads, head_dim), dt)
            cases.append(dict(op="apply_rope_qk", variant=f"{split_name} {name(dt)}", exact=False,
                              call=lambda q=q, kk=kk, t=per_axis: list(kernels.apply_rope_qk(q, kk, t))))
            cases.append(dict(op="apply_rope", variant=f"{split_name} {name(dt)}", exact=False,
                              call=lambda q=q, t=per_axis: [kernels.apply_rope(q, t)]))
    for dt in (mx.float32, mx.bfloat16):
        xd = x.astype(dt)
        cases.append(dict(op="adaln_modulate", variant=f"x {name(dt)}", exact=False,
                          call=lambda xd=xd: [kernels.adaln_modulate(xd, mod[0], mod[1], 1e-6)]))
        cases.append(dict(op="gated_residual", variant=f"y {name(dt)}", exact=False,
                          call=lambda dt=dt: [kernels.gated_residual(x, mod[2], y.astype(dt))]))
    return cases


def evaluated(call) -> list:
    """call()'s arrays, evaluated and copied to the host as float64."""
    import mlx.core as mx
    import numpy as np

    arrays = call()
    mx.eval(arrays)
    return [np.asarray(a.astype(mx.float32)).astype(np.float64) for a in arrays]


def compile_errors(caught) -> dict[str, list[str]]:
    """The warnings of kernels.warm_up that disabled a kernel variant, by kernel name."""
    errors: dict[str, list[str]] = {}
    for w in caught:
        text = str(w.message)
        if text.startswith("custom kernel "):
            errors.setdefault(text.split()[2], []).append(text)
    return errors


def compare(got: list, want: list, exact: bool) -> dict:
    import numpy as np

    # equal values (infinities of the same sign included) and NaN against NaN count as no difference
    with np.errstate(invalid="ignore"):
        diffs = [np.where((g == w) | (np.isnan(g) & np.isnan(w)), 0.0, g - w) for g, w in zip(got, want)]
    norm = max(float(np.linalg.norm(np.where(np.isfinite(w), w, 0.0))) for w in want)
    row = {"max_abs_error": max(float(np.max(np.abs(d))) if d.size else 0.0 for d in diffs),
           "relative_l2_error": max(float(np.linalg.norm(d)) for d in diffs) / max(norm, 1e-30)}
    if exact:
        row["bit_exact"] = all(np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want))
    return row


def stage_kernels(settings: dict, record: Record) -> None:
    """Every kernel variant through the dispatch (warmed up: each variant probed, compiled, checked) against the
    portable MLX path on the same inputs: which ran, compile errors by kernel name, and the errors."""
    from mlx_video import kernels

    cases = kernel_cases(settings)
    with kernel_mode("auto"):
        backend = kernels.active_backend()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = kernels.warm_up(lambda: [a for case in cases for a in case["call"]()])
        errors = compile_errors(caught)
        variants = [{"variant": [str(v) for v in key], "used": ok} for key, ok in status.items()]
        record.update(backend=backend, variants=variants, compile_errors=errors,
                      kernels_not_probed=sorted(set(kernels.KERNELS) - {key[0] for key in status}))
        got = [evaluated(case["call"]) for case in cases]
    with kernel_mode("portable"):
        want = [evaluated(case["call"]) for case in cases]
    rows = [{"op": c["op"], "variant": c["variant"], **compare(g, w, c["exact"])} for c, g, w in zip(cases, got, want)]
    record.update(cases=rows, worst_relative_l2_error=max(r["relative_l2_error"] for r in rows),
                  all_used=bool(status) and all(status.values()) and not errors)


# ---------------------------------------------------------------------------------------------- the step


def gpu_cases(family: str, settings_or_size: dict | str) -> dict:
    """The family's GPU_CHECK cases ({"step" | "vae" | "radial": settings}) at the run's sizes ("real" or "dry");
    empty where its bench module declares none."""
    from mlx_video.families import bench_module

    size = settings_or_size if isinstance(settings_or_size, str) else settings_or_size["cases"]
    module = bench_module(family)
    return getattr(module, "GPU_CHECK", {}).get(size, {}) if module else {}


def families_with(kind: str, size: str = "real") -> list[str]:
    """The registered families (in their order) whose GPU_CHECK has a `kind` case."""
    from mlx_video.families import FAMILIES

    return [name for name in FAMILIES if kind in gpu_cases(name, size)]


def stage_order() -> list[str]:
    """The stages in order: the first family's step before the VAE and radial stages, the others' after."""
    steps = [f"step-{name}" for name in families_with("step")]
    return ["environment", "kernels", *steps[:1], "vae", "radial", *steps[1:]]


def build_step_pair(family: str, settings: dict):
    """The family's step case (its GPU_CHECK "step" settings) through ours and its reference (harness.step_pair)."""
    s, dtype = gpu_cases(family, settings)["step"], settings["dtype"]
    case = step_case(s["model"], tuple(s["size"]), s["frames"], s.get("depth"), dtype, s.get("width"), 0)
    return step_pair(case, dtype, 0, settings["torch_device"])


def in_mode(mode: str, fn):
    def run():
        with kernel_mode(mode):
            return fn()

    return run


def first_runs(sides: dict, torch_device: str) -> tuple[dict, dict, float]:
    """One run of each side (its warm-up): (outputs, peak memory of each, seconds the round took)."""
    import mlx.core as mx

    outputs, peaks = {}, {}
    start = time.perf_counter()
    for name, fn in sides.items():
        if torch_device != "cpu":  # the CPU dry run skips the (slow) collection
            free_memory()
        mx.reset_peak_memory()
        torch_peak_reset(torch_device)
        outputs[name] = fn()
        peaks[name] = torch_peak(torch_device) if name == "reference" else int(mx.get_peak_memory())
    return outputs, peaks, time.perf_counter() - start


def rounds_that_fit(settings: dict, round_seconds: float) -> int:
    budget = seconds_left(settings) - settings["reserve_s"]
    return max(1, min(settings["repeats"], int(budget / max(round_seconds, 1e-6))))


def side_summary(times: list[float], flops: int, peak_tflops: float | None, memory: int | None) -> dict:
    median = statistics.median(times)
    tflops = flops / median / 1e12
    return {"times_s": times, "seconds_median": median, "seconds_min": min(times), "tflops": tflops,
            "fraction_of_bf16_peak": tflops / peak_tflops if peak_tflops else None, "peak_memory_bytes": memory}


def stage_step(family: str, settings: dict, record: Record) -> None:
    """One denoising step, reduced depth, real width: ours with the kernels, ours on the portable path and the
    diffusers reference on torch, the same weights and inputs, alternating; medians, TFLOP/s, peak memory."""
    from mlx_video import kernels

    if "step" not in gpu_cases(family, settings):
        record.update(family=family, skipped=True, reason=f"{family} declares no GPU check step case (GPU_CHECK)")
        return
    peak_tflops, peak_source = bf16_peak_tflops(device_name(settings))
    record.update(family=family, bf16_peak_tflops=peak_tflops, bf16_peak_source=peak_source)
    bound_attention_if_unfused(settings, record)
    pair = build_step_pair(family, settings)
    record.update(tokens=pair.tokens, flops_per_step=pair.flops, ours_weights_bytes=pair.ours_weights_bytes,
                  reference_weights_bytes=pair.reference_weights_bytes, **pair.info)
    with kernel_mode("auto"):
        status = kernels.warm_up(pair.ours)
    record.update(kernel_backend=kernels.active_backend(),
                  kernel_status=[{"variant": [str(v) for v in k], "used": ok} for k, ok in status.items()])
    sides = {"ours_kernels": in_mode("auto", pair.ours), "ours_portable": in_mode("portable", pair.ours),
             "reference": pair.reference}
    outputs, peaks, round_seconds = first_runs(sides, settings["torch_device"])
    record.update(agreement=step_agreement(outputs), warmup_round_seconds=round_seconds)
    del outputs
    rounds = rounds_that_fit(settings, round_seconds)
    times = alternate(sides, rounds)
    summary = {name: side_summary(times[name], pair.flops, peak_tflops, peaks[name]) for name in sides}
    ref_median = summary["reference"]["seconds_median"]
    record.update(rounds=rounds, sides=summary,
                  time_ratio_ours_kernels_over_reference=summary["ours_kernels"]["seconds_median"] / ref_median,
                  time_ratio_ours_portable_over_reference=summary["ours_portable"]["seconds_median"] / ref_median)


def step_agreement(outputs: dict) -> dict:
    """Relative L2 differences: each of ours against the reference, and kernels against portable."""
    import mlx.core as mx
    import numpy as np

    k = np.asarray(outputs["ours_kernels"].astype(mx.float32))
    p = np.asarray(outputs["ours_portable"].astype(mx.float32))
    return {"ours_kernels_vs_reference": output_agreement(outputs["ours_kernels"], outputs["reference"]),
            "ours_portable_vs_reference": output_agreement(outputs["ours_portable"], outputs["reference"]),
            "ours_kernels_vs_ours_portable": float(np.linalg.norm(k - p) / max(np.linalg.norm(p), 1e-30))}


def bound_attention_if_unfused(settings: dict, record: Record) -> None:
    """Where MLX's attention would build the whole score matrix on a GPU, split it by query blocks (as on the CPU,
    see mlx_video/nn/attention.py) so that a step at 30k+ tokens fits; recorded either way."""
    probe = sdpa_is_fused(settings)
    record.update(mlx_sdpa=probe)
    if not probe["fused"] and settings["backend"] != "cpu":
        os.environ["MLXVID_ATTENTION_BUDGET_MB"] = str(settings["attention_budget_mb"])
        record.update(attention_budget_mb=settings["attention_budget_mb"])


# ---------------------------------------------------------------------------------------------- the VAE


def stage_vae(settings: dict, record: Record) -> None:
    """The VAE decode of `latent_frames` latent frames at `size`, ours against diffusers', alternating."""
    import mlx.core as mx
    import numpy as np

    from mlx_video.families import bench_module

    family = next(iter(families_with("vae", settings["cases"])), None)
    if family is None:
        record.update(skipped=True, reason="no family declares a GPU check VAE case")
        return
    vae = gpu_cases(family, settings)["vae"]
    reference = bench_module(family).vae_reference_case(vae.get("kwargs", {}), tuple(vae["size"]), vae["latent_frames"])
    ours, ref, info = vae_pair(reference, device=settings["torch_device"])
    record.update(family=family, width=vae["size"][0], height=vae["size"][1], **info)
    sides = {"ours": ours, "reference": ref}
    outputs, peaks, round_seconds = first_runs(sides, settings["torch_device"])
    a = np.asarray(outputs["ours"].astype(mx.float32))
    b = outputs["reference"].float().cpu().numpy().transpose(0, 2, 3, 4, 1)
    record.update(frames=int(a.shape[1]), warmup_round_seconds=round_seconds,
                  agreement_max_abs_over_max=float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    del outputs, a, b
    rounds = rounds_that_fit(settings, round_seconds)
    times = alternate(sides, rounds)
    summary = {name: {"times_s": times[name], "seconds_median": statistics.median(times[name]),
                      "peak_memory_bytes": peaks[name]} for name in sides}
    record.update(rounds=rounds, sides=summary,
                  time_ratio_ours_over_reference=summary["ours"]["seconds_median"]
                  / summary["reference"]["seconds_median"])


# ---------------------------------------------------------------------------------------------- radial attention


def radial_parameters(r: dict) -> dict | None:
    """Tile size, decay and first-frame rule: the settings' own, else the RADIAL_DEFAULTS that the model's
    transformer configuration module publishes (where mlx_video.speedup looks too); None when neither has them."""
    import importlib

    from mlx_video.registry import get_spec

    module = importlib.import_module(type(get_spec(r["model"]).transformer).__module__)
    defaults = getattr(module, "RADIAL_DEFAULTS", None)
    if "block" not in r and defaults is None:
        return None
    return {"block": r.get("block", getattr(defaults, "block", None)),
            "decay": r.get("decay", getattr(defaults, "decay", None)),
            "first_frame_dense": r.get("first_frame_dense", getattr(defaults, "first_frame_dense", True))}


def radial_plan(r: dict):
    """(the radial module, its plan of the case's token grid, the parameters), or (None, why) where it is missing."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("mlx_video.nn.radial") is None:
        return None, "mlx_video.nn.radial does not exist in this checkout"
    radial = importlib.import_module("mlx_video.nn.radial")
    missing = [n for n in ("radial_block_mask", "RadialPlan", "radial_attention") if not hasattr(radial, n)]
    params = radial_parameters(r)
    if missing or params is None:
        return None, (f"mlx_video.nn.radial has no {', '.join(missing)} (its API changed: update this stage)"
                      if missing else f"no radial parameters for {r['model']} (RADIAL_DEFAULTS)")
    frames, h, w = r["grid"]
    mask = radial.radial_block_mask(frames, h * w, **params)
    return (radial, radial.RadialPlan.of(mask, params["block"], frames * h * w), params), None


def stage_radial(settings: dict, record: Record) -> None:
    """Radial attention (mlx_video.nn.radial) against dense attention on the same q, k, v at the run's token grid:
    alternating medians and the fraction of the score matrix computed; where a GPU kernel path exists, radial
    attention with the kernels against MLXVID_KERNELS=portable too. That radial equals dense under its mask is
    the radial tests' job; here the outputs' finiteness and kernel-vs-portable agreement are checked."""
    import mlx.core as mx
    import numpy as np

    from mlx_video import kernels
    from mlx_video.nn.attention import attention

    family = next(iter(families_with("radial", settings["cases"])), None)
    if family is None:
        record.update(skipped=True, reason="no family declares a GPU check radial case (mlx_video.nn.radial unused)")
        return
    r = gpu_cases(family, settings)["radial"]
    found, reason = radial_plan(r)
    if found is None:
        record.update(skipped=True, reason=reason)
        return
    radial, plan, params = found
    dtype = {"fp32": mx.float32, "bf16": mx.bfloat16}[settings["dtype"]]
    q, k, v = (mx.random.normal((1, plan.tokens, r["heads"], r["head_dim"]), key=mx.random.key(i)).astype(dtype)
               for i in range(3))
    mx.eval(q, k, v)
    record.update(skipped=False, tokens=plan.tokens, grid=r["grid"], heads=r["heads"], head_dim=r["head_dim"],
                  **params, score_fraction=plan.score_fraction())
    run_radial = lambda: radial.radial_attention(q, k, v, plan)  # noqa: E731
    with kernel_mode("auto"):
        status = kernels.warm_up(run_radial)
    sides = {"radial": in_mode("auto", run_radial), "dense": lambda: attention(q, k, v)}
    if kernels.refresh() != "portable":
        sides["radial_portable"] = in_mode("portable", run_radial)
    outputs = {name: evaluated(lambda fn=fn: [fn()])[0] for name, fn in sides.items()}
    record.update(kernel_status=[{"variant": [str(x) for x in key], "used": ok} for key, ok in status.items()],
                  finite=all(bool(np.isfinite(o).all()) for o in outputs.values()), **radial_agreement(outputs))
    del outputs
    timed_sides = {name: (lambda fn=fn: mx.eval(fn())) for name, fn in sides.items()}
    rounds = rounds_that_fit(settings, sum(statistics.median(t) for t in alternate(timed_sides, 1).values()))
    times = alternate(timed_sides, rounds)
    record.update(rounds=rounds,
                  sides={name: {"times_s": t, "seconds_median": statistics.median(t)} for name, t in times.items()},
                  time_ratio_radial_over_dense=statistics.median(times["radial"]) / statistics.median(times["dense"]))


def radial_agreement(outputs: dict) -> dict:
    import numpy as np

    if "radial_portable" not in outputs:
        return {}
    a, b = outputs["radial"], outputs["radial_portable"]
    return {"radial_kernels_vs_portable": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))}


STAGES = {"environment": stage_environment, "kernels": stage_kernels, "vae": stage_vae, "radial": stage_radial}


def run_stage(name: str, settings: dict, record: Record) -> None:
    """Run stage `name` (one of STAGES, or step-FAMILY) with MLX on the run's device."""
    use_backend(settings)
    if name.startswith("step-"):
        stage_step(name.removeprefix("step-"), settings, record)
    else:
        STAGES[name](settings, record)
