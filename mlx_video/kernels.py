"""Custom kernels for the operations MLX has no fused primitive for, and the one place that picks a path.

The models call one function per operation and never know which path runs:

    dequantize_fp8(codes, fmt, scale=1.0, dtype=mx.bfloat16)   fp8 bytes (e4m3fn / e5m2) * scale, one pass
    apply_rope(x, rope) / apply_rope_qk(q, k, rope)              interleaved-pair rotary embedding from tables
    adaln_modulate(x, shift, scale, eps)                         LayerNorm (no affine) * (1 + scale) + shift
    gated_residual(x, gate, y)                                   x + y * gate
    block_sparse_attention(q, k, v, tile_ptr, tile_idx, tile, scale, key_mask)
                                                                 attention over the kept key tiles only
                                                                 (radial attention; None: use the portable path)

Paths, chosen per call by `active_backend()`:

* "metal": `mx.fast.metal_kernel` on Apple GPUs (`mx.metal.is_available()`);
* "cuda": `mx.fast.cuda_kernel` on MLX's CUDA back-end (`mx.cuda.is_available()`);
* "portable": the plain MLX composition (LayerNorm then modulation, `x + y * gate`, `apply_rope_interleaved`,
  the fp8 table lookup), and what runs everywhere else (the CPU back-end, or when the default device is the CPU).

`MLXVID_KERNELS=portable` forces the portable path; `auto` (the default) takes a GPU path where one exists.
The variable is read once and cached; `refresh()` reads it (and the GPU availability) again. The default
device is looked at on every call. A GPU kernel also needs arguments it supports (contiguous shapes of the
documented kinds, floating dtypes, fewer than 2**31 elements); otherwise that call takes the portable path.

Warm-up: each kernel variant (kernel, dtypes, template constants) is checked once, on a small probe compared
with the portable path, before it is used. The check evaluates arrays and reads them on the host, which a
traced function (`mx.compile`) cannot do, so it only runs inside `warm_up(run)` (or a `with probing():`
block): call `warm_up(lambda: model(*minimal_inputs))` once after loading a model, with a plain (not compiled)
forward. A variant that fails to compile or disagrees is reported with a warning and stays on the portable path
for the rest of the process. Outside warm-up nothing is probed: a variant with no verdict yet takes the
portable path, so a model that was never warmed up runs the portable path everywhere, and any forward can be
traced by `mx.compile`. `kernel_status()` lists the verdicts.

Kernel sources live in `kernels/` at the top of the repository, installed as the package
`mlx_video.kernel_sources`: the per-element math in `common/*.h` (plain C-like functions over a small shim of
macros, `common/mlxvid_shim.h`), and thin bodies in `metal/*.metal` and `cuda/*.cu`. MLX takes a kernel as a
body string plus a header string; both are read from those files at run time (`kernel_source`). The same
files are compiled and run on the host by the CMake conformance tests (see CMakeLists.txt).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError
from mlx_video.nn.norms import layer_norm_fp32
from mlx_video.nn.rope import apply_rope_interleaved, default_axis_dims

BACKENDS = ("metal", "cuda", "portable")
ENV_VAR = "MLXVID_KERNELS"
_MODES = ("auto", "portable")
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_MAX_ELEMENTS = 2**31 - 1  # the kernels index with 32-bit unsigned integers
_ELEMENTWISE_GROUP = 256


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------

# The shared headers, in include order; every kernel gets all of them (they are small).
SHARED_HEADERS = ("common/mlxvid_shim.h", "common/fp8.h", "common/rope.h", "common/adaln.h",
                  "common/sparse_attention.h")
_BACKEND_DEFINES = {"metal": "MLXVID_BACKEND_METAL", "cuda": "MLXVID_BACKEND_CUDA"}
_BODY_SUFFIX = {"metal": ".metal", "cuda": ".cu"}


@dataclass(frozen=True)
class KernelSpec:
    name: str  # MLX kernel name, also the body file's stem without the "mlxvid_" prefix
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def stem(self) -> str:
        return self.name.removeprefix("mlxvid_")


KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("mlxvid_fp8_dequant", ("codes", "scale", "params"), ("out",)),
        KernelSpec("mlxvid_rope", ("x", "cos_table", "sin_table", "params"), ("out",)),
        KernelSpec("mlxvid_rope_qk", ("q", "k", "cos_table", "sin_table", "params"), ("q_out", "k_out")),
        KernelSpec("mlxvid_adaln_modulate", ("x", "shift", "scale", "params", "eps"), ("out",)),
        KernelSpec("mlxvid_gated_residual", ("x", "gate", "y", "params"), ("out",)),
        KernelSpec("mlxvid_block_sparse_attention",
                   ("q", "k", "v", "key_bias", "tile_ptr", "tile_idx", "params", "scale"), ("out",)),
    )
}


def source_dir() -> Path:
    """The kernel source folder: the installed `mlx_video.kernel_sources` package, else `kernels/` of a checkout."""
    try:
        spec = importlib.util.find_spec("mlx_video.kernel_sources")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / SHARED_HEADERS[0]).is_file():
                return Path(location)
    checkout = Path(__file__).resolve().parents[1] / "kernels"
    if (checkout / SHARED_HEADERS[0]).is_file():
        return checkout
    raise MlxVideoError(
        "the kernel sources (mlx_video.kernel_sources) are missing from this installation; "
        f"set {ENV_VAR}=portable to run without custom kernels"
    )


@functools.lru_cache(maxsize=None)
def _read(relative: str) -> str:
    return (source_dir() / relative).read_text(encoding="utf-8")


def kernel_header(backend: str) -> str:
    """The header string handed to MLX: the backend define, then the shim and the shared headers."""
    if backend not in _BACKEND_DEFINES:
        raise ValueError(f"no kernel sources for backend {backend!r}")
    parts = [f"#define {_BACKEND_DEFINES[backend]} 1\n"]
    for relative in SHARED_HEADERS:
        text = _read(relative)
        if '#include "' in text:  # MLX's JIT compilers have no include path for our files
            raise MlxVideoError(f"kernel header {relative} must not #include project files")
        parts.append(f"// ---- {relative} ----\n{text}")
    return "\n".join(parts)


def kernel_source(name: str, backend: str) -> tuple[str, str]:
    """(header, body) strings of kernel `name` for `backend` ("metal" or "cuda"), read from the source files."""
    spec = KERNELS[name]
    body = _read(f"{backend}/{spec.stem}{_BODY_SUFFIX[backend]}")
    return kernel_header(backend), body


@functools.lru_cache(maxsize=None)
def _kernel(name: str, backend: str):
    spec = KERNELS[name]
    header, body = kernel_source(name, backend)
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=name, input_names=list(spec.input_names), output_names=list(spec.output_names),
            source=body, header=header,
        )
    return mx.fast.cuda_kernel(
        name=name, input_names=list(spec.input_names), output_names=list(spec.output_names),
        source=body, header=header,
    )


# --------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------


_GPU: list[str | None] = []  # the cached GPU back-end, empty until first looked up


def _gpu_backend() -> str | None:
    if not _GPU:
        _GPU.append(_detect_gpu_backend())
    return _GPU[0]


def _detect_gpu_backend() -> str | None:
    try:
        if mx.metal.is_available():
            return "metal"
    except AttributeError:
        pass
    cuda = getattr(mx, "cuda", None)
    try:
        if cuda is not None and cuda.is_available():
            return "cuda"
    except AttributeError:
        pass
    return None


_MODE: list[str] = []  # the cached value of MLXVID_KERNELS, empty until first read


def kernel_mode() -> str:
    """The value of MLXVID_KERNELS: "auto" (default) or "portable"; read once, then cached until `refresh()`."""
    if not _MODE:
        mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if mode not in _MODES:
            raise MlxVideoError(f"{ENV_VAR}={mode!r} is not one of {', '.join(_MODES)}")
        _MODE.append(mode)
    return _MODE[0]


def refresh() -> str:
    """Read MLXVID_KERNELS and the GPU availability again (they are cached); the backend a call takes now.

    The kernel verdicts of `kernel_status()` are kept: they depend on the kernels, not on the settings.
    """
    _MODE.clear()
    _GPU.clear()
    return active_backend()


def active_backend() -> str:
    """The path a call made now would take: "metal", "cuda" or "portable"."""
    if kernel_mode() == "portable":
        return "portable"
    backend = _gpu_backend()
    if backend is None or mx.default_device().type != mx.DeviceType.gpu:
        return "portable"
    return backend


# Verdict of the warm-up probe of each kernel variant: key -> True (kernel used) / False (portable).
_PROBES: dict[tuple, bool] = {}
_PROBING: list[bool] = [False]  # True inside `probing()`: unknown variants are probed instead of skipped


def kernel_status() -> dict[tuple, bool]:
    """The kernel variants probed so far in this process, and whether each passed (and is used)."""
    return dict(_PROBES)


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """Within this block, a kernel variant seen for the first time is probed (see `warm_up`).

    Probing evaluates arrays: do not enter it around a function being traced by `mx.compile`.
    """
    previous = _PROBING[0]
    _PROBING[0] = True
    try:
        yield
    finally:
        _PROBING[0] = previous


def warm_up(run: Callable[[], object]) -> dict[tuple, bool]:
    """Probe the kernel variants that `run()` uses, evaluate its outputs, and return `kernel_status()`.

    `run` is typically one forward of a model on a minimal input (one latent frame, a few tokens), not compiled.
    Variants are keyed by kernel, dtypes and template constants (adaLN: the row width), not by token counts, so
    the minimal input covers the real run as long as it uses the same dtypes and model width. Afterwards every
    call of those variants takes its kernel (if the probe passed) without any further check, also inside
    `mx.compile`. On the portable backend there is nothing to probe: `run` is not called and the status is
    returned at once.
    """
    if active_backend() == "portable":
        return kernel_status()
    with probing():
        mx.eval(run())
    return kernel_status()


def _probe_passed(key: tuple, make_probe, exact: bool) -> bool:
    """The verdict for a kernel variant: probed now (inside `probing()`) if unknown, else remembered.

    Outside `probing()` an unknown variant is not probed and gets False (the portable path) without being
    remembered, so that a later warm-up still probes it. `make_probe()` returns (run_kernel, run_portable),
    each giving a list of arrays; it is only called when the variant is probed.
    """
    verdict = _PROBES.get(key)
    if verdict is not None:
        return verdict
    if not _PROBING[0]:
        return False
    try:
        run_kernel, run_portable = make_probe()
        got = run_kernel()
        want = run_portable()
        mx.eval(got, want)
        got = [np.asarray(a.astype(mx.float32)) for a in got]
        want = [np.asarray(a.astype(mx.float32)) for a in want]
        if exact:
            ok = all(np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want))
        else:
            ok = all(np.allclose(g, w, rtol=1e-2, atol=1e-3) for g, w in zip(got, want))
        problem = None if ok else "its output differs from the portable path"
    except Exception as error:  # a compile error in the JIT, most likely
        ok, problem = False, f"{type(error).__name__}: {error}"
    if not ok:
        variant = ", ".join(str(k) for k in key[1:-1])
        warnings.warn(
            f"custom kernel {key[0]} ({variant}) on {key[-1]} is disabled ({problem}); using the portable path",
            stacklevel=3,
        )
    _PROBES[key] = ok
    return ok


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _params(*values: int) -> mx.array:
    return mx.array(np.asarray(values, dtype=np.int32))


def _row_broadcast(mod_shape: Sequence[int], x_shape: Sequence[int]) -> tuple[int, int] | None:
    """(rows, rep) when an array of `mod_shape` broadcasts onto `x_shape` as (rows, dim) rows, each applying
    to `rep` consecutive rows of x seen as (-1, dim), e.g. (B, G, 1, dim) onto (B, G, N, dim); else None."""
    if len(mod_shape) == 0 or len(mod_shape) > len(x_shape) or mod_shape[-1] != x_shape[-1]:
        return None
    mod = (1,) * (len(x_shape) - len(mod_shape)) + tuple(mod_shape)
    lead, mod_lead = tuple(x_shape[:-1]), mod[:-1]
    k = 0
    while k < len(lead) and mod_lead[k] == lead[k]:
        k += 1
    if any(m != 1 for m in mod_lead[k:]):
        return None
    rows, rep = math.prod(lead[:k]), math.prod(lead[k:])
    if rows == 0 or rep == 0:
        return None
    return rows, rep


def _promote(*dtypes: mx.Dtype) -> mx.Dtype:
    out = mx.zeros((0,), dtype=dtypes[0])
    for d in dtypes[1:]:
        out = out + mx.zeros((0,), dtype=d)
    return out.dtype


# --------------------------------------------------------------------------------------------------------
# fp8 dequantization
# --------------------------------------------------------------------------------------------------------

_FP8_FORMATS = {"e4m3fn": 0, "e5m2": 1}


def _fp8_portable(codes, fmt, scale, dtype):
    from mlx_video.convert import fp8

    return fp8.dequantize_fp8(codes, fmt, scale, dtype)


def _fp8_scale_layout(scale, codes_shape: tuple[int, ...]) -> mx.array | None:
    """The scale as a flat float32 array of 1 (per tensor) or codes_shape[0] (per output channel) entries, read
    the way mlx_video.convert.fp8 reads it: a 1-D scale of codes_shape[0] entries is per output channel (the
    layout fp8 checkpoints and Fp8Linear use), as is one shaped (rows, 1, ..., 1); None for other layouts."""
    s = scale.astype(mx.float32) if isinstance(scale, mx.array) else mx.array(np.asarray(scale, dtype=np.float32))
    if s.size == 1:
        return s.reshape(1)
    if s.ndim == 1 and len(codes_shape) >= 1 and s.shape[0] == codes_shape[0]:
        return s
    if len(codes_shape) >= 1 and s.size == codes_shape[0]:
        padded = (1,) * (len(codes_shape) - s.ndim) + tuple(s.shape)
        if s.ndim <= len(codes_shape) and padded[0] == codes_shape[0] and all(d == 1 for d in padded[1:]):
            return s.reshape(-1)
    return None


def _launch_fp8(backend, codes, scale_flat, fmt, dtype, **kw):
    n = codes.size
    cols = n if scale_flat.size == 1 else n // codes.shape[0]
    return _kernel("mlxvid_fp8_dequant", backend)(
        inputs=[codes.reshape(-1), scale_flat, _params(n, cols)],
        template=[("OutT", dtype), ("FORMAT", _FP8_FORMATS[fmt])],
        grid=(n, 1, 1), threadgroup=(_ELEMENTWISE_GROUP, 1, 1),
        output_shapes=[codes.shape], output_dtypes=[dtype], **kw,
    )[0]


def _fp8_probe(backend, fmt, dtype):
    codes = mx.array(np.arange(512, dtype=np.uint16).astype(np.uint8).reshape(2, 256))  # every code, twice
    scale = mx.array([0.75, -1.5], dtype=mx.float32)
    return (
        lambda: [_launch_fp8(backend, codes, scale, fmt, dtype)],
        lambda: [_fp8_portable(codes, fmt, scale, dtype)],
    )


def dequantize_fp8(codes: mx.array, fmt: str, scale=1.0, dtype: mx.Dtype = mx.bfloat16) -> mx.array:
    """Raw fp8 codes (uint8, any shape) of format `fmt` ("e4m3fn" or "e5m2") times `scale`, as `dtype`.

    `scale`: a number or one-element array (per tensor), or one entry per output channel (dim 0). Computed as
    decode(code) * scale in float32, then rounded to `dtype` -- bit-exact with mlx_video.convert.fp8.
    """
    from mlx_video.convert import fp8

    fp8.fp8_table(fmt)  # validates fmt
    backend = active_backend()
    if backend != "portable" and isinstance(codes, mx.array) and dtype in _FLOAT_DTYPES:
        if codes.dtype == mx.int8:
            codes = codes.view(mx.uint8)
        scale_flat = _fp8_scale_layout(scale, tuple(codes.shape)) if codes.dtype == mx.uint8 else None
        if scale_flat is not None and 0 < codes.size <= _MAX_ELEMENTS:
            key = ("mlxvid_fp8_dequant", fmt, _dtype_name(dtype), backend)
            if _probe_passed(key, lambda: _fp8_probe(backend, fmt, dtype), exact=True):
                return _launch_fp8(backend, codes, scale_flat, fmt, dtype)
    return _fp8_portable(codes, fmt, scale, dtype)


# --------------------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RopeTables:
    """Per-axis cos/sin tables of a rotary embedding over a row-major token grid of up to three axes.

    `cos` and `sin` are flat float32 arrays holding, one after the other, a (grid[a], axis_pairs[a]) table
    per axis (see kernels/common/rope.h); the kernels read these. Pair j of a head belongs to the axis whose
    range of `axis_pairs` contains it. `full()` expands them to the (L, D/2) tables that `rope_tables_3d`
    builds, which the portable path uses; build them with `rope_tables(grid, head_dim)`.
    """

    cos: mx.array
    sin: mx.array
    grid: tuple[int, ...]
    axis_pairs: tuple[int, ...]
    _host: tuple = field(default=(), repr=False)  # (cos, sin) as float32 numpy, the same flat layout
    _full: list = field(default_factory=list, repr=False, init=False)

    def __post_init__(self):
        if not self._host:  # built by hand from MLX arrays: copy them to the host now, not inside a forward
            object.__setattr__(self, "_host", (np.asarray(self.cos, np.float32), np.asarray(self.sin, np.float32)))

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def pairs(self) -> int:
        return sum(self.axis_pairs)

    def full(self) -> tuple[mx.array, mx.array]:
        """(cos, sin), each (L, D/2) float32, tokens in grid order: the same values as the per-axis tables.

        Expanded on the host from the numpy copy and handed to MLX as constants, once: no device work and no
        sync, so the first call may happen inside `mx.compile` and the result is cached safely.
        """
        if not self._full:
            self._full.extend(mx.array(_expand_axis_tables(flat, self.grid, self.axis_pairs)) for flat in self._host)
        return self._full[0], self._full[1]


def _expand_axis_tables(flat: np.ndarray, grid: tuple[int, ...], axis_pairs: tuple[int, ...]) -> np.ndarray:
    """The (prod(grid), sum(axis_pairs)) table whose row of token (i0, i1, ...) is axis 0's row i0, then axis
    1's row i1, ..., read from the flat per-axis layout."""
    parts, offset = [], 0
    for axis, (size, pairs) in enumerate(zip(grid, axis_pairs)):
        table = flat[offset : offset + size * pairs].reshape(size, pairs)
        offset += size * pairs
        view = [1] * len(grid) + [pairs]
        view[axis] = size
        parts.append(np.broadcast_to(table.reshape(view), (*grid, pairs)))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(math.prod(grid), sum(axis_pairs)))


def rope_tables(
    grid: Sequence[int], head_dim: int, theta: float = 10000.0, axis_dims: Sequence[int] | None = None
) -> RopeTables:
    """Per-axis RoPE tables for a token grid (up to three axes), angles position / theta^(2i/d_axis).

    `axis_dims` are the real channels per axis (even, summing to head_dim); by default Wan's split
    (44/42/42 for head_dim 128 over (t, h, w)); HunyuanVideo uses (16, 56, 56). The angles are computed in
    float64 on the host and stored as float32, exactly like `mlx_video.nn.rope.rope_tables_3d`, whose
    (L, D/2) tables `RopeTables.full()` reproduces bit for bit. Call it outside traced functions (it builds
    the tables with numpy); the result can then be used inside them.
    """
    grid = tuple(int(g) for g in grid)
    if axis_dims is None:
        axis_dims = default_axis_dims(head_dim) if len(grid) == 3 else None
    if axis_dims is None or len(axis_dims) != len(grid) or not 1 <= len(grid) <= 3:
        raise ValueError(f"grid {grid} needs 1 to 3 axes and one axis dim per axis, got {axis_dims}")
    if sum(axis_dims) != head_dim or any(d % 2 for d in axis_dims):
        raise ValueError(f"axis dims {tuple(axis_dims)} must be even and sum to head_dim {head_dim}")
    cos_parts, sin_parts = [], []
    for size, dims in zip(grid, axis_dims):
        inv_freq = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        angles = np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos_parts.append(np.cos(angles).astype(np.float32).reshape(-1))
        sin_parts.append(np.sin(angles).astype(np.float32).reshape(-1))
    cos, sin = np.concatenate(cos_parts), np.concatenate(sin_parts)
    return RopeTables(
        cos=mx.array(cos), sin=mx.array(sin), grid=grid, axis_pairs=tuple(d // 2 for d in axis_dims),
        _host=(cos, sin),
    )


def _rope_layout(rope, x_shape) -> tuple[mx.array, mx.array, tuple[int, ...]] | None:
    """(cos, sin, (s0, s1, s2, p0, p1, p2)) for the kernel, or None when the tables do not fit x."""
    if len(x_shape) != 4 or x_shape[-1] % 2:
        return None
    _, tokens, _, head_dim = x_shape
    pairs = head_dim // 2
    if isinstance(rope, RopeTables):
        if rope.tokens != tokens or rope.pairs != pairs:
            return None
        sizes = list(rope.grid) + [1] * (3 - len(rope.grid))
        axis_pairs = list(rope.axis_pairs) + [0] * (3 - len(rope.axis_pairs))
        cos, sin = rope.cos, rope.sin
    else:
        cos, sin = rope
        if tuple(cos.shape) != (tokens, pairs) or tuple(sin.shape) != (tokens, pairs):
            return None
        sizes, axis_pairs = [tokens, 1, 1], [pairs, 0, 0]
    if cos.dtype != mx.float32 or sin.dtype != mx.float32:
        return None
    return cos.reshape(-1), sin.reshape(-1), (*sizes, *axis_pairs)


def _rope_params(x_shape, axes) -> mx.array:
    batch, tokens, heads, head_dim = x_shape
    return _params(batch * tokens * heads * (head_dim // 2), tokens, heads, head_dim // 2, *axes)


def _launch_rope(backend, x, cos, sin, axes, **kw):
    n_pairs = x.size // 2
    return _kernel("mlxvid_rope", backend)(
        inputs=[x, cos, sin, _rope_params(x.shape, axes)],
        template=[("OutT", x.dtype)],
        grid=(n_pairs, 1, 1), threadgroup=(_ELEMENTWISE_GROUP, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype], **kw,
    )[0]


def _launch_rope_qk(backend, q, k, cos, sin, axes, **kw):
    n_pairs = q.size // 2
    return _kernel("mlxvid_rope_qk", backend)(
        inputs=[q, k, cos, sin, _rope_params(q.shape, axes)],
        template=[("OutT", q.dtype)],
        grid=(n_pairs, 2, 1), threadgroup=(_ELEMENTWISE_GROUP, 1, 1),
        output_shapes=[q.shape, k.shape], output_dtypes=[q.dtype, k.dtype], **kw,
    )


def _full_tables(rope) -> tuple[mx.array, mx.array]:
    return rope.full() if isinstance(rope, RopeTables) else (rope[0], rope[1])


def _rope_probe(backend, dtype, qk: bool) -> bool:
    name = "mlxvid_rope_qk" if qk else "mlxvid_rope"
    return _probe_passed((name, _dtype_name(dtype), backend), lambda: _rope_probe_runs(backend, dtype, qk), False)


def _rope_probe_runs(backend, dtype, qk: bool):
    rope = rope_tables((2, 3, 2), 12, axis_dims=(4, 4, 4))
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((2, 12, 2, 12)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((2, 12, 2, 12)).astype(np.float32)).astype(dtype)
    cos, sin, axes = _rope_layout(rope, q.shape)
    full = rope.full()
    if qk:
        run_kernel = lambda: list(_launch_rope_qk(backend, q, k, cos, sin, axes))  # noqa: E731
        run_portable = lambda: [apply_rope_interleaved(q, *full), apply_rope_interleaved(k, *full)]  # noqa: E731
    else:
        run_kernel = lambda: [_launch_rope(backend, q, cos, sin, axes)]  # noqa: E731
        run_portable = lambda: [apply_rope_interleaved(q, *full)]  # noqa: E731
    return run_kernel, run_portable


def _rope_kernel_args(backend, x, rope):
    if backend == "portable" or x.dtype not in _FLOAT_DTYPES or not 0 < x.size <= _MAX_ELEMENTS:
        return None
    return _rope_layout(rope, tuple(x.shape))


def apply_rope(x: mx.array, rope) -> mx.array:
    """Rotate interleaved channel pairs of x (B, L, heads, D); float32 math, result in x's dtype.

    `rope`: a `RopeTables` (per-axis tables) or a (cos, sin) pair of (L, D/2) float32 tables as built by
    `mlx_video.nn.rope.rope_tables_3d`. The portable path is `apply_rope_interleaved` on the full tables.
    """
    backend = active_backend()
    args = _rope_kernel_args(backend, x, rope)
    if args is not None and _rope_probe(backend, x.dtype, qk=False):
        return _launch_rope(backend, x, *args)
    return apply_rope_interleaved(x, *_full_tables(rope))


def apply_rope_qk(q: mx.array, k: mx.array, rope) -> tuple[mx.array, mx.array]:
    """`apply_rope` of q and of k; one kernel launch for both when they have the same shape and dtype."""
    backend = active_backend()
    if q.shape == k.shape and q.dtype == k.dtype:
        args = _rope_kernel_args(backend, q, rope)
        if args is not None and _rope_probe(backend, q.dtype, qk=True):
            q_out, k_out = _launch_rope_qk(backend, q, k, *args)
            return q_out, k_out
    return apply_rope(q, rope), apply_rope(k, rope)


# --------------------------------------------------------------------------------------------------------
# adaLN modulation and the gated residual
# --------------------------------------------------------------------------------------------------------

_EPS_ARRAYS: dict[float, mx.array] = {}


def _eps_array(eps: float) -> mx.array:
    arr = _EPS_ARRAYS.get(eps)
    if arr is None:
        arr = _EPS_ARRAYS[eps] = mx.array([eps], dtype=mx.float32)
    return arr


def _adaln_group(dim: int) -> int:
    """Threads per row: a power of two from 32 to 256, about a quarter of the row length."""
    return max(32, min(256, 1 << max(0, (dim // 4) - 1).bit_length()))


def _adaln_portable(x, shift, scale, eps):
    return layer_norm_fp32(x, eps=eps) * (1 + scale) + shift


def _launch_adaln(backend, x, shift, scale, eps, rows_rep, **kw):
    _, rep = rows_rep
    dim = x.shape[-1]
    rows = x.size // dim
    group = _adaln_group(dim)
    return _kernel("mlxvid_adaln_modulate", backend)(
        inputs=[x, shift, scale, _params(dim, rep), _eps_array(float(eps))],
        template=[("OutT", mx.float32), ("TG", group)],
        grid=(rows * group, 1, 1), threadgroup=(group, 1, 1),
        output_shapes=[x.shape], output_dtypes=[mx.float32], **kw,
    )[0]


def adaln_modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float = 1e-6) -> mx.array:
    """LayerNorm of x over the last axis without affine, then `* (1 + scale) + shift`; float32 result.

    shift and scale broadcast onto x; the fused kernel takes those that repeat whole rows, e.g. (B, G, 1, dim)
    onto (B, G, N, dim). The portable path is `layer_norm_fp32(x, eps=eps) * (1 + scale) + shift`.
    """
    backend = active_backend()
    if (
        backend != "portable"
        and all(a.dtype in _FLOAT_DTYPES for a in (x, shift, scale))
        and 0 < x.size <= _MAX_ELEMENTS
        and shift.shape == scale.shape
    ):
        rows_rep = _row_broadcast(tuple(shift.shape), tuple(x.shape))
        if rows_rep is not None:
            key = ("mlxvid_adaln_modulate", *(_dtype_name(a.dtype) for a in (x, shift, scale)),
                   _adaln_group(x.shape[-1]), backend)
            if _probe_passed(key, lambda: _adaln_probe(backend, x, shift, scale), exact=False):
                return _launch_adaln(backend, x, shift.reshape(-1), scale.reshape(-1), eps, rows_rep)
    return _adaln_portable(x, shift, scale, eps)


def _adaln_probe(backend, x, shift, scale):
    dim = x.shape[-1]
    rng = np.random.default_rng(1)
    px = mx.array((3 + 2 * rng.standard_normal((2, 3, dim))).astype(np.float32)).astype(x.dtype)
    ps = mx.array(rng.standard_normal((2, 1, dim)).astype(np.float32)).astype(shift.dtype)
    pc = mx.array(0.5 * rng.standard_normal((2, 1, dim)).astype(np.float32)).astype(scale.dtype)
    return (
        lambda: [_launch_adaln(backend, px, ps.reshape(-1), pc.reshape(-1), 1e-6, (2, 3))],
        lambda: [_adaln_portable(px, ps, pc, 1e-6)],
    )


def _gated_portable(x, gate, y):
    return x + y * gate


def _launch_gated(backend, x, gate, y, rows_rep, out_dtype, **kw):
    _, rep = rows_rep
    dim = x.shape[-1]
    return _kernel("mlxvid_gated_residual", backend)(
        inputs=[x, gate, y, _params(x.size, dim, rep)],
        template=[("OutT", out_dtype)],
        grid=(x.size, 1, 1), threadgroup=(_ELEMENTWISE_GROUP, 1, 1),
        output_shapes=[x.shape], output_dtypes=[out_dtype], **kw,
    )[0]


def gated_residual(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """x + y * gate (the residual update of a gated block); gate broadcasts onto x like adaLN's shift.

    The portable path is exactly `x + y * gate`; the result dtype is MLX's promotion of the three.
    """
    backend = active_backend()
    if (
        backend != "portable"
        and all(a.dtype in _FLOAT_DTYPES for a in (x, gate, y))
        and x.shape == y.shape
        and 0 < x.size <= _MAX_ELEMENTS
    ):
        rows_rep = _row_broadcast(tuple(gate.shape), tuple(x.shape))
        if rows_rep is not None:
            out_dtype = _promote(x.dtype, y.dtype, gate.dtype)
            key = ("mlxvid_gated_residual", *(_dtype_name(a.dtype) for a in (x, gate, y)), backend)
            if _probe_passed(key, lambda: _gated_probe(backend, x, gate, y, out_dtype), exact=False):
                return _launch_gated(backend, x, gate.reshape(-1), y, rows_rep, out_dtype)
    return _gated_portable(x, gate, y)


def _gated_probe(backend, x, gate, y, out_dtype):
    dim = x.shape[-1]
    rng = np.random.default_rng(2)
    px = mx.array(rng.standard_normal((2, 3, dim)).astype(np.float32)).astype(x.dtype)
    py = mx.array(rng.standard_normal((2, 3, dim)).astype(np.float32)).astype(y.dtype)
    pg = mx.array(rng.standard_normal((2, 1, dim)).astype(np.float32)).astype(gate.dtype)
    return (
        lambda: [_launch_gated(backend, px, pg.reshape(-1), py, (2, 3), out_dtype)],
        lambda: [_gated_portable(px, pg, py)],
    )


# --------------------------------------------------------------------------------------------------------
# Block-sparse attention (radial attention's kept tiles)
# --------------------------------------------------------------------------------------------------------

_SPARSE_GROUP = 64
_MAX_HEAD_DIM = 256  # the kernel keeps a query row and its accumulator in registers


def tile_lists(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kept key tiles of each query tile of a (query tiles, key tiles) bool mask, as int32 (tile_ptr,
    tile_idx): query tile t keeps tile_idx[tile_ptr[t]:tile_ptr[t + 1]]."""
    counts = mask.sum(axis=1)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return ptr, np.nonzero(mask)[1].astype(np.int32)


def _key_bias(mask, batch: int, k_len: int) -> mx.array | None:
    """A key mask broadcastable to (B, 1, 1, Lk), bool or additive, as (B, Lk) float32; None for other shapes."""
    if mask is None:
        return mx.zeros((batch, k_len), dtype=mx.float32)
    if not isinstance(mask, mx.array) or mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != k_len \
            or mask.shape[0] not in (1, batch):
        return None
    bias = mx.where(mask, 0.0, -mx.inf) if mask.dtype == mx.bool_ else mask.astype(mx.float32)
    return mx.broadcast_to(bias.reshape(-1, k_len).astype(mx.float32), (batch, k_len))


def _sparse_portable(q, k, v, tile_ptr, tile_idx, tile, scale, key_bias):
    """The same attention with the whole score matrix, masked, computed in float32 as the kernel accumulates
    (the probe's reference)."""
    ptr, idx = np.asarray(tile_ptr), np.asarray(tile_idx)
    q_len, k_len = q.shape[1], k.shape[1]
    kept = np.zeros((len(ptr) - 1, -(-k_len // tile)), dtype=bool)
    for t in range(len(ptr) - 1):
        kept[t, idx[ptr[t]:ptr[t + 1]]] = True
    tokens = np.repeat(np.repeat(kept, tile, axis=0), tile, axis=1)[:q_len, :k_len]
    bias = mx.where(mx.array(tokens), 0.0, -mx.inf)[None, None] + key_bias[:, None, None, :]
    t = [a.astype(mx.float32).transpose(0, 2, 1, 3) for a in (q, k, v)]
    out = mx.fast.scaled_dot_product_attention(*t, scale=scale, mask=bias)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q_len, -1).astype(q.dtype)


def _launch_sparse(backend, q, k, v, key_bias, tile_ptr, tile_idx, tile, scale, **kw):
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    pairs = batch * heads
    qh, kh, vh = (a.transpose(0, 2, 1, 3).reshape(pairs, -1, dim) for a in (q, k, v))
    out = _kernel("mlxvid_block_sparse_attention", backend)(
        inputs=[qh, kh, vh, key_bias, tile_ptr, tile_idx, _params(q_len, k_len, tile, heads),
                mx.array([scale], dtype=mx.float32)],
        template=[("OutT", q.dtype), ("D", dim)],
        grid=(q_len, pairs, 1), threadgroup=(min(q_len, _SPARSE_GROUP), 1, 1),
        output_shapes=[(pairs, q_len, dim)], output_dtypes=[q.dtype], **kw,
    )[0]
    return out.reshape(batch, heads, q_len, dim).transpose(0, 2, 1, 3).reshape(batch, q_len, heads * dim)


def block_sparse_attention(q: mx.array, k: mx.array, v: mx.array, tile_ptr: np.ndarray, tile_idx: np.ndarray,
                           tile: int, scale: float, key_mask=None) -> mx.array | None:
    """Softmax attention of q (B, Lq, heads, D) over k, v (B, Lk, heads, D), each query seeing only the keys in
    its query tile's kept key tiles (`tile_lists`), and the keys `key_mask` (B or 1, 1, 1, Lk) lets through.
    Returns (B, Lq, heads * D) from the GPU kernel, or None where the caller runs its portable path (no GPU,
    arguments the kernel does not take, or a variant whose warm-up probe failed or never ran)."""
    backend = active_backend()
    if backend == "portable":
        return None
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    if (
        not (q.dtype == k.dtype == v.dtype and q.dtype in _FLOAT_DTYPES)
        or k.shape != v.shape or k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != dim
        or not 0 < dim <= _MAX_HEAD_DIM or q_len == 0 or q_len > k_len
        or max(q.size, k.size) > _MAX_ELEMENTS or len(tile_ptr) - 1 < -(-q_len // tile)
    ):
        return None
    key_bias = _key_bias(key_mask, batch, k_len)
    if key_bias is None:
        return None
    key = ("mlxvid_block_sparse_attention", _dtype_name(q.dtype), dim, backend)
    if not _probe_passed(key, lambda: _sparse_probe(backend, q.dtype, dim), exact=False):
        return None
    return _launch_sparse(backend, q, k, v, key_bias, mx.array(tile_ptr), mx.array(tile_idx), tile, scale)


def warm_up_block_sparse_attention(dtype: mx.Dtype, head_dim: int) -> bool:
    """Probe the block-sparse attention kernel for (dtype, head_dim) now, as `warm_up` does for a model's kernels
    (a tiny probe, evaluated: not inside an `mx.compile` trace); whether that variant runs on the GPU."""
    if active_backend() == "portable":
        return False
    q = mx.zeros((1, 4, 1, head_dim), dtype=dtype)
    ptr, idx = tile_lists(np.ones((1, 1), dtype=bool))
    with probing():
        return block_sparse_attention(q, q, q, ptr, idx, 4, 1.0) is not None


def _sparse_probe(backend, dtype, dim):
    rng = np.random.default_rng(3)
    q_len, k_len, tile = 20, 27, 4
    pq, pk, pv = (mx.array(rng.standard_normal((2, n, 2, dim)).astype(np.float32)).astype(dtype)
                  for n in (q_len, k_len, k_len))
    kept = rng.random((5, 7)) < 0.5
    kept[np.arange(5), np.arange(5)] = True
    ptr, idx = tile_lists(kept)
    padding = np.ones((2, 1, 1, k_len), dtype=bool)
    padding[1, ..., -2:] = False
    bias = _key_bias(mx.array(padding), 2, k_len)
    scale = 1.0 / math.sqrt(dim)
    return (
        lambda: [_launch_sparse(backend, pq, pk, pv, bias, mx.array(ptr), mx.array(idx), tile, scale)],
        lambda: [_sparse_portable(pq, pk, pv, ptr, idx, tile, scale, bias)],
    )


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KERNELS",
    "RopeTables",
    "active_backend",
    "adaln_modulate",
    "apply_rope",
    "apply_rope_qk",
    "block_sparse_attention",
    "dequantize_fp8",
    "gated_residual",
    "kernel_header",
    "kernel_mode",
    "kernel_source",
    "kernel_status",
    "probing",
    "refresh",
    "rope_tables",
    "source_dir",
    "tile_lists",
    "warm_up",
    "warm_up_block_sparse_attention",
]
