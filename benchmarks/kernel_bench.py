"""Each custom kernel operation of mlx_video.kernels against the unfused MLX composition it replaces.

    python benchmarks/kernel_bench.py [--tokens 4096] [--dim 5120] [--heads 40] [--repeat 5] [--json out.json]

For every operation it times two things on the current default device:

* "dispatch": `mlx_video.kernels.<op>` -- whatever path the dispatch layer picks here (`path` column: metal,
  cuda, or portable when neither is available or MLXVID_KERNELS=portable);
* "unfused": the plain MLX composition the kernel replaces (what the Wan transformer wrote before the kernels,
  and what the portable path still runs).

Before timing, `kernels.warm_up` runs every dispatch call once so that each kernel variant is probed (outside
warm-up the dispatch layer never probes and takes the portable path); the verdicts are printed. RoPE dispatches
with per-axis `kernels.rope_tables` (what the kernels read), the unfused row with `rope_tables_3d`'s (L, D/2)
tables. On a machine without Metal or CUDA both rows run the same MLX code; the output says so. "bytes" is the minimum
traffic of a fused kernel -- every input read once, every output written once -- and GB/s is that over the
measured time: an effective rate for comparison, not a measured memory bandwidth. The unfused composition moves
more (its intermediates), which is not counted.

Shapes follow Wan 2.2 A14B (dim 5120, 40 heads of 128, RoPE split 44/42/42) at a token count small enough for a
CPU: a (1, 1, tokens, dim) float32 residual stream with per-group modulation rows, bf16 q/k, a 5120x5120 fp8
weight with one scale per output channel.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_video import kernels
from mlx_video.convert import fp8 as convert_fp8
from mlx_video.nn.norms import layer_norm_fp32
from mlx_video.nn.rope import apply_rope_interleaved, rope_tables_3d


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` evaluated calls, after one warm-up call."""
    mx.eval(fn())
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def grid_for(tokens: int) -> tuple[int, int, int]:
    """A (t, h, w) latent grid with exactly `tokens` tokens, as square as possible in h and w."""
    t = 1
    while tokens % (t * 2) == 0 and t < 8:
        t *= 2
    rest = tokens // t
    h = int(math.isqrt(rest))
    while rest % h:
        h -= 1
    return t, h, rest // h


def cases(tokens: int, dim: int, heads: int):
    rng = np.random.default_rng(0)
    head_dim = dim // heads
    x = mx.array((3 + 2 * rng.standard_normal((1, 1, tokens, dim))).astype(np.float32))
    shift, scale, gate = (mx.array(0.3 * rng.standard_normal((1, 1, 1, dim)).astype(np.float32)) for _ in range(3))
    y = mx.array(rng.standard_normal((1, 1, tokens, dim)).astype(np.float32)).astype(mx.bfloat16)
    q = mx.array(rng.standard_normal((1, tokens, heads, head_dim)).astype(np.float32)).astype(mx.bfloat16)
    k = mx.array(rng.standard_normal((1, tokens, heads, head_dim)).astype(np.float32)).astype(mx.bfloat16)
    rope = rope_tables_3d(grid_for(tokens), head_dim)
    per_axis = kernels.rope_tables(grid_for(tokens), head_dim)
    codes = mx.array(rng.integers(0, 256, (dim, dim), dtype=np.uint8))
    scales = mx.array(rng.uniform(0.5, 2, dim).astype(np.float32))
    mx.eval(x, shift, scale, gate, y, q, k, *rope, per_axis.cos, per_axis.sin, codes, scales)
    n, f32, bf16 = tokens * dim, 4, 2
    return [
        dict(
            op="adaln_modulate", shape=f"x {tuple(x.shape)} f32",
            dispatch=lambda: kernels.adaln_modulate(x, shift, scale, 1e-6),
            unfused=lambda: layer_norm_fp32(x, eps=1e-6) * (1 + scale) + shift,
            bytes=n * f32 + 2 * dim * f32 + n * f32,
        ),
        dict(
            op="gated_residual", shape=f"x {tuple(x.shape)} f32, y bf16",
            dispatch=lambda: kernels.gated_residual(x, gate, y),
            unfused=lambda: x + y * gate,
            bytes=n * f32 + n * bf16 + dim * f32 + n * f32,
        ),
        dict(
            op="apply_rope_qk", shape=f"q, k {tuple(q.shape)} bf16",
            dispatch=lambda: kernels.apply_rope_qk(q, k, per_axis),
            unfused=lambda: (apply_rope_interleaved(q, *rope), apply_rope_interleaved(k, *rope)),
            bytes=4 * n * bf16 + 2 * tokens * (head_dim // 2) * f32,
        ),
        dict(
            op="dequantize_fp8", shape=f"codes {tuple(codes.shape)} e4m3fn -> bf16",
            dispatch=lambda: kernels.dequantize_fp8(codes, "e4m3fn", scales, mx.bfloat16),
            unfused=lambda: (mx.take(convert_fp8._mx_table("e4m3fn"), codes) * scales[:, None]).astype(mx.bfloat16),
            bytes=dim * dim + dim * f32 + dim * dim * bf16,
        ),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    path = kernels.active_backend()
    device = str(mx.default_device())
    gpu_note = {
        "metal": "Metal kernels (mx.fast.metal_kernel)",
        "cuda": "CUDA kernels (mx.fast.cuda_kernel)",
        "portable": "portable MLX path: no custom kernel ran; 'dispatch' and 'unfused' run the same MLX ops",
    }[path]
    header = dict(
        device=device, path=path, note=gpu_note, machine=f"{platform.system()} {platform.machine()}",
        mlx=mx.__version__, metal_available=bool(mx.metal.is_available()),
        cuda_available=bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
    )
    print(f"device: {device}   path: {path} ({gpu_note})")
    print(f"machine: {header['machine']}, MLX {mx.__version__}, median of {args.repeat} after a warm-up\n")
    case_list = cases(args.tokens, args.dim, args.heads)
    status = kernels.warm_up(lambda: [case["dispatch"]() for case in case_list])
    for key, ok in status.items():
        print(f"kernel {', '.join(map(str, key))}: {'used' if ok else 'DISABLED (portable path)'}")
    rows = []
    print(f"{'op':<16} {'shape':<40} {'bytes':>10} {'dispatch ms':>12} {'GB/s':>7} {'unfused ms':>11} {'GB/s':>7}")
    for case in case_list:
        t_dispatch = timed(case["dispatch"], args.repeat)
        t_unfused = timed(case["unfused"], args.repeat)
        row = dict(
            op=case["op"], shape=case["shape"], bytes=case["bytes"], path=path, device=device,
            dispatch_ms=1e3 * t_dispatch, unfused_ms=1e3 * t_unfused,
            dispatch_gbps=case["bytes"] / t_dispatch / 1e9, unfused_gbps=case["bytes"] / t_unfused / 1e9,
        )
        rows.append(row)
        print(
            f"{row['op']:<16} {row['shape']:<40} {row['bytes'] / 1e6:>8.1f}MB {row['dispatch_ms']:>12.2f} "
            f"{row['dispatch_gbps']:>7.2f} {row['unfused_ms']:>11.2f} {row['unfused_gbps']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            kernel_status = [dict(variant=list(map(str, key)), used=ok) for key, ok in status.items()]
            json.dump(dict(header, repeat=args.repeat, kernel_status=kernel_status, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
