"""Which BLAS MLX's CPU back-end runs on, and how fast: a float32 matrix product and one attention call.

    python benchmarks/blas_check.py [--size 2048] [--tokens 8190] [--repeat 3]

On Linux, MLX's CPU wheel (`mlx[cpu]`) brings its own `libblas` (the one its build linked, copied into
`mlx_cpu.libs/`); this prints the shared libraries with "blas" in their name that the process has loaded
(/proc/self/maps), the matrix product's GFLOP/s, and the time of `mlx_video.nn.attention.attention` over
`--tokens` tokens (one head of 128, float32). Run it again with an optimised BLAS preloaded to compare, e.g.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/blas_check.py

(Debian's `libopenblas0-pthread`). On a Mac MLX uses Accelerate and, on the GPU, its own kernels: nothing to do.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx

from mlx_video.nn.attention import attention


def loaded_blas() -> list[str]:
    """File names of the loaded shared libraries whose name has "blas" in it (Linux; empty elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    names = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line.rsplit("/", 1)[-1]}
    return sorted(Path(n).name for n in names)


def best_seconds(fn, repeat: int) -> float:
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="square matrix product of this size")
    p.add_argument("--tokens", type=int, default=8190, help="tokens of the attention call")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    x, y = mx.random.normal((a.size, a.size)), mx.random.normal((a.size, a.size))
    q, k, v = (mx.random.normal((1, a.tokens, 1, 128), key=mx.random.key(i)) for i in range(3))
    mx.eval(x, y, q, k, v)
    matmul = best_seconds(lambda: x @ y, a.repeat)
    attend = best_seconds(lambda: attention(q, k, v), a.repeat)
    print(f"mlx {mx.__version__}, {mx.default_device()}, {platform.machine()} {platform.system()}")
    print(f"BLAS libraries loaded: {', '.join(loaded_blas()) or 'none found'}")
    print(f"float32 matmul {a.size}^3: {matmul * 1000:.1f} ms, {2 * a.size**3 / matmul / 1e9:.1f} GFLOP/s (best of "
          f"{a.repeat})")
    print(f"attention, {a.tokens} tokens, 1 head of 128: {attend:.2f} s, "
          f"{4 * a.tokens**2 * 128 / attend / 1e9:.1f} GFLOP/s (best of {a.repeat})")


if __name__ == "__main__":
    main()
