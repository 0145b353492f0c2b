"""Benchmark harnesses: one denoising step, the device's peak, the VAE decode, a run against diffusers, and
the predicted time of a video on an Apple chip.

Each harness prints a table and returns a dict; with `json_path` it also writes that dict, together with the
machine it ran on (device, OS, versions, BLAS, load average), the command and the date.

    mlxvid bench step --model wan2.2-t2v-a14b --size 256x256 --frames 9 --layers 2 --dtype fp32
    mlxvid bench peak --dtype fp32
    mlxvid bench vs-reference --model hunyuanvideo-t2v --size 256x256 --frames 9 --layers double=1,single=1
    mlxvid bench vae --sizes 64x64,128x128 --frames 1,5,9,13

Each family's cases live in its package (`Family.bench`, mlx_video/bench_case.py): the step, the VAE decode and
the reference's class, arguments and key table as data; this file runs any of them.
    mlxvid bench estimate --chip m3-ultra --size 832x480

Random weights throughout: time and memory do not depend on the values. torch and diffusers are imported
only by `vs-reference` (and `torch_flop_count`), when it runs.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import click

from mlx_video import cost as C
from mlx_video.families import bench_module as bench_cases
from mlx_video.families import cost_model, get_family
from mlx_video.registry import MODELS, get_spec

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _mx_dtype(name: str):
    import mlx.core as mx

    return {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[name]


def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def default_dtype() -> str:
    """bf16 where MLX runs on a GPU (what the pipeline uses); fp32 on the CPU, where MLX's bf16 matmul has no
    BLAS path and runs about 50x slower than fp32 (measured here: see benchmarks/RESULTS.md)."""
    return "bf16" if _on_gpu() else "fp32"


# ---------------------------------------------------------------------------------------------- the record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas() -> str:
    """Which BLAS MLX's CPU backend ends up calling (Linux: the bundled reference BLAS unless one is preloaded)."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for lib in ("openblas", "mkl_rt", "blis"):
        if lib in maps:
            return f"{lib} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')})"
    return "reference BLAS bundled with mlx (no BLAS preloaded)"


def system_info(command: str | None = None) -> dict:
    import mlx.core as mx

    device = str(mx.default_device())
    name = _cpu_model()
    if _on_gpu():
        try:
            info = mx.metal.device_info() if mx.metal.is_available() else {}
            name = str(info.get("device_name", name))
        except Exception:  # device_info differs between builds and backends
            pass
    env = {k: os.environ[k] for k in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
           if k in os.environ}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or _command_line(),
        "device": f"{name} ({device})",
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": _memory_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "blas": _blas(),
        "env": env,
        # at the end of the run: the 1- and 5-minute figures cover it. Above the core count = shared cores.
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure": _cpu_pressure(),
    }


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = os.path.relpath(argv[0])
        except ValueError:
            pass
    else:
        return shlex.join(argv)
    return shlex.join(["python", *argv])


def _cpu_pressure() -> str | None:
    """Linux pressure stall information: the share of time runnable tasks waited for a CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def _finish(record: dict, json_path: str | Path | None, echo, command: str | None = None) -> dict:
    record["system"] = system_info(command)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        echo(f"wrote {path}")
    return record


# ---------------------------------------------------------------------------------------------- helpers


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _table(rows: list[tuple], echo, header: tuple | None = None) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    if header:
        rows = [tuple(header)] + rows
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    for k, r in enumerate(rows):
        echo("  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)))
        if header and k == 0:
            echo("  ".join("-" * w for w in widths))


def _timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _release() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _materialise(module, dtype: str) -> int:
    """Every parameter cast to `dtype` and evaluated one at a time; their bytes (mlx_video.bench_case)."""
    from mlx_video.bench_case import materialise

    return materialise(module, dtype)


def bench_models() -> list[str]:
    """Registry models whose family declares benchmark cases (`Family.bench`, mlx_video/bench_case.py)."""
    return [m for m, spec in MODELS.items() if get_family(spec.family).bench]


DEFAULT_MODEL = bench_models()[0]


def bench_module(spec):
    """The benchmark cases of `spec`'s family; a clear refusal where the family declares none."""
    module = bench_cases(spec.family)
    if module is None:
        having = sorted({MODELS[m].family for m in bench_models()})
        raise click.BadParameter(f"{spec.id}: its family ({spec.family}) declares no benchmark cases (Family.bench); "
                                 f"the families that do: {', '.join(having)}")
    return module


def parse_depth(default: dict, layers) -> dict:
    """The blocks to build: the family's DEPTH with `layers` applied: an int (or "N") sets the first kind,
    "kind=N,kind=N" (or a dict) the kinds named."""
    depth = dict(default)
    if layers is None:
        return depth
    if isinstance(layers, str) and layers.strip().isdigit():
        layers = int(layers)
    if isinstance(layers, int):
        depth[next(iter(depth))] = layers
        return depth
    if isinstance(layers, str):
        try:
            layers = {k.strip(): int(v) for k, v in (item.split("=") for item in layers.split(",") if item.strip())}
        except ValueError:
            raise click.BadParameter(f"--layers is N or KIND=N,... (kinds: {', '.join(default)}), not {layers!r}") \
                from None
    unknown = sorted(set(layers) - set(default))
    if unknown:
        raise click.BadParameter(f"unknown depth kind(s) {', '.join(unknown)}; this family has {', '.join(default)}")
    depth.update(layers)
    return depth


def step_case(model_id: str | None = None, size=(256, 256), frames: int = 9, layers=None, dtype: str = "fp32",
              width: dict | None = None, seed: int = 0, variant: str | None = None, guidance: bool = True):
    """The family's `StepCase` (mlx_video/bench_case.py) of one denoising step of `model_id`."""
    spec = get_spec(model_id or DEFAULT_MODEL)
    module = bench_module(spec)
    if not hasattr(module, "step_case"):
        raise click.BadParameter(f"{spec.id}: its family ({spec.family}) declares no step benchmark case (a VAE "
                                 "case only)")
    depth = parse_depth(module.DEPTH, layers)
    try:
        return module.step_case(spec, tuple(size), frames, depth, dtype, width, seed, variant, guidance)
    except ValueError as e:  # the family's refusal of a size, frame count, variant or width
        raise click.BadParameter(str(e)) from None


def vae_case(model_id: str | None = None, dtype: str = "fp32", width: dict | None = None, chunk: int | None = None,
             seed: int = 0):
    """The family's `VAECase` of `model_id`'s VAE."""
    spec = get_spec(model_id or DEFAULT_MODEL)
    module = bench_module(spec)
    if not hasattr(module, "vae_case"):
        raise click.BadParameter(f"{spec.id}: its family ({spec.family}) declares no VAE benchmark case")
    try:
        return module.vae_case(spec, dtype, width, chunk, seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def measure_matmul(dtype: str, n: int, repeats: int = 3) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in `dtype` (median of `repeats` after a warm-up)."""
    import mlx.core as mx

    dt = _mx_dtype(dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    times = _timed(lambda: mx.eval(a @ b), repeats)
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------- step


def run_step(model_id: str | None = None, size: tuple[int, int] = (256, 256), frames: int = 9, layers=None,
             dtype: str | None = None, repeats: int = 3, warmup: int = 1, guidance: bool = True, json_path=None,
             width: dict | None = None, peak_probe: int = 2048, seed: int = 0, variant: str | None = None,
             echo=click.echo, command: str | None = None) -> dict:
    """Time one denoising step of `model_id` at `size` / `frames`, with `layers` blocks of the real width (the
    family's DEPTH by default; see `parse_depth`), through the family's step case.

    Reports the median seconds per step, the peak memory (mx.get_peak_memory over the timed repeats), FLOPs
    and achieved TFLOP/s, the model FLOP utilisation against a matmul of `peak_probe`^3 measured in the same
    run, and the extrapolation to the full depth. Where the case can run without its blocks (their inputs still
    computed), the step is timed that way too, so time per block = (t(layers) - t(0)) / layers and the full-depth
    step = t(0) + time per block x depth; elsewhere the whole step counts as block time (an upper bound).
    `width` replaces the family's widths (tests use tiny ones).
    """
    import mlx.core as mx

    from mlx_video.bench_case import as_mx

    dtype = dtype or default_dtype()
    case = step_case(model_id, size, frames, layers, dtype, width, seed, variant, guidance)
    _release()
    mx.reset_peak_memory()
    model = case.model(dtype)
    weights = _materialise(model, dtype)
    inputs = as_mx(case.inputs, dtype, case.uncast)
    mx.eval(list(inputs.values()))

    def step():
        mx.eval(case.forward(model, inputs))

    for _ in range(warmup):
        step()
    mx.reset_peak_memory()
    times = _timed(step, repeats, warmup=0)
    measured = {"times": times, "peak": mx.get_peak_memory(), "weights": weights,
                "inputs": sum(v.nbytes for v in inputs.values()), "overhead": None}
    if case.without_blocks is not None:
        with case.without_blocks(model):
            measured["overhead"] = statistics.median(_timed(step, repeats, warmup=1))
    model = None  # free it before the matmul probe
    _release()
    measured["matmul_peak"] = measure_matmul(dtype, peak_probe) if peak_probe else None
    record = _step_record(case, size, frames, dtype, guidance, repeats, warmup, peak_probe, measured)
    _print_step(record, echo)
    return _finish(record, json_path, echo, command)


def run_step_variants(model_id: str, variants: list[str], size: tuple[int, int] = (256, 256), frames: int = 9,
                      layers=None, dtype: str | None = None, repeats: int = 3, guidance: bool = True,
                      json_path=None, width: dict | None = None, seed: int = 0, echo=click.echo,
                      command: str | None = None) -> dict:
    """Several step variants of one model (e.g. Wan2.2-S2V's `s2v`, `s2v-no-audio-injection`, `backbone`), all
    built at once and timed in turn within each repeat (interleaved, so load on a shared machine hits them
    alike): the median of each, its ratio to the first, its activation peak (MLX's peak over one step above the
    memory active before it, every variant's weights resident) and its linear extrapolation to full depth."""
    import mlx.core as mx

    from mlx_video.bench_case import as_mx

    dtype = dtype or default_dtype()
    cases = {v: step_case(model_id, size, frames, layers, dtype, width, seed, v, guidance) for v in variants}
    steps = {}
    for name, case in cases.items():
        model, inputs = case.model(dtype), as_mx(case.inputs, dtype, case.uncast)
        _materialise(model, dtype)
        steps[name] = lambda case=case, model=model, inputs=inputs: mx.eval(case.forward(model, inputs))
    peaks = {}
    for name, step in steps.items():  # the warm-up, and each variant's activation peak
        _release()
        mx.reset_peak_memory()
        resident = mx.get_active_memory()
        step()
        peaks[name] = mx.get_peak_memory() - resident
    times = alternate(steps, repeats)
    first = statistics.median(times[variants[0]])
    rows = {name: {"times_s": times[name], "seconds_median": statistics.median(times[name]),
                   "ratio_to_first": statistics.median(times[name]) / first, "activation_peak_bytes": peaks[name],
                   "tokens": case.tokens, "info": case.info,
                   "full_depth_seconds_linear": statistics.median(times[name]) * case.full_layers / case.layers}
            for name, case in cases.items()}
    any_case = cases[variants[0]]
    record = {"harness": "step-variants", "model": any_case.model_id, "variants": rows, "width": size[0],
              "height": size[1], "frames": frames, "depth": any_case.depth, "full_depth": any_case.full_depth,
              "dtype": dtype, "batch": any_case.batch, "repeats": repeats, "model_width": any_case.width}
    echo(f"step variants: {record['model']}, {size[0]}x{size[1]}x{frames}, batch {record['batch']}, "
         f"{', '.join(f'{n} {k}' for k, n in record['depth'].items())} at width {record['model_width']}, {dtype}, "
         f"{mx.default_device()}; variants alternate within each of {repeats} repeats")
    _table([(name, r["tokens"], f"{r['seconds_median']:.3f}", ", ".join(f"{t:.3f}" for t in r["times_s"]),
             f"{r['ratio_to_first']:.3f}", _fmt_bytes(r["activation_peak_bytes"]),
             f"{r['full_depth_seconds_linear']:.1f}") for name, r in rows.items()], echo,
           header=("variant", "tokens", "median s", "runs", f"/ {variants[0]}", "activation peak",
                   "full depth s (linear)"))
    return _finish(record, json_path, echo, command)


def _step_record(case, size, frames, dtype, guidance, repeats, warmup, peak_probe, m: dict) -> dict:
    spec = get_spec(case.model_id)
    median, layers, full_layers = statistics.median(m["times"]), case.layers, case.full_layers
    overhead = m["overhead"] or 0.0
    per_block = max(median - overhead, 0.0) / layers if layers else 0.0
    full_step = overhead + per_block * full_layers
    achieved = case.flops / median / 1e12
    act = case.activation_estimate(dtype, _on_gpu()) if case.activation_estimate else None
    block_weights = ((m["weights"] - case.weights_bytes(dtype, 0)) / layers
                     if case.weights_bytes and layers else None)
    return {
        "harness": "step", "model": spec.id, "variant": case.variant, "config": case.config.to_dict(),
        "model_width": case.width,
        "depth": case.depth, "full_depth": case.full_depth, "full_layers": full_layers,
        "width": size[0], "height": size[1], "frames": frames, "layers": layers, "dtype": dtype,
        "guidance": guidance, "batch": case.batch, "latent": case.info.get("latent"), "tokens": case.tokens,
        "text_tokens": case.text_tokens, "info": case.info,
        "repeats": repeats, "warmup": warmup, "times_s": m["times"], "seconds_per_step": median,
        "seconds_per_step_min": min(m["times"]),
        "seconds_without_blocks": m["overhead"], "seconds_per_block": per_block,
        "full_depth_seconds_per_step": full_step,
        "full_depth_minutes_per_video_at_this_size": full_step * spec.steps / 60, "steps_per_video": spec.steps,
        "flops_per_step": case.flops, "full_depth_flops_per_step": case.full_flops, "achieved_tflops": achieved,
        "matmul_peak_tflops": m["matmul_peak"], "matmul_peak_probe_n": peak_probe,
        "mfu": achieved / m["matmul_peak"] if m["matmul_peak"] else None,
        "peak_memory_bytes": m["peak"], "weights_bytes": m["weights"], "inputs_bytes": m["inputs"],
        "activation_bytes_measured": m["peak"] - m["weights"] - m["inputs"],
        "activation_bytes_estimated": act["peak"] if act else None, "activation_estimate": act,
        "full_depth_peak_memory_bytes_extrapolated": (m["peak"] + (full_layers - layers) * block_weights
                                                      if block_weights is not None else None),
        "full_depth_weights_bytes": case.weights_bytes(dtype, full_layers) if case.weights_bytes else None,
    }


def _print_step(r: dict, echo) -> None:
    import mlx.core as mx

    def opt(value, fmt):
        return "-" if value is None else fmt(value)

    depth = ", ".join(f"{n} {k}" for k, n in r["depth"].items())
    echo(f"step: {r['model']}{' (' + r['variant'] + ')' if r['variant'] else ''}, {r['width']}x{r['height']}x"
         f"{r['frames']} ({r['tokens']} tokens, batch {r['batch']}), {depth} of {r['full_layers']} blocks at width "
         f"{r['model_width']}, {r['dtype']}, {str(mx.default_device())}")
    median, times = r["seconds_per_step"], r["times_s"]
    _table([
        ("seconds per step (median)", f"{median:.3f}  (runs: {', '.join(f'{t:.3f}' for t in times)})"),
        ("seconds without blocks", opt(r["seconds_without_blocks"], "{:.3f}".format)),
        ("seconds per block", f"{r['seconds_per_block']:.3f}"),
        (f"full depth ({r['full_layers']} blocks): s/step", f"{r['full_depth_seconds_per_step']:.2f}"),
        (f"full depth: min/video ({r['steps_per_video']} steps)",
         f"{r['full_depth_minutes_per_video_at_this_size']:.1f}  (at this size)"),
        ("FLOPs per step", f"{r['flops_per_step'] / 1e12:.3f} TFLOP"),
        ("achieved", f"{r['achieved_tflops']:.3f} TFLOP/s"),
        (f"matmul peak ({r['matmul_peak_probe_n']}^3, {r['dtype']})", opt(r["matmul_peak_tflops"], "{:.3f} TFLOP/s".format)),
        ("model FLOP utilisation", opt(r["mfu"], "{:.1%}".format)),
        ("peak memory", _fmt_bytes(r["peak_memory_bytes"])),
        ("  weights / inputs", f"{_fmt_bytes(r['weights_bytes'])} / {_fmt_bytes(r['inputs_bytes'])}"),
        ("  activations measured / estimated", f"{_fmt_bytes(r['activation_bytes_measured'])} / "
                                               f"{_fmt_bytes(r['activation_bytes_estimated'])}"),
        ("full depth peak memory (extrapolated)", _fmt_bytes(r["full_depth_peak_memory_bytes_extrapolated"])),
    ], echo)


# ---------------------------------------------------------------------------------------------- peak


def run_peak(dtype: str | None = None, sizes=(1024, 2048, 4096), attn_tokens=(512, 1024), heads: int = 40,
             head_dim: int = 128, repeats: int = 3, max_seconds: float = 30.0, json_path=None, echo=click.echo,
             command: str | None = None) -> dict:
    """Measured matmul throughput (square n^3) and attention throughput (mx.fast.scaled_dot_product_attention,
    batch 1, `heads` x `head_dim`, FLOPs 4 heads N^2 head_dim) in `dtype`. A shape whose first run takes more than
    `max_seconds` ends its series (larger shapes are skipped and listed)."""
    import mlx.core as mx

    dtype = dtype or default_dtype()
    dt = _mx_dtype(dtype)
    rows, skipped = [], []

    def series(kind, shapes, make, flop_count):
        for i, shape in enumerate(shapes):
            args = make(shape)
            mx.eval(*args[1:])
            start = time.perf_counter()
            mx.eval(args[0]())
            first = time.perf_counter() - start
            times = _timed(lambda: mx.eval(args[0]()), repeats, warmup=0) if first < max_seconds else [first]
            med = statistics.median(times)
            rows.append({"kind": kind, "shape": shape, "flops": flop_count(shape), "seconds": med, "times_s": times,
                         "tflops": flop_count(shape) / med / 1e12})
            args = None
            _release()
            if first >= max_seconds:
                skipped.extend(f"{kind} {s}" for s in shapes[i + 1:])
                break

    def make_mm(n):
        a = mx.random.normal((n, n)).astype(dt)
        b = mx.random.normal((n, n)).astype(dt)
        return (lambda: a @ b), a, b

    def make_attn(n):
        q, k, v = (mx.random.normal((1, heads, n, head_dim)).astype(dt) for _ in range(3))
        scale = 1 / math.sqrt(head_dim)
        return (lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)), q, k, v

    series("matmul", list(sizes), make_mm, lambda n: 2 * n**3)
    series("attention", list(attn_tokens), make_attn, lambda n: 4 * heads * n * n * head_dim)
    best = {k: max((r["tflops"] for r in rows if r["kind"] == k), default=None) for k in ("matmul", "attention")}
    record = {"harness": "peak", "dtype": dtype, "heads": heads, "head_dim": head_dim, "repeats": repeats,
              "results": rows, "skipped": skipped, "matmul_peak_tflops": best["matmul"],
              "attention_peak_tflops": best["attention"]}
    echo(f"peak: {dtype} on {mx.default_device()}")
    _table([(r["kind"], r["shape"] if r["kind"] == "matmul" else f"N={r['shape']}", f"{r['seconds']:.4f}",
             f"{r['tflops']:.4f}") for r in rows], echo, header=("kind", "n", "seconds", "TFLOP/s"))
    if skipped:
        echo(f"skipped (a smaller shape took over {max_seconds:.0f} s): {', '.join(skipped)}")
    return _finish(record, json_path, echo, command)


# ---------------------------------------------------------------------------------------------- vs reference


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def reference_class(reference):
    """The class a `ReferenceCase` / `VAEReferenceCase` names (diffusers' by default)."""
    return getattr(__import__(reference.package, fromlist=[reference.class_name]), reference.class_name)


def call_reference(model, reference, inputs: dict):
    """One forward of the reference as its case describes it, the guidance combination included."""
    out = model(*(inputs[a] for a in reference.args), **{k: inputs[k] for k in reference.keywords},
                return_dict=False)[0]
    if reference.guidance is None:
        return out
    cond, uncond = out.chunk(2)
    return uncond + reference.guidance * (cond - uncond)


def torch_flop_count(reference) -> dict:
    """FLOPs of one forward of a `ReferenceCase`'s model counted by torch.utils.flop_counter.FlopCounterMode, on
    the meta device (no memory, no compute): an independent check of the family cost model's FLOPs. A model
    that branches on its inputs' values (meta tensors have none) is counted on the CPU instead, with the case's
    inputs and a random init, in float32, attention by torch's math backend (one real forward); `device` says
    which."""
    import torch

    try:
        return _flop_count(reference, "meta")
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend: its products are counted (the counter does not know the CPU flash kernel)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        return _flop_count(reference, "cpu")


def _flop_count(reference, device: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device):
        model = reference_class(reference)(**reference.kwargs)
    if device == "meta":
        inputs = {k: torch.empty(v.shape, dtype=torch.from_numpy(v.reshape(-1)[:1]).dtype, device=device)
                  for k, v in reference.inputs.items()}
    else:
        inputs = reference_inputs(reference, "fp32", device)
    with FlopCounterMode(display=False) as counter:
        call_reference(model, reference, inputs)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op, "device": device}


class _LiveTensorPeak:
    """Peak of the bytes held by tensors created inside a torch region (a tracemalloc for torch storages).

    A TorchDispatchMode sees every ATen op's outputs; each new storage is recorded with a weak reference and
    its size, and dropped when the storage is freed (checked at every op, before it runs). Temporaries that
    live only inside one op (e.g. a fused attention kernel's workspace) are not seen; tensors that existed
    before the region (weights, inputs) are not counted.
    """

    def __init__(self):
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tracker._sweep()
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        s = t.untyped_storage()
                        key = s.data_ptr()
                        if key and key not in tracker.live:
                            tracker.live[key] = (StorageWeakRef(s), s.nbytes())
                            tracker.current += s.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.live: dict = {}
        self.current = 0
        self.peak = 0
        self.mode = Mode()

    def _sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _proc_status() -> dict:
    try:
        return {line.split(":")[0]: int(line.split()[1]) * 1024
                for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(("VmHWM", "VmRSS"))}
    except OSError:
        return {}


def _rss_peak_delta(fn) -> int | None:
    """Growth of the process's resident set high-water mark while `fn` runs (Linux: the mark is reset through
    /proc/self/clear_refs). `fn` runs in any case; None where the mark is not available."""
    before = _proc_status()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        fn()
        return None
    fn()
    after = _proc_status()
    if "VmHWM" not in after or "VmRSS" not in before:
        return None
    return after["VmHWM"] - before["VmRSS"]


def torch_to_mx(tensor, dtype: str):
    """A torch tensor (any device) as an MLX array in `dtype` (floating tensors only are cast)."""
    import mlx.core as mx
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        value = mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    else:
        value = mx.array(tensor.numpy())
    return value.astype(_mx_dtype(dtype)) if mx.issubdtype(value.dtype, mx.floating) else value


def output_agreement(ours, reference) -> float:
    """Relative L2 difference of two velocities: ours channels-last (B, T, H, W, C) as an MLX array, the
    reference's (B, C, T, H, W) as a torch tensor on any device."""
    import mlx.core as mx
    import numpy as np

    a = np.asarray(ours.astype(mx.float32)).transpose(0, 4, 1, 2, 3)
    b = reference.detach().float().cpu().numpy()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def alternate(steps: dict, repeats: int) -> dict[str, list[float]]:
    """`repeats` rounds, each running every step of `steps` (name -> callable) once in turn, so that load from
    other jobs, clocks and heat hit every side alike; the seconds of each call, by name. Each callable must
    return only once its work is done (mx.eval; torch.cuda.synchronize on a GPU)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def side_by_side(ours_step, ref_step, repeats: int, ref_resident_bytes: int, warmup: int = 1):
    """Run our step and the reference's in one process: their agreement (relative L2 of the outputs, ours
    channels-last (B, T, H, W, C), the reference's (B, C, T, H, W)), `repeats` timings alternating, then one
    more step each for memory: ours by MLX's allocator peak, the reference's as `ref_resident_bytes` (its weights
    and inputs) plus the peak of the tensors alive during its step; with both, the RSS high-water growth.
    Returns (rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_peak, ref_rss)."""
    import mlx.core as mx

    for _ in range(max(warmup, 1)):  # agreement (the same computation?), and the warm-up
        v_ours = ours_step()
        v_ref = ref_step()
    rel_err = output_agreement(v_ours, v_ref)
    del v_ours, v_ref

    times = alternate({"ours": ours_step, "reference": ref_step}, repeats)
    ours_times, ref_times = times["ours"], times["reference"]

    _release()
    mx.reset_peak_memory()
    ours_rss = _rss_peak_delta(ours_step)
    ours_peak = mx.get_peak_memory()
    gc.collect()
    tracker = _LiveTensorPeak()

    def tracked_ref_step():
        with tracker:
            ref_step()

    ref_rss = _rss_peak_delta(tracked_ref_step)
    return rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_resident_bytes + tracker.peak, ref_rss


class StepPair(NamedTuple):
    """One denoising step through ours and through the diffusers reference, built from the same weights and
    inputs: `ours()` returns our evaluated output, channels-last (B, T, H, W, C); `reference()` returns the
    reference's, (B, C, T, H, W), its device synchronised. `flops`: the family cost model's FLOPs of the step.
    (A NamedTuple, not a dataclass: `mlxvid bench` loads this file without registering it as a module.)"""

    ours: Callable
    reference: Callable
    flops: int
    tokens: int
    ours_weights_bytes: int
    reference_weights_bytes: int
    inputs_bytes: int
    info: dict


def torch_sync(device: str) -> None:
    """Wait for the torch device's queued work (CUDA / MPS); nothing on the CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def module_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def reference_module(reference, dtype: str, seed: int = 0, device: str = "cpu"):
    """The reference model of a `ReferenceCase` with its random init on the torch `device`, cast as
    from_pretrained(torch_dtype=...) loads it (its `_keep_in_fp32_modules` stay float32 where the case says so)."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        model = reference_class(reference)(**reference.kwargs).eval()
    tdt = _torch_dtype(dtype)
    if not reference.keep_fp32_modules:
        return model.to(tdt)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(tdt)
    return model


def reference_inputs(reference, dtype: str, device: str = "cpu") -> dict:
    """A `ReferenceCase`'s numpy inputs as torch tensors on `device`, floating ones cast (but `uncast`)."""
    import numpy as np
    import torch

    out = {}
    for name, value in reference.inputs.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point() and name not in reference.uncast:
            tensor = tensor.to(_torch_dtype(dtype))
        out[name] = tensor.to(device)
    return out


def step_pair(case, dtype: str, seed: int = 0, device: str = "cpu") -> StepPair:
    """The step of a `StepCase` through ours and through its reference on the torch `device`: the reference's
    random init converted to ours by the case's `convert` (its key table), the same inputs."""
    import mlx.core as mx
    import torch

    from mlx_video.bench_case import as_mx

    reference = case.reference
    ref = reference_module(reference, dtype, seed, device)
    _release()
    ours = case.model(dtype)
    ours.load_weights(reference.convert({k: torch_to_mx(v, dtype) for k, v in ref.state_dict().items()}), strict=True)
    mx.eval(ours.parameters())
    x_ours, x_ref = as_mx(case.inputs, dtype, case.uncast), reference_inputs(reference, dtype, device)

    def ours_step():
        v = case.forward(ours, x_ours)
        mx.eval(v)
        return v

    def ref_step():
        with torch.inference_mode():
            out = call_reference(ref, reference, x_ref)
        torch_sync(device)
        return out

    return StepPair(
        ours=ours_step, reference=ref_step, flops=case.flops, tokens=case.tokens,
        ours_weights_bytes=sum(v.nbytes for _, v in _flat(ours.parameters())), reference_weights_bytes=module_bytes(ref),
        inputs_bytes=sum(t.numel() * t.element_size() for t in x_ref.values()),
        info={"model": case.model_id, "variant": case.variant, "config": case.config.to_dict(), "depth": case.depth,
              "layers": case.layers, "dtype": dtype, "batch": case.batch, "text_tokens": case.text_tokens,
              "reference": f"{reference.package} {_version(reference.package)} {reference.class_name}, "
                           f"torch {torch.__version__}", **case.info},
    )


def run_vs_reference(model_id: str | None = None, size: tuple[int, int] = (256, 256), frames: int = 9, layers=None,
                     dtype: str | None = None, repeats: int = 3, warmup: int = 1, guidance: bool = True,
                     threads: int | None = None, json_path=None, width: dict | None = None, seed: int = 0,
                     variant: str | None = None, echo=click.echo, command: str | None = None) -> dict:
    """The step of `run_step` through ours and through the reference the family's case names (diffusers, torch,
    CPU), with the same random weights (the reference's init, converted through the family's key table) and
    inputs, in one process. Repeats alternate ours / reference, so load from other jobs hits both alike.

    Peak memory. Ours: mx.get_peak_memory over one step (weights included). Reference: the parameter bytes +
    the inputs + the peak of the tensors alive during the step (`_LiveTensorPeak`). Both are also measured as
    the growth of the process's RSS high-water mark over one step (after clearing MLX's cache), a cross-check
    with its own caveats (allocator caches, glibc keeping freed heap). Precision: the reference is cast the way
    from_pretrained(torch_dtype=...) loads it; ours holds every weight in `dtype`, as our converter writes them.
    torch's CPU bf16 matmuls use oneDNN (AVX512-BF16 where present); MLX's CPU bf16 matmuls have no BLAS path:
    compare bf16 on a GPU, fp32 on a CPU.
    """
    dtype = dtype or default_dtype()
    case = step_case(model_id, size, frames, layers, dtype, width, seed, variant, guidance)
    if case.reference is None:
        raise click.BadParameter(f"{case.model_id}{' (' + case.variant + ')' if case.variant else ''}: its family "
                                 "declares no reference implementation for this step")
    try:
        import torch

        reference_class(case.reference)
    except (ImportError, AttributeError) as e:  # torch and diffusers are optional: only this harness and the tests use them
        msg = f"vs-reference skipped: needs torch and {case.reference.package} ({e})"
        echo(msg)
        return _finish({"harness": "vs-reference", "skipped": True, "reason": msg}, json_path, echo, command)
    threads = threads or int(os.environ.get("OPENBLAS_NUM_THREADS", 0)) or os.cpu_count()
    torch.set_num_threads(threads)
    pair = step_pair(case, dtype, seed)
    info, our_weights, ref_weights, inputs = pair.info, pair.ours_weights_bytes, pair.reference_weights_bytes, \
        pair.inputs_bytes
    measured = side_by_side(pair.ours, pair.reference, repeats, ref_weights + inputs, warmup)
    pair = None
    try:
        counted = torch_flop_count(case.reference)["total"]
    except Exception as e:  # the meta-device count is a cross-check: a model it cannot trace is reported, not fatal
        counted, info["torch_flop_count_error"] = None, repr(e)[:300]
    record = _vs_reference_record(case, size, frames, repeats, guidance, threads, info, measured,
                                  (our_weights, ref_weights, inputs), counted)
    _print_vs_reference(record, echo)
    _release()
    return _finish(record, json_path, echo, command)


def _vs_reference_record(case, size, frames, repeats, guidance, threads, info, measured, sizes, counted) -> dict:
    rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_peak, ref_rss = measured
    our_weights, ref_weights, inputs = sizes
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    ref_flops = case.reference.flops or case.flops  # the reference may compute padding that ours drops
    return {
        "harness": "vs-reference", "skipped": False, **info, "width": size[0], "height": size[1], "frames": frames,
        "guidance": guidance, "tokens": case.tokens, "model_width": case.width, "repeats": repeats,
        "torch_threads": threads, "ours_times_s": ours_times, "reference_times_s": ref_times,
        "ours_seconds_per_step": t_ours, "reference_seconds_per_step": t_ref,
        "time_ratio_ours_over_reference": t_ours / t_ref,
        # the fastest repeat of each: on shared cores, the least disturbed one
        "ours_seconds_min": min(ours_times), "reference_seconds_min": min(ref_times),
        "time_ratio_min_ours_over_reference": min(ours_times) / min(ref_times),
        "ours_weights_bytes": our_weights, "reference_weights_bytes": ref_weights,
        "ours_peak_memory_bytes": ours_peak, "reference_peak_memory_bytes": ref_peak,
        "reference_tracked_activation_peak_bytes": ref_peak - (ref_weights + inputs),
        "memory_ratio_ours_over_reference": ours_peak / ref_peak,
        "ours_rss_hwm_delta_bytes": ours_rss, "reference_rss_hwm_delta_bytes": ref_rss,
        "output_relative_l2_error": rel_err,
        "flops_per_step_model": case.flops, "reference_flops_per_step_model": ref_flops,
        "flops_per_step_torch_counter": counted,
        "ours_tflops": case.flops / t_ours / 1e12, "reference_tflops": ref_flops / t_ref / 1e12,
    }


def _print_vs_reference(r: dict, echo) -> None:
    t_ours, t_ref = r["ours_seconds_per_step"], r["reference_seconds_per_step"]
    depth = ", ".join(f"{n} {k}" for k, n in r["depth"].items())
    echo(f"vs-reference: {r['model']}, {r['width']}x{r['height']}x{r['frames']} ({r['tokens']} tokens, batch "
         f"{r['batch']}), {depth} at width {r['model_width']}, {r['dtype']}, torch threads {r['torch_threads']}")
    _table([
        ("seconds per step (median)", f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ours / t_ref:.3f}"),
        ("seconds per step (fastest)", f"{r['ours_seconds_min']:.3f}", f"{r['reference_seconds_min']:.3f}",
         f"{r['time_ratio_min_ours_over_reference']:.3f}"),
        ("TFLOP/s", f"{r['ours_tflops']:.3f}", f"{r['reference_tflops']:.3f}", ""),
        ("peak memory (allocator)", _fmt_bytes(r["ours_peak_memory_bytes"]), _fmt_bytes(r["reference_peak_memory_bytes"]),
         f"{r['memory_ratio_ours_over_reference']:.3f}"),
        ("  of which weights", _fmt_bytes(r["ours_weights_bytes"]), _fmt_bytes(r["reference_weights_bytes"]), ""),
        ("RSS high-water growth", _fmt_bytes(r["ours_rss_hwm_delta_bytes"]), _fmt_bytes(r["reference_rss_hwm_delta_bytes"]),
         ""),
    ], echo, header=("", "ours (MLX)", "reference (torch)", "ours/ref"))
    counted = r["flops_per_step_torch_counter"]
    ref_model = r["reference_flops_per_step_model"]
    echo(f"output relative L2 difference: {r['output_relative_l2_error']:.2e}; FLOPs per step: model "
         f"{r['flops_per_step_model'] / 1e12:.4f} T"
         + ("" if ref_model == r["flops_per_step_model"] else f" (the reference's padded inputs: {ref_model / 1e12:.4f} T)")
         + f", torch counter {'-' if counted is None else f'{counted / 1e12:.4f} T'}")


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# ---------------------------------------------------------------------------------------------- vae


def vae_pair(reference, device: str = "cpu", seed: int = 0):
    """(ours_decode, reference_decode, info) of a `VAEReferenceCase`: the reference with its random init on the
    torch `device`, ours converted from it by the case, fp32, both decoding the same latents. Each decode
    returns the video: ours (B, T, H, W, 3), the reference's (B, 3, T, H, W), its device synchronised."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        ref = reference_class(reference)(**reference.kwargs).eval()
    config = dict(ref.config)
    ours_decode = reference.ours(config, reference.convert(
        {k: torch_to_mx(v, "fp32") for k, v in ref.state_dict().items()}))
    z_ref = torch.from_numpy(reference.reference_latents(config)).to(device)

    def ref_decode():
        with torch.inference_mode():
            video = ref.decode(z_ref).sample
        torch_sync(device)
        return video

    info = {"latent_shape": list(reference.latents(config).shape), "dtype": "fp32",
            "reference": f"{reference.package} {_version(reference.package)} {reference.class_name}, "
                         f"torch {torch.__version__}", "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    return ours_decode, ref_decode, info


def run_vae(model_id: str | None = None, sizes=((64, 64), (128, 128)), frame_counts=(1, 5, 9, 13),
            dtype: str = "fp32", width: dict | None = None, repeats: int = 1, json_path=None, chunk: int | None = None,
            encode: bool = False, warmup: bool = True, seed: int = 0, echo=click.echo,
            command: str | None = None) -> dict:
    """Decode (or, with `encode`, encode) time and peak memory per output frame, random weights, at each size x
    frame count, through the family's VAE case: the decode as the pipeline runs it (chunked or tiled, each
    chunk copied out), against the pipeline's estimate of its activations. The peak is mx.get_peak_memory over
    one decode (weights included); `peak_growth` compares the longest video with the shortest multi-chunk one.
    `width` replaces the VAE's widths (`{"base_dim": n}` narrows it); `chunk`: latent frames per decoder step
    where the family takes it.
    """
    import mlx.core as mx

    spec = get_spec(model_id or DEFAULT_MODEL)
    case = vae_case(spec.id, dtype, width, chunk, seed)
    if encode and case.encode is None:
        raise click.BadParameter(f"{spec.id}: its family's VAE case has no encode benchmark")
    for f in frame_counts:
        if (f - 1) % case.temporal:
            raise click.BadParameter(f"frame counts must be {case.temporal}k+1, got {f}")
    for w, h in sizes:
        if w % case.spatial or h % case.spatial:
            raise click.BadParameter(f"sizes must be multiples of {case.spatial}, got {w}x{h}")
    _release()
    weights = case.load(dtype, "encoder" if encode else "decoder")
    rows = []
    for w, h in sizes:
        if warmup and not encode:  # a warm-up at this size
            case.decode(mx.random.normal((1, 1, h // case.spatial, w // case.spatial, case.latent_channels)))
        rows += [_vae_row(case, w, h, f, repeats, weights, seed, encode) for f in frame_counts]
    growth = {}
    for w, h in sizes:
        multi = [r for r in rows if (r["width"], r["height"]) == (w, h) and r["latent_frames"] > 1]
        if len(multi) >= 2:
            growth[f"{w}x{h}"] = multi[-1]["peak_memory_bytes"] / multi[0]["peak_memory_bytes"]
    record = {"harness": "vae-encode" if encode else "vae", "model": spec.id, "vae_config": case.config,
              "dtype": dtype, "repeats": repeats, "chunk": chunk, "weights_bytes": weights, "results": rows,
              "peak_growth": growth}
    description = case.description
    case = None
    _release()
    echo(f"vae {'encode' if encode else 'decode'}: {spec.id}'s VAE ({description}), {dtype}, "
         f"weights {_fmt_bytes(weights)}, {mx.default_device()}")
    _table([(f"{r['width']}x{r['height']}", r["frames"], f"{r['seconds']:.3f}", f"{r['seconds_per_frame']:.3f}",
             _fmt_bytes(r["peak_memory_bytes"]), _fmt_bytes(r["activation_bytes_estimated"])) for r in rows], echo,
           header=("size", "frames", "seconds", "s/frame", "peak memory", "act. estimate"))
    for k, v in growth.items():
        echo(f"{k}: peak at the most frames / peak at the fewest multi-chunk frames = {v:.3f}")
    return _finish(record, json_path, echo, command)


def _vae_row(case, w: int, h: int, frames: int, repeats: int, weights: int, seed: int, encode: bool) -> dict:
    import mlx.core as mx

    t = (frames - 1) // case.temporal + 1
    if encode:
        x = mx.random.uniform(-1, 1, (1, frames, h, w, 3), key=mx.random.key(seed + frames))

        def run():
            mx.eval(case.encode(x))
            return frames

        estimate = case.encode_estimate
    else:
        x = mx.random.normal((1, t, h // case.spatial, w // case.spatial, case.latent_channels),
                             key=mx.random.key(seed + frames))
        run, estimate = (lambda: case.decode(x)), case.estimate
    mx.eval(x)
    _release()
    mx.reset_peak_memory()
    times, out_frames = [], frames
    for _ in range(repeats):
        start = time.perf_counter()
        out_frames = run()
        times.append(time.perf_counter() - start)
    peak = mx.get_peak_memory()
    med = statistics.median(times)
    est = estimate(w, h, frames) if estimate else None
    total = est["total"] if isinstance(est, dict) else est
    return {"width": w, "height": h, "frames": out_frames, "latent_frames": t, "seconds": med, "times_s": times,
            "seconds_per_frame": med / out_frames, "peak_memory_bytes": peak, "activation_bytes": peak - weights,
            "activation_bytes_estimated": total, "estimate": est}


# ---------------------------------------------------------------------------------------------- estimate


def run_estimate(model_id: str | None = None, size: tuple[int, int] | None = None, frames: int | None = None,
                 steps: int | None = None, chips=("all",), dtype: str = "bf16", quantize: str | None = None,
                 guidance: bool | None = None, efficiency: float | None = None, peak_json=None, json_path=None,
                 echo=click.echo, command: str | None = None) -> dict:
    """Predicted minutes per video on Apple chips, from the family's cost model (no measurement on the chip).
    `guidance` None: as the model's published settings run (`ModelSpec.cfg_by_default`)."""
    spec = get_spec(model_id or DEFAULT_MODEL)
    guidance = spec.cfg_by_default if guidance is None else guidance
    width, height = size or spec.default_size
    frames = frames or spec.frames
    measured = None
    if peak_json:
        measured = json.loads(Path(peak_json).read_text()).get("matmul_peak_tflops")
    names = list(C.CHIPS) if "all" in chips else list(chips)
    preds = [C.predict(c, spec, width, height, frames, steps, guidance, dtype, quantize, efficiency, measured)
             for c in names]
    model = cost_model(spec.family)  # arithmetic only: every registered family's cost model
    fl = model.video_flops(spec, width, height, frames, steps, guidance)
    mem = model.estimate_peak_memory(spec, width, height, frames, dtype, quantize, guidance=guidance)
    record = {"harness": "estimate", "model": spec.id, "width": width, "height": height, "frames": frames,
              "steps": fl["steps"], "dtype": dtype, "quantize": quantize, "guidance": guidance,
              "tokens": model.tokens(spec, width, height, frames), "flops": fl, "peak_memory": mem.to_dict(),
              "measured_tflops": measured, "predictions": preds}
    echo(f"estimate: {spec.id} {width}x{height}x{frames}, {fl['steps']} steps, {'CFG' if guidance else 'no CFG'}, "
         f"{dtype}{' ' + quantize if quantize else ''}: {record['tokens']} tokens, "
         f"{fl['per_step'] / 1e15:.3f} PFLOP/step, {fl['total'] / 1e15:.1f} PFLOP/video, "
         f"peak memory {_fmt_bytes(mem.peak_bytes)} ({mem.peak_stage})")
    _table([(p["chip"], f"{p['peak_tflops']:.1f}", f"{p['efficiency']:.0%}", f"{p['seconds_per_step']:.1f}",
             f"{p['minutes_per_video']:.1f}", f"{p['minutes_per_video_at_peak']:.1f}",
             ",".join(map(str, p["fits_in_gb"])) or "none", "yes" if p["chip_verified"] else "no") for p in preds],
           echo, header=("chip", "peak TFLOP/s", "eff.", "s/step", "min/video", "min at 100%",
                         "RAM options >= peak (GB)",
                         "figures verified"))
    echo("Chip figures: see mlx_video/cost.py CHIPS for each source. Not included: VAE decode, model loading.")
    record["speedups"] = print_speedups(spec, width, height, frames, [p["chip"] for p in preds], dtype, efficiency,
                                        guidance, echo)
    return _finish(record, json_path, echo, command)


def print_speedups(spec, width, height, frames, chips, dtype, efficiency, guidance, echo=click.echo) -> dict:
    """The per-video FLOP and time table of mlx_video.speedup: dense, cache, radial, radial + cache, few-step."""
    from mlx_video.speedup import speedup_table

    table = speedup_table(spec, width, height, frames, chips, dtype, efficiency, guidance)

    def fmt(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    def row(r):
        dense = "-" if r.get("dense_steps", 0) is None else fmt(r.get("dense_steps"), "{}")  # "-": not radial
        total = None if r["total"] is None else r["total"] / 1e15
        return (r["plan"], r["evaluations"], dense, fmt(total, "{:.1f}"), fmt(r["fewer_flops"], "{:.2f}x"),
                *(fmt(r["minutes"][c], "{:.1f}") for c in chips))

    fraction = table["radial_fraction"]
    echo(f"\nPer video ({table['tokens']} tokens; radial attention: "
         + (f"{fraction:.3f} of the scores in a sparse block, {table['radial']})" if fraction is not None
            else f"n/a, {table['radial_missing']})"))
    _table([row(r) for r in table["rows"]], echo,
           header=("run", "evaluations", "dense steps", "PFLOP", "fewer FLOPs", *(f"min {c}" for c in chips)))
    echo(f"Minutes at {table['efficiency']:.0%} of each chip's peak (an assumption); a skipped step counted as "
         "free; mlx_video/speedup.py says what is counted.")
    return table


# ---------------------------------------------------------------------------------------------- CLI


def _parse_size(value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise click.BadParameter(f"sizes are WIDTHxHEIGHT, e.g. 256x256, not {value!r}") from None


def _parse_list(value: str, parse=int) -> list:
    return [parse(v) for v in value.split(",") if v.strip()]


def _parse_width(value: str | None) -> dict | None:
    """KEY=VALUE,... -> {key: int, float, or a list of them written A/B/C}: a family's width overrides (its case
    says which keys it takes)."""
    if not value:
        return None

    def number(text: str):
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)

    out = {}
    for item in filter(str.strip, value.split(",")):
        key, sep, text = item.partition("=")
        try:
            out[key.strip()] = [number(t) for t in text.split("/")] if "/" in text else number(text)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(f"--width takes KEY=NUMBER (or KEY=A/B/C),..., not {item!r}")
    return out


def _model_option(f):
    # the models of the families that declare benchmark cases (Family.bench); the rest are refused by name
    return click.option("--model", "-m", "model_id", type=click.Choice(bench_models()), default=DEFAULT_MODEL,
                        show_default=True, help="Registry model (of a family with benchmark cases).")(f)


def _any_model_option(f):
    # the estimate is arithmetic over a family's cost model: every registered model has one
    return click.option("--model", "-m", "model_id", type=click.Choice(list(MODELS)), default=DEFAULT_MODEL,
                        show_default=True, help="Registry model.")(f)


def _case_options(f):
    f = click.option("--variant", default=None,
                     help="The model's step variant, where its family declares them (step: several, comma-separated, "
                          "run side by side).")(f)
    f = click.option("--width", "width", default=None, metavar="KEY=N,...",
                     help="The family's width overrides (e.g. a narrower model; a list as A/B/C).")(f)
    return click.option("--layers", default=None, metavar="N|KIND=N,...",
                        help="Blocks to build (real width, random weights): N, or per kind of block "
                             "(e.g. double=1,single=1). Default: the family's.")(f)


def _json_option(f):
    return click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                        help="Write the record (results, machine, versions, command, date) to this JSON file.")(f)


def _dtype_option(f):
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
                        help="Weights and compute dtype. Default: bf16 on a GPU, fp32 on the CPU.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def bench():
    """Benchmarks: a denoising step, the device's peak, the VAE decode, diffusers side by side, predictions."""


@bench.command()
@_model_option
@click.option("--size", default="256x256", show_default=True, metavar="WxH")
@click.option("--frames", type=int, default=9, show_default=True)
@_case_options
@_dtype_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--no-guidance", is_flag=True, help="One forward per step instead of the two of CFG.")
@click.option("--peak-probe", type=int, default=2048, show_default=True,
              help="Matmul size measured for the FLOP utilisation (0: skip).")
@_json_option
def step(model_id, size, frames, layers, width, variant, dtype, repeats, warmup, no_guidance, peak_probe, json_path):
    """Time one denoising step at reduced depth and extrapolate to the full model (several comma-separated
    --variant: side by side, alternating)."""
    if variant and "," in variant:
        run_step_variants(model_id, [v.strip() for v in variant.split(",") if v.strip()], _parse_size(size), frames,
                          layers, dtype, repeats, not no_guidance, json_path, _parse_width(width))
        return
    run_step(model_id, _parse_size(size), frames, layers, dtype, repeats, warmup, not no_guidance, json_path,
             _parse_width(width), peak_probe=peak_probe, variant=variant)


@bench.command()
@_dtype_option
@click.option("--sizes", default="1024,2048,4096", show_default=True, help="Square matmul sizes n (n^3).")
@click.option("--tokens", default="512,1024", show_default=True, help="Attention sequence lengths.")
@click.option("--heads", type=int, default=40, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--max-seconds", type=float, default=30.0, show_default=True,
              help="A shape slower than this ends its series.")
@_json_option
def peak(dtype, sizes, tokens, heads, repeats, max_seconds, json_path):
    """Measured matmul and attention throughput in the dtype in use."""
    run_peak(dtype, _parse_list(sizes), _parse_list(tokens), heads, repeats=repeats, max_seconds=max_seconds,
             json_path=json_path)


@bench.command("vs-reference")
@_model_option
@click.option("--size", default="256x256", show_default=True, metavar="WxH")
@click.option("--frames", type=int, default=9, show_default=True)
@_case_options
@_dtype_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads. Default: OPENBLAS_NUM_THREADS, else all cores.")
@click.option("--no-guidance", is_flag=True)
@_json_option
def vs_reference(model_id, size, frames, layers, width, variant, dtype, repeats, threads, no_guidance, json_path):
    """The same step through the reference (diffusers, torch, CPU): time and peak memory ratios."""
    run_vs_reference(model_id, _parse_size(size), frames, layers, dtype, repeats, guidance=not no_guidance,
                     threads=threads, json_path=json_path, width=_parse_width(width), variant=variant)


@bench.command()
@_model_option
@click.option("--sizes", default="64x64,128x128", show_default=True, help="Output sizes WxH, comma separated.")
@click.option("--frames", default="1,5,9,13", show_default=True, help="Output frame counts (4k+1), comma separated.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="fp32", show_default=True,
              help="The pipeline decodes in fp32.")
@click.option("--vae-dim", type=int, default=None, help="Narrower VAE: its base_dim (the same as --width base_dim=N).")
@click.option("--width", default=None, metavar="KEY=N,...", help="The family's VAE width overrides.")
@click.option("--chunk", type=int, default=None,
              help="Latent frames per decoder step, where the family takes it (0: the whole clip at once).")
@click.option("--encode", is_flag=True, help="Time the encoder on videos of these sizes and frame counts instead.")
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--no-warmup", is_flag=True, help="No one-latent-frame warm-up decode at each size.")
@_json_option
def vae(model_id, sizes, frames, dtype, vae_dim, width, chunk, encode, repeats, no_warmup, json_path):
    """VAE decode (or encode) time and peak memory per output frame at several sizes and frame counts."""
    width = {**(_parse_width(width) or {}), **({"base_dim": vae_dim} if vae_dim else {})} or None
    run_vae(model_id, _parse_list(sizes, _parse_size), _parse_list(frames), dtype, width, repeats, json_path, chunk,
            encode, warmup=not no_warmup)


@bench.command()
@_any_model_option
@click.option("--size", default=None, metavar="WxH", help="Default: the model's first published size.")
@click.option("--frames", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--chip", "chips", multiple=True, default=("all",), show_default=True,
              help=f"One of {', '.join(C.CHIPS)}, or all (repeatable).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="bf16", show_default=True)
@click.option("--quantize", type=click.Choice(list(C.QUANT_BITS)), default=None)
@click.option("--guidance/--no-guidance", default=None,
              help="Count two passes a step (classifier-free guidance) or one. Default: as the model's published "
                   "settings run (one for distilled or embedded guidance).")
@click.option("--efficiency", type=float, default=None,
              help=f"Fraction of peak reached (default {C.DEFAULT_EFFICIENCY}, an assumption).")
@click.option("--peak-json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A `bench peak` record from the target machine: its matmul TFLOP/s replaces the published peak.")
@_json_option
def estimate(model_id, size, frames, steps, chips, dtype, quantize, guidance, efficiency, peak_json, json_path):
    """Predicted minutes per video on Apple chips (published peak figures, FLOP model)."""
    for c in chips:
        if c != "all" and c.lower() not in C.CHIPS:
            raise click.BadParameter(f"unknown chip {c!r}; known: {', '.join(C.CHIPS)}, all")
    run_estimate(model_id, _parse_size(size) if size else None, frames, steps, chips, dtype, quantize,
                 guidance, efficiency, peak_json, json_path)


def main(argv=None) -> None:
    bench.main(args=argv, prog_name="mlxvid bench")


if __name__ == "__main__":
    main()
