"""Benchmark harnesses: one denoising step, the device's peak, the VAE decode, a run against diffusers, and
the predicted time of a video on an Apple chip.

Each harness prints a table and returns a dict; with `json_path` it also writes that dict, together with the
machine it ran on (device, OS, versions, BLAS, load average), the command and the date.

    mlxvid bench step --model wan2.2-t2v-a14b --size 256x256 --frames 9 --layers 2 --dtype fp32
    mlxvid bench peak --dtype fp32
    mlxvid bench vs-reference --size 256x256 --frames 9 --layers 2 --dtype fp32
    mlxvid bench vae --sizes 64x64,128x128 --frames 1,5,9,13
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
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import click

from mlx_video import cost as C
from mlx_video.families import cost_model
from mlx_video.families.wan import cost_model as F
from mlx_video.pipelines.loop import guidance_batched
from mlx_video.registry import MODELS, get_spec

DTYPE_NAMES = ("fp32", "bf16", "fp16")
GUIDANCE_SCALE = 5.0  # any value != 1 makes the step run both passes; the value does not change the cost


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
    """Cast every parameter to `dtype` and evaluate them one at a time (a float32 random init of one tensor at a
    time, never of the whole model). Returns the bytes of the parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    dt = _mx_dtype(dtype)
    params = tree_flatten(module.parameters())
    module.update(tree_unflatten([(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params]))
    total = 0
    for _, v in tree_flatten(module.parameters()):
        mx.eval(v)
        total += v.nbytes
    return total


def random_transformer(config, dtype: str, seed: int = 0):
    """`WanTransformer(config)` with MLX's default random init, materialised in `dtype`."""
    import mlx.core as mx

    from mlx_video.families.wan.transformer import WanTransformer

    mx.random.seed(seed)
    model = WanTransformer(config)
    return model, _materialise(model, dtype)


def velocity(model, latents, t: float, context, guidance: float):
    """One denoising step's model evaluation as the pipeline runs it (`mlx_video.pipelines.loop.guidance_batched`, the strategy `generate` uses by default): with guidance,
    the conditional and unconditional passes batched into one forward, then combined."""
    import mlx.core as mx

    uncond = context[1:] if context.shape[0] > 1 else None
    return guidance_batched(model, latents, mx.array([t], dtype=mx.float32), context[:1], uncond, guidance)


def _setup(model_id: str, dtype, config, layers: int, size: tuple[int, int], frames: int, guidance: bool):
    """What `step` and `vs-reference` share: the spec, dtype, full and reduced-depth configs, the token
    geometry, the batch (2 with guidance) and the guidance scale."""
    spec = get_spec(model_id)
    full = config or spec.transformer
    cfg = replace(full, num_layers=layers)
    geo = _geometry(spec, cfg, size[0], size[1], frames)
    batch = 2 if guidance else 1
    return spec, dtype or default_dtype(), full, cfg, geo, batch, GUIDANCE_SCALE if guidance else 1.0


def _geometry(spec, config, width: int, height: int, frames: int) -> dict:
    lt, lh, lw = spec.latent_grid(width, height, frames)
    pt, ph, pw = config.patch_size
    if lt % pt or lh % ph or lw % pw:
        raise click.BadParameter(f"latent {lt}x{lh}x{lw} is not a multiple of the patch {config.patch_size}")
    grid = (lt // pt, lh // ph, lw // pw)
    return {"latent": (lt, lh, lw), "grid": grid, "tokens": math.prod(grid)}


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


def run_step(model_id: str = "wan2.2-t2v-a14b", size: tuple[int, int] = (256, 256), frames: int = 9,
             layers: int = 2, dtype: str | None = None, repeats: int = 3, warmup: int = 1, guidance: bool = True,
             json_path=None, config=None, peak_probe: int = 2048, seed: int = 0, echo=click.echo,
             command: str | None = None) -> dict:
    """Time one denoising step of `model_id` at `size` / `frames`, with `layers` blocks of the real width.

    Reports the median seconds per step, the peak memory (mx.get_peak_memory over the timed repeats), FLOPs
    and achieved TFLOP/s, the model FLOP utilisation against a matmul of `peak_probe`^3 measured in the same
    run, and the extrapolation to the full depth: the step is also timed with the blocks removed (patch,
    text and time embeddings, head), so time per block = (t(layers) - t(0)) / layers and the full-depth step
    = t(0) + time per block x depth. `config` replaces the registry's transformer config (tests use a tiny one).
    """
    import mlx.core as mx

    spec, dtype, full, cfg, geo, batch, g = _setup(model_id, dtype, config, layers, size, frames, guidance)
    width, height = size

    _release()
    mx.reset_peak_memory()
    model, weights = random_transformer(cfg, dtype, seed)
    dt = _mx_dtype(dtype)
    key = mx.random.key(seed + 1)
    k1, k2 = mx.random.split(key)
    latents = mx.random.normal((1, *geo["latent"], cfg.in_channels), key=k1).astype(dt)
    context = mx.random.normal((batch, spec.default("text_len", 512), cfg.text_dim), key=k2).astype(dt)
    mx.eval(latents, context)
    inputs = latents.nbytes + context.nbytes

    def step():
        mx.eval(velocity(model, latents, 500.0, context, g))

    for _ in range(warmup):
        step()
    mx.reset_peak_memory()
    times = _timed(step, repeats, warmup=0)
    peak = mx.get_peak_memory()

    # Without the blocks, MLX would skip the text embedding and the time projection (lazy evaluation drops what
    # nothing consumes): one stub block keeps them in the graph at the cost of a slice.
    blocks = model.blocks
    model.blocks = [_consume_block_inputs]
    try:
        overhead = statistics.median(_timed(step, repeats, warmup=1))
    finally:
        model.blocks = blocks

    median = statistics.median(times)
    per_block = max(median - overhead, 0.0) / layers if layers else 0.0
    full_step = overhead + per_block * full.num_layers
    groups = geo["grid"][0] if spec.default("per_frame_timesteps") else 1
    fl = F.forward_flops(cfg, geo["tokens"], spec.default("text_len", 512), batch, groups)
    fl_full = F.forward_flops(full, geo["tokens"], spec.default("text_len", 512), batch, groups)
    block_weights = (weights - _zero_layer_bytes(cfg, dtype)) / layers if layers else 0
    act_est = F.activation_bytes(cfg, geo["tokens"], batch, dtype, spec.default("text_len", 512), fused_attention=_on_gpu())
    model = None  # free it before the matmul probe
    _release()
    matmul_peak = measure_matmul(dtype, peak_probe) if peak_probe else None
    achieved = fl.total / median / 1e12

    record = {
        "harness": "step", "model": spec.id, "config": cfg.to_dict(), "full_layers": full.num_layers,
        "width": width, "height": height, "frames": frames, "layers": layers, "dtype": dtype,
        "guidance": guidance, "batch": batch, "latent": geo["latent"], "tokens": geo["tokens"],
        "repeats": repeats, "warmup": warmup, "times_s": times, "seconds_per_step": median,
        "seconds_per_step_min": min(times),
        "seconds_without_blocks": overhead, "seconds_per_block": per_block,
        "full_depth_seconds_per_step": full_step,
        "full_depth_minutes_per_video_at_this_size": full_step * spec.steps / 60, "steps_per_video": spec.steps,
        "flops_per_step": fl.total, "flops_per_step_components": fl.components,
        "full_depth_flops_per_step": fl_full.total, "achieved_tflops": achieved,
        "matmul_peak_tflops": matmul_peak, "matmul_peak_probe_n": peak_probe,
        "mfu": achieved / matmul_peak if matmul_peak else None,
        "peak_memory_bytes": peak, "weights_bytes": weights, "inputs_bytes": inputs,
        "activation_bytes_measured": peak - weights - inputs,
        "activation_bytes_estimated": act_est["peak"], "activation_estimate": act_est,
        "full_depth_peak_memory_bytes_extrapolated": peak + (full.num_layers - layers) * block_weights,
        "full_depth_weights_bytes": F.transformer_weight_bytes(full, dtype),
    }
    echo(f"step: {spec.id}, {width}x{height}x{frames} ({geo['tokens']} tokens, batch {batch}), "
         f"{layers} of {full.num_layers} blocks at width {cfg.dim}, {dtype}, {str(mx.default_device())}")
    _table([
        ("seconds per step (median)", f"{median:.3f}  (runs: {', '.join(f'{t:.3f}' for t in times)})"),
        ("seconds without blocks", f"{overhead:.3f}"),
        ("seconds per block", f"{per_block:.3f}"),
        (f"full depth ({full.num_layers} blocks): s/step", f"{full_step:.2f}"),
        (f"full depth: min/video ({spec.steps} steps)", f"{full_step * spec.steps / 60:.1f}  (at this size)"),
        ("FLOPs per step", f"{fl.total / 1e12:.3f} TFLOP"),
        ("achieved", f"{achieved:.3f} TFLOP/s"),
        (f"matmul peak ({peak_probe}^3, {dtype})", f"{matmul_peak:.3f} TFLOP/s" if matmul_peak else "-"),
        ("model FLOP utilisation", f"{record['mfu']:.1%}" if matmul_peak else "-"),
        ("peak memory", _fmt_bytes(peak)),
        ("  weights / inputs", f"{_fmt_bytes(weights)} / {_fmt_bytes(inputs)}"),
        ("  activations measured / estimated", f"{_fmt_bytes(record['activation_bytes_measured'])} / "
                                               f"{_fmt_bytes(act_est['peak'])}"),
        ("full depth peak memory (extrapolated)", _fmt_bytes(record["full_depth_peak_memory_bytes_extrapolated"])),
    ], echo)
    return _finish(record, json_path, echo, command)


def _consume_block_inputs(hidden, time, context, rope, cross_kv=None):
    return hidden + 0 * context[:, None, :1, :1].astype(hidden.dtype) + 0 * time[:, :, :1, :1].astype(hidden.dtype)


def _zero_layer_bytes(config, dtype: str) -> int:
    zero = replace(config, num_layers=0)
    return F.transformer_weight_bytes(zero, dtype)


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


def diffusers_kwargs(config) -> dict:
    """WanTransformer3DModel(**kwargs) with the architecture of our config."""
    return dict(
        patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_channels, out_channels=config.out_channels, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=config.eps, rope_max_seq_len=config.rope_max_positions,
    )


def torch_flop_count(config, latent: tuple[int, int, int], batch: int = 1, text_len: int = 512) -> dict:
    """FLOPs of one diffusers WanTransformer3DModel forward counted by torch.utils.flop_counter.FlopCounterMode,
    on the meta device (no memory, no compute): an independent check of `flops.forward_flops`."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(config))
        x = torch.empty(batch, config.in_channels, *latent)
        t = torch.empty(batch)
        ctx = torch.empty(batch, text_len, config.text_dim)
        with FlopCounterMode(display=False) as counter:
            model(x, t, ctx, return_dict=False)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


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


def wan_step_pair(model_id: str, size: tuple[int, int], frames: int, layers: int, dtype: str | None,
                  guidance: bool = True, config=None, seed: int = 0, device: str = "cpu") -> StepPair:
    """The step of `run_step` through ours and through diffusers' WanTransformer3DModel on the torch `device`:
    diffusers' random init, cast as from_pretrained(torch_dtype=...) loads it (its `_keep_in_fp32_modules`
    stay float32), converted to ours through mlx_video/families/wan/keys.py's DIFFUSERS_TRANSFORMER; the same inputs."""
    import mlx.core as mx
    import torch
    from diffusers import WanTransformer3DModel

    from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER
    from mlx_video.families.wan.transformer import WanTransformer

    spec, dtype, full, cfg, geo, batch, g = _setup(model_id, dtype, config, layers, size, frames, guidance)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(seed)
    with torch.device(device):
        ref = WanTransformer3DModel(**diffusers_kwargs(cfg)).eval()
    keep = getattr(ref, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(tdt)
    _release()
    ours = WanTransformer(cfg)
    converted = [DIFFUSERS_TRANSFORMER.apply(k, torch_to_mx(v, dtype)) for k, v in ref.state_dict().items()]
    ours.load_weights([c for c in converted if c is not None], strict=True)
    mx.eval(ours.parameters())
    del converted

    text_len = spec.default("text_len", 512)
    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(1, *geo["latent"], cfg.in_channels, generator=gen).to(tdt)
    ctx_t = torch.randn(batch, text_len, cfg.text_dim, generator=gen).to(tdt)
    x_m, ctx_m = torch_to_mx(x_t, dtype), torch_to_mx(ctx_t, dtype)
    x_ref = x_t.permute(0, 4, 1, 2, 3).contiguous().to(device)  # diffusers: (B, C, T, H, W)
    ctx_ref, t_ref = ctx_t.to(device), torch.full((batch,), 500.0, device=device)

    def ours_step():
        v = velocity(ours, x_m, 500.0, ctx_m, g)
        mx.eval(v)
        return v

    def ref_step():
        with torch.inference_mode():
            if batch == 1:
                out = ref(x_ref, t_ref, ctx_ref, return_dict=False)[0]
            else:
                cond, uncond = ref(torch.cat([x_ref, x_ref]), t_ref, ctx_ref, return_dict=False)[0].chunk(2)
                out = uncond + g * (cond - uncond)
        torch_sync(device)
        return out

    groups = geo["grid"][0] if spec.default("per_frame_timesteps") else 1
    return StepPair(
        ours=ours_step, reference=ref_step, flops=F.forward_flops(cfg, geo["tokens"], text_len, batch, groups).total,
        tokens=geo["tokens"], ours_weights_bytes=sum(v.nbytes for _, v in _flat(ours.parameters())),
        reference_weights_bytes=module_bytes(ref), inputs_bytes=x_t.numel() * x_t.element_size() + ctx_t.numel()
        * ctx_t.element_size(),
        info={"model": spec.id, "config": cfg.to_dict(), "width": size[0], "height": size[1], "frames": frames,
              "layers": layers, "dtype": dtype, "batch": batch, "text_tokens": text_len,
              "reference": f"diffusers {_version('diffusers')} WanTransformer3DModel, torch {torch.__version__}"},
    )


def run_vs_reference(model_id: str = "wan2.2-t2v-a14b", size: tuple[int, int] = (256, 256), frames: int = 9,
                     layers: int = 2, dtype: str | None = None, repeats: int = 3, warmup: int = 1,
                     guidance: bool = True, threads: int | None = None, json_path=None, config=None, seed: int = 0,
                     echo=click.echo, command: str | None = None) -> dict:
    """The step of `run_step` through ours and through diffusers' WanTransformer3DModel (torch, CPU), with the
    same random weights (diffusers' init, converted through mlx_video/families/wan/keys.py's DIFFUSERS_TRANSFORMER) and inputs,
    in one process. Repeats alternate ours / reference, so load from other jobs hits both alike.

    Peak memory. Ours: mx.get_peak_memory over one step (weights included). Reference: the parameter bytes +
    the inputs + the peak of the tensors alive during the step (`_LiveTensorPeak`). Both are also measured as
    the growth of the process's RSS high-water mark over one step (after clearing MLX's cache), a cross-check
    with its own caveats (allocator caches, glibc keeping freed heap). Precision: the reference is cast the way
    diffusers' from_pretrained(torch_dtype=...) loads it (its `_keep_in_fp32_modules` stay float32); ours
    holds every weight in `dtype`, as our converter writes them. torch's CPU bf16 matmuls use oneDNN (AVX512-BF16
    where present); MLX's CPU bf16 matmuls have no BLAS path: compare bf16 on a GPU, fp32 on a CPU.
    """
    try:
        import torch
        from diffusers import WanTransformer3DModel  # noqa: F401  (wan_step_pair builds it)
    except ImportError as e:  # torch and diffusers are optional: only this harness and the tests use them
        msg = f"vs-reference skipped: needs torch and diffusers ({e})"
        echo(msg)
        return _finish({"harness": "vs-reference", "skipped": True, "reason": msg}, json_path, echo, command)
    spec, dtype, full, cfg, geo, batch, g = _setup(model_id, dtype, config, layers, size, frames, guidance)
    width, height = size
    threads = threads or int(os.environ.get("OPENBLAS_NUM_THREADS", 0)) or os.cpu_count()
    torch.set_num_threads(threads)
    pair = wan_step_pair(model_id, size, frames, layers, dtype, guidance, config, seed)
    our_weights, ref_weights = pair.ours_weights_bytes, pair.reference_weights_bytes
    rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_peak, ref_rss = side_by_side(
        pair.ours, pair.reference, repeats, ref_weights + pair.inputs_bytes, warmup)
    inputs = pair.inputs_bytes
    pair = None

    counted = torch_flop_count(cfg, geo["latent"], batch, spec.default("text_len", 512))["total"]
    groups = geo["grid"][0] if spec.default("per_frame_timesteps") else 1
    modelled = F.forward_flops(cfg, geo["tokens"], spec.default("text_len", 512), batch, groups).total
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    record = {
        "harness": "vs-reference", "skipped": False, "model": spec.id, "config": cfg.to_dict(),
        "width": width, "height": height, "frames": frames, "layers": layers, "dtype": dtype, "guidance": guidance,
        "batch": batch, "tokens": geo["tokens"], "repeats": repeats, "torch_threads": threads,
        "reference": f"diffusers {_version('diffusers')} WanTransformer3DModel, torch {torch.__version__}",
        "ours_times_s": ours_times, "reference_times_s": ref_times,
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
        "flops_per_step_model": modelled, "flops_per_step_torch_counter": counted,
        "ours_tflops": modelled / t_ours / 1e12, "reference_tflops": modelled / t_ref / 1e12,
    }
    echo(f"vs-reference: {spec.id}, {width}x{height}x{frames} ({geo['tokens']} tokens, batch {batch}), {layers} blocks "
         f"at width {cfg.dim}, {dtype}, torch threads {threads}")
    _table([
        ("seconds per step (median)", f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ours / t_ref:.3f}"),
        ("seconds per step (fastest)", f"{min(ours_times):.3f}", f"{min(ref_times):.3f}",
         f"{min(ours_times) / min(ref_times):.3f}"),
        ("TFLOP/s", f"{modelled / t_ours / 1e12:.3f}", f"{modelled / t_ref / 1e12:.3f}", ""),
        ("peak memory (allocator)", _fmt_bytes(ours_peak), _fmt_bytes(ref_peak), f"{ours_peak / ref_peak:.3f}"),
        ("  of which weights", _fmt_bytes(our_weights), _fmt_bytes(ref_weights), ""),
        ("RSS high-water growth", _fmt_bytes(ours_rss), _fmt_bytes(ref_rss), ""),
    ], echo, header=("", "ours (MLX)", "reference (torch)", "ours/ref"))
    echo(f"output relative L2 difference: {rel_err:.2e}; FLOPs per step: model {modelled / 1e12:.4f} T, "
         f"torch counter {counted / 1e12:.4f} T")
    _release()
    return _finish(record, json_path, echo, command)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# ---------------------------------------------------------------------------------------------- vae


def wan_vae_pair(config: dict, size: tuple[int, int], latent_frames: int, seed: int = 0, device: str = "cpu"):
    """(ours_decode, reference_decode, info): diffusers' AutoencoderKLWan(**config) (an empty config is its
    default, Wan 2.1's VAE, A14B's) with its random init on the torch `device`, ours converted through
    mlx_video/families/wan/vae_keys.py's DIFFUSERS_VAE, fp32; both decode the same latents of `latent_frames` frames at `size`,
    ours normalised, the reference's de-normalised by latents_mean / latents_std as the pipeline does. Each
    decode returns the video: ours (B, T, H, W, 3), the reference's (B, 3, T, H, W), its device synchronised."""
    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from mlx_video.families.wan.vae_keys import DIFFUSERS_VAE
    from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

    torch.manual_seed(seed)
    with torch.device(device):
        ref = AutoencoderKLWan(**config).eval()
    full = dict(ref.config)
    ours = WanVAE(WanVAEConfig.from_diffusers(full))
    ours.load_weights([DIFFUSERS_VAE.apply(k, torch_to_mx(v, "fp32")) for k, v in ref.state_dict().items()],
                      strict=True)
    mx.eval(ours.parameters())
    stride = ours.config.scale_factor_spatial
    shape = (1, latent_frames, size[1] // stride, size[0] // stride, full["z_dim"])
    z = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    z_ours = mx.array(z)
    mean, std = (torch.tensor(full[k], device=device).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    z_ref = torch.from_numpy(z).permute(0, 4, 1, 2, 3).contiguous().to(device) * std + mean

    def ours_decode():
        video = ours.decode(z_ours)
        mx.eval(video)
        return video

    def ref_decode():
        with torch.inference_mode():
            video = ref.decode(z_ref).sample
        torch_sync(device)
        return video

    info = {"latent_shape": list(shape), "width": size[0], "height": size[1], "dtype": "fp32",
            "reference": f"diffusers {_version('diffusers')} AutoencoderKLWan, torch {torch.__version__}",
            "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    return ours_decode, ref_decode, info


def run_vae(model_id: str = "wan2.2-t2v-a14b", sizes=((64, 64), (128, 128)), frame_counts=(1, 5, 9, 13),
            dtype: str = "fp32", vae_dim: int | None = None, repeats: int = 1, json_path=None, vae_config=None,
            seed: int = 0, echo=click.echo, command: str | None = None) -> dict:
    """Decode time and peak memory per output frame, random weights, at each size x frame count.

    Decodes as the pipeline does: `decode_chunks` one latent frame at a time, each chunk copied out to a uint8
    numpy frame, so MLX holds one chunk (and the causal caches) at a time. The peak is mx.get_peak_memory over
    one decode (weights included); `peak_growth` compares the longest video with the shortest multi-chunk one.
    `vae_dim` narrows the network (base_dim; Wan 2.2's decoder_base_dim scales with it); `vae_config` replaces
    the registry model's VAE config (tests use a tiny one).
    """
    import mlx.core as mx
    import numpy as np

    from mlx_video.families.wan.vae import WanVAE

    spec = get_spec(model_id)
    cfg = vae_config or F.vae_config_for(spec)
    if vae_dim:
        ratio = vae_dim / cfg.base_dim
        cfg = replace(cfg, base_dim=vae_dim,
                      decoder_base_dim=None if cfg.decoder_base_dim is None else int(cfg.decoder_base_dim * ratio))
    for f in frame_counts:
        if (f - 1) % cfg.scale_factor_temporal:
            raise click.BadParameter(f"frame counts must be {cfg.scale_factor_temporal}k+1, got {f}")
    _release()
    mx.random.seed(seed)
    vae = WanVAE(cfg)
    weights = _materialise(vae, dtype)
    s = cfg.scale_factor_spatial

    def decode(z, vae=vae):
        n = 0
        for chunk in vae.decode_chunks(z):
            pixels = mx.round((chunk[0].astype(mx.float32) + 1.0) * 127.5)
            n += np.array(mx.clip(pixels, 0, 255).astype(mx.uint8)).shape[0]
        return n

    rows = []
    for w, h in sizes:
        if w % s or h % s:
            raise click.BadParameter(f"sizes must be multiples of {s}, got {w}x{h}")
        decode(mx.random.normal((1, 1, h // s, w // s, cfg.z_dim)))  # warm-up at this size
        for f in frame_counts:
            t = (f - 1) // cfg.scale_factor_temporal + 1
            z = mx.random.normal((1, t, h // s, w // s, cfg.z_dim), key=mx.random.key(seed + f))
            mx.eval(z)
            _release()
            mx.reset_peak_memory()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out_frames = decode(z)
                times.append(time.perf_counter() - start)
            peak = mx.get_peak_memory()
            med = statistics.median(times)
            rows.append({"width": w, "height": h, "frames": out_frames, "latent_frames": t, "seconds": med,
                         "times_s": times, "seconds_per_frame": med / out_frames, "peak_memory_bytes": peak,
                         "activation_bytes": peak - weights,
                         "activation_bytes_estimated": F.vae_decode_chunk_bytes(cfg, w, h)})
    growth = {}
    for w, h in sizes:
        multi = [r for r in rows if (r["width"], r["height"]) == (w, h) and r["latent_frames"] > 1]
        if len(multi) >= 2:
            growth[f"{w}x{h}"] = multi[-1]["peak_memory_bytes"] / multi[0]["peak_memory_bytes"]
    record = {"harness": "vae", "model": spec.id, "vae_config": cfg.to_dict(), "dtype": dtype, "repeats": repeats,
              "weights_bytes": weights, "results": rows, "peak_growth": growth}
    del vae, decode
    _release()
    echo(f"vae decode: {spec.id}'s VAE (base_dim {cfg.base_dim}, decoder {cfg.decoder_dim}, z {cfg.z_dim}), {dtype}, "
         f"weights {_fmt_bytes(weights)}, {mx.default_device()}")
    _table([(f"{r['width']}x{r['height']}", r["frames"], f"{r['seconds']:.3f}", f"{r['seconds_per_frame']:.3f}",
             _fmt_bytes(r["peak_memory_bytes"]), _fmt_bytes(r["activation_bytes_estimated"])) for r in rows], echo,
           header=("size", "frames", "seconds", "s/frame", "peak memory", "act. estimate"))
    for k, v in growth.items():
        echo(f"{k}: peak at the most frames / peak at the fewest multi-chunk frames = {v:.3f}")
    return _finish(record, json_path, echo, command)


# ---------------------------------------------------------------------------------------------- estimate


def run_estimate(model_id: str = "wan2.2-t2v-a14b", size: tuple[int, int] | None = None, frames: int | None = None,
                 steps: int | None = None, chips=("all",), dtype: str = "bf16", quantize: str | None = None,
                 guidance: bool = True, efficiency: float | None = None, peak_json=None, json_path=None,
                 echo=click.echo, command: str | None = None) -> dict:
    """Predicted minutes per video on Apple chips, from the family's cost model (no measurement on the chip)."""
    spec = get_spec(model_id)
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


def _model_option(f):
    # the step / vs-reference harnesses here build Wan transformers; HunyuanVideo and Mochi have their own
    # scripts (benchmarks/hunyuan.py, benchmarks/mochi.py)
    wan_models = [m for m, spec in MODELS.items() if spec.family == "wan"]
    return click.option("--model", "-m", "model_id", type=click.Choice(wan_models), default="wan2.2-t2v-a14b",
                        show_default=True, help="Registry model.")(f)


def _any_model_option(f):
    # the estimate is arithmetic over a family's cost model: every registered model has one
    return click.option("--model", "-m", "model_id", type=click.Choice(list(MODELS)), default="wan2.2-t2v-a14b",
                        show_default=True, help="Registry model.")(f)


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
@click.option("--layers", type=int, default=2, show_default=True, help="Blocks to build (real width, random weights).")
@_dtype_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--no-guidance", is_flag=True, help="One forward per step instead of the two of CFG.")
@click.option("--peak-probe", type=int, default=2048, show_default=True,
              help="Matmul size measured for the FLOP utilisation (0: skip).")
@_json_option
def step(model_id, size, frames, layers, dtype, repeats, warmup, no_guidance, peak_probe, json_path):
    """Time one denoising step at reduced depth and extrapolate to the full model."""
    run_step(model_id, _parse_size(size), frames, layers, dtype, repeats, warmup, not no_guidance, json_path,
             peak_probe=peak_probe)


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
@click.option("--layers", type=int, default=2, show_default=True)
@_dtype_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads. Default: OPENBLAS_NUM_THREADS, else all cores.")
@click.option("--no-guidance", is_flag=True)
@_json_option
def vs_reference(model_id, size, frames, layers, dtype, repeats, threads, no_guidance, json_path):
    """The same step through diffusers (torch, CPU): time and peak memory ratios."""
    run_vs_reference(model_id, _parse_size(size), frames, layers, dtype, repeats, guidance=not no_guidance,
                     threads=threads, json_path=json_path)


@bench.command()
@_model_option
@click.option("--sizes", default="64x64,128x128", show_default=True, help="Output sizes WxH, comma separated.")
@click.option("--frames", default="1,5,9,13", show_default=True, help="Output frame counts (4k+1), comma separated.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="fp32", show_default=True,
              help="The pipeline decodes in fp32.")
@click.option("--vae-dim", type=int, default=None, help="Narrower VAE: its base_dim (default: the real one).")
@click.option("--repeats", type=int, default=1, show_default=True)
@_json_option
def vae(model_id, sizes, frames, dtype, vae_dim, repeats, json_path):
    """VAE decode time and peak memory per output frame at several sizes and frame counts."""
    run_vae(model_id, _parse_list(sizes, _parse_size), _parse_list(frames), dtype, vae_dim, repeats, json_path)


@bench.command()
@_any_model_option
@click.option("--size", default=None, metavar="WxH", help="Default: the model's first published size.")
@click.option("--frames", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--chip", "chips", multiple=True, default=("all",), show_default=True,
              help=f"One of {', '.join(C.CHIPS)}, or all (repeatable).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="bf16", show_default=True)
@click.option("--quantize", type=click.Choice(list(C.QUANT_BITS)), default=None)
@click.option("--no-guidance", is_flag=True)
@click.option("--efficiency", type=float, default=None,
              help=f"Fraction of peak reached (default {C.DEFAULT_EFFICIENCY}, an assumption).")
@click.option("--peak-json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A `bench peak` record from the target machine: its matmul TFLOP/s replaces the published peak.")
@_json_option
def estimate(model_id, size, frames, steps, chips, dtype, quantize, no_guidance, efficiency, peak_json, json_path):
    """Predicted minutes per video on Apple chips (published peak figures, FLOP model)."""
    for c in chips:
        if c != "all" and c.lower() not in C.CHIPS:
            raise click.BadParameter(f"unknown chip {c!r}; known: {', '.join(C.CHIPS)}, all")
    run_estimate(model_id, _parse_size(size) if size else None, frames, steps, chips, dtype, quantize,
                 not no_guidance, efficiency, peak_json, json_path)


def main(argv=None) -> None:
    bench.main(args=argv, prog_name="mlxvid bench")


if __name__ == "__main__":
    main()
