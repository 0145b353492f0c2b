"""Kernel sources of mlx_video (installed as the package `mlx_video.kernel_sources`).

Not Python: `common/*.h` (shared per-element math), `metal/*.metal` and `cuda/*.cu` (kernel bodies), read
as text by `mlx_video.kernels` and compiled at run time by MLX. `tests/` holds the host conformance tests
that the top-level CMakeLists.txt builds; they are not installed.
"""
