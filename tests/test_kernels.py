"""Custom kernels (mlx_video.kernels and kernels/): portable paths against numpy / torch references, the kernel
source strings, the host conformance tests (CMake + ctest), and the Metal / CUDA code path of the dispatch
layer run end to end on the host through the kernel bodies compiled for the CPU.

No Metal device or CUDA GPU is needed or used: where a test exercises the "metal" or "cuda" path, the
kernel objects MLX would compile are replaced by the bodies built by CMakeLists.txt (kernels/tests), launched
with the same grid, template arguments and inputs.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_video import kernels
from mlx_video.convert import fp8 as convert_fp8
from mlx_video.errors import MlxVideoError
from mlx_video.models.wan import transformer as wan_transformer
from mlx_video.models.wan.config import WanTransformerConfig
from mlx_video.models.wan.transformer import WanTransformer
from mlx_video.nn.norms import layer_norm_fp32
from mlx_video.nn.rope import apply_rope_interleaved, rope_tables_3d

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def rel(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.fixture(autouse=True)
def _clean_kernel_state(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_PROBES", {})


# ------------------------------------------------------------------------------------------------------
# Backend choice
# ------------------------------------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    expected = "metal" if mx.metal.is_available() else ("cuda" if mx.cuda.is_available() else "portable")
    if mx.default_device() != mx.gpu:
        expected = "portable"
    assert kernels.kernel_mode() == "auto"
    assert kernels.active_backend() == expected
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    assert kernels.active_backend() == "portable"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(MlxVideoError, match="MLXVID_KERNELS"):
        kernels.active_backend()
    # A GPU back-end alone is not enough: the default device must be the GPU.
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    monkeypatch.setattr(kernels, "_gpu_backend", lambda: "metal")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert kernels.active_backend() == "portable"


def test_portable_path_never_builds_a_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a GPU kernel was built on the portable path")

    monkeypatch.setattr(mx.fast, "metal_kernel", refuse)
    monkeypatch.setattr(mx.fast, "cuda_kernel", refuse)
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    x = mx.ones((1, 2, 3, 8))
    rope = rope_tables_3d((1, 1, 2), 8, axis_dims=(4, 2, 2))
    mx.eval(
        kernels.dequantize_fp8(mx.zeros((2, 2), dtype=mx.uint8), "e4m3fn"),
        kernels.apply_rope(x, rope),
        kernels.apply_rope_qk(x, x, rope),
        kernels.adaln_modulate(x, x[:, :, :1], x[:, :, :1]),
        kernels.gated_residual(x, x[:, :, :1], x),
    )
    assert kernels.kernel_status() == {}


# ------------------------------------------------------------------------------------------------------
# Portable paths against independent references
# ------------------------------------------------------------------------------------------------------


def fp8_reference_torch(fmt: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    dtype = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().numpy()


def fp8_reference_ldexp(fmt: str) -> np.ndarray:
    exp_bits, man_bits = (4, 3) if fmt == "e4m3fn" else (5, 2)
    bias = (1 << (exp_bits - 1)) - 1
    out = np.empty(256, dtype=np.float64)
    for code in range(256):
        e, m = (code >> man_bits) & ((1 << exp_bits) - 1), code & ((1 << man_bits) - 1)
        sign = -1.0 if code & 0x80 else 1.0
        if e == (1 << exp_bits) - 1 and (fmt == "e5m2" or m == (1 << man_bits) - 1):
            out[code] = sign * np.inf if (fmt == "e5m2" and m == 0) else np.nan
        elif e == 0:
            out[code] = sign * np.ldexp(m, 1 - bias - man_bits)
        else:
            out[code] = sign * np.ldexp((1 << man_bits) + m, e - bias - man_bits)
    return out


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_portable_fp8_every_code_bit_exact(fmt):
    codes = mx.array(np.arange(256, dtype=np.uint8))
    got = np.array(kernels.dequantize_fp8(codes, fmt, 1.0, mx.float32))
    ldexp = fp8_reference_ldexp(fmt)
    finite = ~np.isnan(ldexp)
    assert np.array_equal(got[finite].astype(np.float64), ldexp[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(ldexp[finite]))  # -0.0 stays negative
    assert np.isnan(got[~finite]).all() and (got[~finite].view(np.uint32) == 0x7FC00000).all()
    torch_values = fp8_reference_torch(fmt)
    assert np.array_equal(got, torch_values, equal_nan=True)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_portable_fp8_scales_and_dtypes(fmt, dtype):
    torch = pytest.importorskip("torch")
    torch_dtype = {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}[dtype]
    codes = np.stack([np.roll(np.arange(256, dtype=np.uint8), 7 * r) for r in range(4)])
    scales = np.array([0.5, -1.25, 3.0e-3, 17.0], dtype=np.float32)
    values = torch.from_numpy(fp8_reference_torch(fmt)[codes])
    for scale, t_scale in [(scales, torch.from_numpy(scales)[:, None]), (0.375, torch.tensor(0.375))]:
        mx_scale = mx.array(scale) if isinstance(scale, np.ndarray) else scale
        got = kernels.dequantize_fp8(mx.array(codes), fmt, mx_scale, dtype)
        assert got.dtype == dtype and got.shape == codes.shape
        want = (values * t_scale).to(torch_dtype).float().numpy()
        assert np.array_equal(f32(got), want, equal_nan=True)


def complex_rope(x: np.ndarray, grid, axis_dims, theta=10000.0) -> np.ndarray:
    rotations = []
    positions = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, len(grid))
    for axis, dims in enumerate(axis_dims):
        freqs = theta ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
        rotations.append(np.exp(1j * positions[:, axis : axis + 1] * freqs[None, :]))
    rotation = np.concatenate(rotations, axis=1)
    z = x.astype(np.float64).reshape(*x.shape[:-1], -1, 2)
    z = (z[..., 0] + 1j * z[..., 1]) * rotation[None, :, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


ROPE_CASES = [  # grid, head_dim, axis_dims, theta
    ((3, 3, 5), 20, None, 10000.0),  # tiny Wan: 8/6/6
    ((2, 3, 4), 128, None, 10000.0),  # Wan: 44/42/42
    ((2, 2, 3), 128, (16, 56, 56), 256.0),  # HunyuanVideo
]


@pytest.mark.parametrize("grid,head_dim,axis_dims,theta", ROPE_CASES)
def test_portable_rope_matches_float64(grid, head_dim, axis_dims, theta):
    split = axis_dims or (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, math.prod(grid), 3, head_dim)).astype(np.float32)
    k = rng.standard_normal(q.shape).astype(np.float32)
    full = rope_tables_3d(grid, head_dim, theta=theta, axis_dims=axis_dims)
    axes = kernels.rope_tables(grid, head_dim, theta=theta, axis_dims=axis_dims)
    # The per-axis tables expand to exactly the (L, D/2) tables.
    assert np.array_equal(np.array(axes.full()[0]), np.array(full[0]))
    assert np.array_equal(np.array(axes.full()[1]), np.array(full[1]))
    for rope in (full, axes):
        got_q, got_k = kernels.apply_rope_qk(mx.array(q), mx.array(k), rope)
        assert rel(np.array(got_q), complex_rope(q, grid, split, theta)) < 1e-6
        assert rel(np.array(got_k), complex_rope(k, grid, split, theta)) < 1e-6
        assert rel(np.array(kernels.apply_rope(mx.array(q), rope)), complex_rope(q, grid, split, theta)) < 1e-6
    assert kernels.apply_rope(mx.array(q).astype(mx.bfloat16), full).dtype == mx.bfloat16


def adaln_reference(x, shift, scale, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * (1 + scale.astype(np.float64)) + shift.astype(np.float64)


def test_portable_adaln_and_gated_match_float64():
    rng = np.random.default_rng(3)
    x = (3 + 2 * rng.standard_normal((2, 3, 10, 96))).astype(np.float32)
    shift, scale, gate = (0.5 * rng.standard_normal((3, 2, 3, 1, 96))).astype(np.float32)
    y = rng.standard_normal(x.shape).astype(np.float32)
    got = kernels.adaln_modulate(mx.array(x), mx.array(shift), mx.array(scale), 1e-6)
    assert got.dtype == mx.float32
    assert rel(np.array(got), adaln_reference(x, shift, scale, 1e-6)) < 1e-6
    got = kernels.gated_residual(mx.array(x), mx.array(gate), mx.array(y))
    assert rel(np.array(got), x.astype(np.float64) + y.astype(np.float64) * gate) < 1e-6


def test_portable_path_is_the_previous_composition():
    """Bit for bit the expressions the Wan transformer used before the dispatch layer."""
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((2, 3, 10, 40)).astype(np.float32))
    shift, scale, gate = (mx.array(0.3 * rng.standard_normal((2, 3, 1, 40)).astype(np.float32)) for _ in range(3))
    y = mx.array(rng.standard_normal((2, 3, 10, 40)).astype(np.float32)).astype(mx.bfloat16)
    assert np.array_equal(
        np.array(kernels.adaln_modulate(x, shift, scale, 1e-6)),
        np.array(layer_norm_fp32(x, eps=1e-6) * (1 + scale) + shift),
    )
    assert np.array_equal(np.array(kernels.gated_residual(x, gate, y)), np.array(x + y * gate))
    q = mx.array(rng.standard_normal((2, 45, 2, 20)).astype(np.float32))
    cos, sin = rope_tables_3d((3, 3, 5), 20)
    got_q, got_k = kernels.apply_rope_qk(q, q * 2, (cos, sin))
    assert np.array_equal(np.array(got_q), np.array(apply_rope_interleaved(q, cos, sin)))
    assert np.array_equal(np.array(got_k), np.array(apply_rope_interleaved(q * 2, cos, sin)))


TINY_WAN = WanTransformerConfig(
    dim=40, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=2, in_channels=12, out_channels=8
)


def tiny_wan_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    model = WanTransformer(TINY_WAN)
    # The default init leaves modulation at zero; randomise it so that the modulation paths matter.
    for block in model.blocks:
        block.modulation = 0.3 * mx.random.normal(block.modulation.shape)
    model.head.modulation = 0.3 * mx.random.normal(model.head.modulation.shape)
    latents = mx.array(rng.standard_normal((2, 3, 6, 10, 12)).astype(np.float32))
    context = mx.array(rng.standard_normal((2, 7, 24)).astype(np.float32))
    return model, latents, mx.array([999.0, 250.0]), context


def test_wan_transformer_unchanged_by_the_dispatch_layer(monkeypatch):
    """The Wan transformer through mlx_video.kernels (portable here) equals the previous direct code bit for bit."""
    model, latents, timestep, context = tiny_wan_inputs()
    through_dispatch = np.array(model(latents, timestep, context))
    monkeypatch.setattr(
        wan_transformer, "adaln_modulate",
        lambda x, shift, scale, eps: layer_norm_fp32(x, eps=eps) * (1 + scale) + shift,
    )
    monkeypatch.setattr(wan_transformer, "gated_residual", lambda x, gate, y: x + y * gate)
    monkeypatch.setattr(
        wan_transformer, "apply_rope_qk",
        lambda q, k, rope: (apply_rope_interleaved(q, *rope), apply_rope_interleaved(k, *rope)),
    )
    direct = np.array(model(latents, timestep, context))
    assert np.array_equal(through_dispatch, direct)


# ------------------------------------------------------------------------------------------------------
# Kernel source strings
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernel_source_strings(backend, name):
    header, body = kernels.kernel_source(name, backend)
    spec = kernels.KERNELS[name]
    assert header.strip() and body.strip()
    define = {"metal": "MLXVID_BACKEND_METAL", "cuda": "MLXVID_BACKEND_CUDA"}[backend]
    assert header.startswith(f"#define {define} 1\n")
    src = kernels.source_dir()
    for relative in kernels.SHARED_HEADERS:
        assert (src / relative).read_text() in header  # each shared header, whole
    positions = [header.index(f"// ---- {r} ----") for r in kernels.SHARED_HEADERS]
    assert positions == sorted(positions) and "mlxvid_shim.h" in kernels.SHARED_HEADERS[0]
    assert "#include" not in body
    for arg in spec.input_names + spec.output_names:
        assert re.search(rf"\b{arg}\b", body), f"{arg} is not used by the {backend} body of {name}"
    foreign = {"metal": ["blockIdx", "threadIdx", "__shared__"], "cuda": ["thread_position", "threadgroup"]}
    for builtin in foreign[backend]:
        assert builtin not in _code(body)


def _code(text: str) -> str:
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def test_metal_and_cuda_bodies_differ_only_in_builtins():
    """One source of truth for the math: a .cu body is its .metal twin with the GPU built-ins renamed."""
    renames = [
        ("threadgroup float", "__shared__ float"),
        ("threadgroup_position_in_grid.x", "blockIdx.x"),
        ("thread_position_in_threadgroup.x", "threadIdx.x"),
        ("thread_position_in_grid.x", "blockIdx.x * blockDim.x + threadIdx.x"),
        ("thread_position_in_grid.y", "blockIdx.y * blockDim.y + threadIdx.y"),
    ]
    for name in kernels.KERNELS:
        metal = _code(kernels.kernel_source(name, "metal")[1])
        cuda = _code(kernels.kernel_source(name, "cuda")[1])
        for a, b in renames:
            metal = metal.replace(a, b)
        assert metal.split() == cuda.split(), name


def test_sources_found_in_the_checkout():
    assert kernels.source_dir() in (ROOT / "kernels", Path(kernels.__file__).parent / "kernel_sources")


# ------------------------------------------------------------------------------------------------------
# CMake + ctest, and the kernel bodies compiled for the host
# ------------------------------------------------------------------------------------------------------


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def kernel_build(tmp_path_factory):
    """Configure, build and ctest CMakeLists.txt in a temporary folder; the build folder."""
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake / ctest are not installed: the host conformance tests of kernels/ cannot be built")
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++): the host conformance tests cannot be built")
    build = tmp_path_factory.mktemp("kernels-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    start = time.perf_counter()
    for cmd in (
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build), "--parallel", str(max(2, os.cpu_count() or 2))],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    built = time.perf_counter()
    ctest = subprocess.run(
        ["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True
    )
    print(f"kernel conformance: configure+build {built - start:.1f} s, ctest {time.perf_counter() - built:.1f} s")
    return build, ctest


def test_ctest(kernel_build):
    _, ctest = kernel_build
    assert ctest.returncode == 0, ctest.stdout[-6000:] + ctest.stderr[-2000:]
    assert "100% tests passed" in ctest.stdout
    assert re.search(r"tests passed, 0 tests failed out of 12\b", ctest.stdout)


@pytest.mark.parametrize("dialect", ["host", "metal", "cuda"])
def test_kernel_fp8_decode_equals_the_portable_tables(kernel_build, dialect):
    """The decode of common/fp8.h (through each dialect's body) is bit-identical to convert/fp8's tables."""
    build, _ = kernel_build
    out = subprocess.run(
        [str(build / f"conformance_{dialect}"), "fp8-dump"], capture_output=True, text=True, check=True
    )
    rows = [line.split() for line in out.stdout.splitlines()]
    for fmt in ("e4m3fn", "e5m2"):
        bits = np.array([int(b, 16) for f, _, b in rows if f == fmt], dtype=np.uint32)
        assert bits.shape == (256,)
        assert np.array_equal(bits, convert_fp8.fp8_table(fmt).view(np.uint32))


# ---- the Metal / CUDA path of mlx_video.kernels, run through the host-compiled bodies ----

_DTYPE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2, mx.uint8: 3, mx.int32: 4}
_STORAGE = {
    mx.float32: np.float32, mx.float16: np.uint16, mx.bfloat16: np.uint16, mx.uint8: np.uint8, mx.int32: np.int32
}


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def assert_same_bits(got: mx.array, want: mx.array):
    """The same bit patterns (so -0.0 differs from 0.0), and NaN at the same places (any NaN payload)."""
    nan_got, nan_want = np.isnan(f32(got)), np.isnan(f32(want))
    assert np.array_equal(nan_got, nan_want)
    g, w = _to_numpy(got), _to_numpy(want)
    if g.dtype == np.float32:
        g, w = g.view(np.uint32), w.view(np.uint32)
    assert np.array_equal(g[~nan_got], w[~nan_want])


class HostKernel:
    """Stands in for the object mx.fast.metal_kernel / cuda_kernel returns: runs the body on the host."""

    def __init__(self, lib, name: str, calls: list):
        self.lib, self.name, self.calls = lib, name, calls

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **unused):
        arrays = [_to_numpy(a) for a in inputs]
        outs = [np.zeros(tuple(s), dtype=_STORAGE[d]) for s, d in zip(output_shapes, output_dtypes)]
        tmpl = [_DTYPE_CODES[v] if isinstance(v, mx.Dtype) else int(v) for _, v in template]
        self.calls.append((self.name, tuple(a.dtype for a in inputs), tuple(output_dtypes), tuple(template)))
        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        out_ptrs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        rc = self.lib.mlxvid_host_launch(
            self.name.encode(), ptrs, (ctypes.c_int * len(arrays))(*[_DTYPE_CODES[a.dtype] for a in inputs]),
            len(arrays), out_ptrs, (ctypes.c_int * len(outs))(*[_DTYPE_CODES[d] for d in output_dtypes]), len(outs),
            (ctypes.c_int * max(1, len(tmpl)))(*tmpl), len(tmpl),
            (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*threadgroup),
        )
        assert rc == 0, f"host runner refused {self.name} (code {rc})"
        result = []
        for o, d in zip(outs, output_dtypes):
            arr = mx.array(o)
            result.append(arr.view(d) if d in (mx.float16, mx.bfloat16) else arr)
        return result


def _emulate(backend: str, build: Path, monkeypatch) -> list:
    lib = ctypes.CDLL(str(next(build.glob(f"*mlxvid_host_kernels_{backend}.*"))))
    lib.mlxvid_host_launch.restype = ctypes.c_int
    calls: list = []
    monkeypatch.setattr(kernels, "active_backend", lambda: backend)
    monkeypatch.setattr(kernels, "_kernel", lambda name, b: HostKernel(lib, name, calls))
    return calls


@pytest.fixture(params=["metal", "cuda"])
def emulated_gpu(request, kernel_build, monkeypatch):
    """mlx_video.kernels on its `request.param` path, with the kernels run by the host-compiled bodies."""
    return request.param, _emulate(request.param, kernel_build[0], monkeypatch)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gpu_path_fp8_bit_exact(emulated_gpu, fmt, dtype):
    backend, calls = emulated_gpu
    codes = mx.array(np.stack([np.roll(np.arange(256, dtype=np.uint8), 5 * r) for r in range(6)]))
    for scale in (1.0, 0.0625, mx.array([1.5, -2.0, 0.25, 3.0, -0.5, 1e-3]), mx.array([[2.0]] * 6)):
        got = kernels.dequantize_fp8(codes, fmt, scale, dtype)
        want = convert_fp8.dequantize_fp8(codes, fmt, scale, dtype)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert_same_bits(got, want)
    assert {c[0] for c in calls} == {"mlxvid_fp8_dequant"} and all(kernels.kernel_status().values())
    # A scale that is neither per tensor nor per output channel takes the portable path.
    before = len(calls)
    odd = mx.array(np.linspace(0.5, 2, 256, dtype=np.float32))
    assert_same_bits(kernels.dequantize_fp8(codes, fmt, odd, dtype), convert_fp8.dequantize_fp8(codes, fmt, odd, dtype))
    assert len(calls) == before


@pytest.mark.parametrize("grid,head_dim,axis_dims,theta", ROPE_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gpu_path_rope(emulated_gpu, grid, head_dim, axis_dims, theta, dtype):
    backend, calls = emulated_gpu
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((2, math.prod(grid), 3, head_dim)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((2, math.prod(grid), 3, head_dim)).astype(np.float32)).astype(dtype)
    full = rope_tables_3d(grid, head_dim, theta=theta, axis_dims=axis_dims)
    per_axis = kernels.rope_tables(grid, head_dim, theta=theta, axis_dims=axis_dims)
    want_q, want_k = apply_rope_interleaved(q, *full), apply_rope_interleaved(k, *full)
    bound = 1e-6 if dtype == mx.float32 else 1e-2  # one rounding to 16 bits on top for half types
    for rope in (full, per_axis):
        got_q, got_k = kernels.apply_rope_qk(q, k, rope)
        single = kernels.apply_rope(k, rope)
        assert got_q.dtype == got_k.dtype == single.dtype == dtype
        assert rel(f32(got_q), f32(want_q)) < bound and rel(f32(got_k), f32(want_k)) < bound
        assert rel(f32(single), f32(want_k)) < bound
    names = [c[0] for c in calls]
    assert names.count("mlxvid_rope_qk") >= 2 and names.count("mlxvid_rope") >= 2
    assert all(kernels.kernel_status().values())


@pytest.mark.parametrize("dim,x_dtype", [(40, mx.float32), (96, mx.float32), (1536, mx.bfloat16)])
def test_gpu_path_adaln_and_gated(emulated_gpu, dim, x_dtype):
    backend, calls = emulated_gpu
    rng = np.random.default_rng(dim)
    x = mx.array((3 + 2 * rng.standard_normal((2, 3, 5, dim))).astype(np.float32)).astype(x_dtype)
    shift, scale, gate = (mx.array(0.5 * rng.standard_normal((2, 3, 1, dim)).astype(np.float32)) for _ in range(3))
    y = mx.array(rng.standard_normal((2, 3, 5, dim)).astype(np.float32)).astype(mx.bfloat16)
    got = kernels.adaln_modulate(x, shift, scale, 1e-6)
    want = adaln_reference(f32(x), np.array(shift), np.array(scale), 1e-6)
    assert got.dtype == mx.float32 and rel(np.array(got), want) < 1e-6
    assert rel(np.array(got), np.array(layer_norm_fp32(x, eps=1e-6) * (1 + scale) + shift)) < 1e-6
    x32 = x.astype(mx.float32)
    got = kernels.gated_residual(x32, gate, y)
    assert got.dtype == mx.float32
    assert rel(np.array(got), f32(x32).astype(np.float64) + f32(y).astype(np.float64) * np.array(gate)) < 1e-6
    # Modulation shared by every row: (dim,) onto (B, G, N, dim).
    got = kernels.adaln_modulate(x, shift[0, 0, 0], scale[0, 0, 0], 1e-5)
    want = adaln_reference(f32(x), np.array(shift[0, 0, 0]), np.array(scale[0, 0, 0]), 1e-5)
    assert rel(np.array(got), want) < 1e-6
    assert {c[0] for c in calls} == {"mlxvid_adaln_modulate", "mlxvid_gated_residual"}
    assert all(kernels.kernel_status().values())


def test_gpu_path_wan_transformer(emulated_gpu):
    """The tiny Wan transformer with every modulation, gated residual and RoPE through the kernel bodies."""
    backend, calls = emulated_gpu
    model, latents, timestep, context = tiny_wan_inputs(seed=5)
    got = np.array(model(latents, timestep, context))
    calls.clear()  # the first call also ran each variant's probe once
    assert np.array_equal(np.array(model(latents, timestep, context)), got)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "active_backend", lambda: "portable")
        want = np.array(model(latents, timestep, context))
    print(f"Wan tiny transformer, {backend} bodies on the host vs portable: rel {rel(got, want):.2e}")
    assert rel(got, want) < 1e-5
    names = [c[0] for c in calls]
    layers = TINY_WAN.num_layers
    assert names.count("mlxvid_adaln_modulate") == 2 * layers + 1
    assert names.count("mlxvid_gated_residual") == 2 * layers
    assert names.count("mlxvid_rope_qk") == layers
    assert all(kernels.kernel_status().values())


def test_probe_disables_a_broken_kernel(emulated_gpu, monkeypatch):
    """A kernel variant that fails its first-use probe is reported and replaced by the portable path."""
    backend, _ = emulated_gpu

    def broken(name, b):
        def call(**kwargs):
            raise RuntimeError("compile error")
        return call

    monkeypatch.setattr(kernels, "_kernel", broken)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 4, 16)).astype(np.float32))
    shift = mx.zeros((1, 2, 1, 16))
    with pytest.warns(UserWarning, match="disabled"):
        got = kernels.adaln_modulate(x, shift, shift, 1e-6)
    assert np.array_equal(np.array(got), np.array(layer_norm_fp32(x, eps=1e-6) + shift))
    assert list(kernels.kernel_status().values()) == [False]
    kernels.adaln_modulate(x, shift, shift, 1e-6)  # no second probe, no second warning


# ---- the sources as MLX would compile them ----


def _exercise_all_variants():
    """One call of every kernel variant the Wan transformer and fp8 loading use."""
    rng = np.random.default_rng(0)
    for fmt in ("e4m3fn", "e5m2"):
        for dtype in FLOATS:
            kernels.dequantize_fp8(mx.array(rng.integers(0, 256, (4, 8), dtype=np.uint8)), fmt, 0.5, dtype)
    rope = rope_tables_3d((1, 2, 2), 12, axis_dims=(4, 4, 4))
    for dtype in FLOATS:
        q = mx.array(rng.standard_normal((1, 4, 2, 12)).astype(np.float32)).astype(dtype)
        kernels.apply_rope_qk(q, q, rope)
        kernels.apply_rope(q, rope)
    x = mx.array(rng.standard_normal((1, 2, 3, 40)).astype(np.float32))
    m = mx.zeros((1, 2, 1, 40))
    kernels.adaln_modulate(x, m, m, 1e-6)
    kernels.adaln_modulate(x.astype(mx.bfloat16), m, m, 1e-6)
    kernels.gated_residual(x, m, x.astype(mx.bfloat16))
    kernels.gated_residual(x, m, x)


def test_mlx_generated_metal_source_compiles_on_the_host(kernel_build, tmp_path, capfd, monkeypatch):
    """MLX's own generated Metal source for each variant (header + signature + body, captured through an
    export trace, which needs no Metal device) compiles as C++ under the Metal emulation of kernels/tests."""
    monkeypatch.setattr(kernels, "active_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_probe_passed", lambda *a, **k: True)
    launches = []

    real_kernel = kernels._kernel.__wrapped__

    def recording(name, backend):
        k = real_kernel(name, backend)
        def launch(**kw):
            launches.append((k, kw))
            return [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

        return launch

    monkeypatch.setattr(kernels, "_kernel", recording)
    _exercise_all_variants()
    assert len(launches) >= 14
    capfd.readouterr()
    for i, (k, kw) in enumerate(launches):
        inputs = kw["inputs"]

        def traced(*arrays, k=k, kw=kw):
            return k(**dict(kw, inputs=list(arrays), verbose=True))

        mx.export_function(str(tmp_path / f"k{i}.mlxfn"), traced, *inputs)
    out = capfd.readouterr().out
    sources = re.findall(r"Generated source code for `(\w+)`:\n```\n(.*?)\n```", out, flags=re.S)
    assert len(sources) == len(launches)
    # One translation unit: the header once (its include guards make repeats empty), then every kernel.
    header = kernels.kernel_header("metal")
    kernels_only = []
    for name, source in sources:
        assert source.startswith(kernels.kernel_source(name, "metal")[0]), name
        if source[len(header):] not in kernels_only:
            kernels_only.append(source[len(header):])
    unit = tmp_path / "generated_metal.cpp"
    unit.write_text(
        '#include "host_types.h"\n#include "emulate_metal.h"\n' + header
        + '\n#include "emulate_metal_bodies.h"\n' + "\n".join(kernels_only)
    )
    proc = subprocess.run(
        [_compiler(), "-std=c++20", "-fsyntax-only", "-Wno-attributes", "-I", str(ROOT / "kernels" / "tests"),
         str(unit)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(kernels_only) >= 14


def test_metal_build_check_file_parses_on_the_host(tmp_path):
    """kernels/tests/metal_check.metal (compiled with xcrun on macOS only) is at least well-formed: it parses as
    C++ with <metal_stdlib> standing for the Metal emulation. Not a substitute for the Metal compiler."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    stdlib = '#include "host_types.h"\n#include "emulate_metal.h"\ntypedef host_bf16 bfloat;\n'
    (tmp_path / "metal_stdlib").write_text(stdlib)
    proc = subprocess.run(
        [compiler, "-std=c++20", "-fsyntax-only", "-Wno-attributes", "-I", str(tmp_path),
         "-I", str(ROOT / "kernels" / "tests"), "-x", "c++", str(ROOT / "kernels" / "tests" / "metal_check.metal")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _mlx_cuda_source(index: int, name: str, input_dtypes, output_dtypes, template) -> str:
    """A kernel in the form mx.fast.cuda_kernel builds it (mlx/backend/cuda/custom_kernel.cpp): header, then
    `__global__ void custom_kernel_<name>(const T* in..., T* out...)` in namespace mlx::core::cu with the
    template arguments declared in the body."""
    cuda_type = {
        mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint8: "uint8_t",
        mx.int32: "int32_t",
    }
    spec = kernels.KERNELS[name]
    header, body = kernels.kernel_source(name, "cuda")
    args = [f"    const {cuda_type[d]}* {n}" for n, d in zip(spec.input_names, input_dtypes)]
    args += [f"    {cuda_type[d]}* {n}" for n, d in zip(spec.output_names, output_dtypes)]
    consts = [
        f"  using {n} = {cuda_type[v]};" if isinstance(v, mx.Dtype) else f"  constexpr int {n} = {int(v)};"
        for n, v in template
    ]
    assert header == kernels.kernel_header("cuda")
    return "\n".join(
        ["namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n",
         f"__global__ void custom_kernel_{name}_{index}(", ",\n".join(args) + ") {", *consts, body, "}\n}\n"]
    )


def test_cuda_sources_compile_with_nvcc(kernel_build, tmp_path, monkeypatch):
    """Each CUDA variant the dispatch layer launches, assembled like MLX's cuda_kernel does, compiles with nvcc
    (when nvcc is installed; nothing runs on a GPU)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA sources are only checked on the host")
    calls = _emulate("cuda", kernel_build[0], monkeypatch)
    _exercise_all_variants()
    variants = sorted(set(calls), key=str)
    assert len(variants) >= 14
    units = [
        "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n#include <cstdint>\n",
        kernels.kernel_header("cuda"),
    ]
    for i, (name, in_dtypes, out_dtypes, template) in enumerate(variants):
        units.append(_mlx_cuda_source(i, name, in_dtypes, out_dtypes, template))
    unit = tmp_path / "variants.cu"
    unit.write_text("\n".join(units))
    proc = subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_80", "-cubin", str(unit), "-o", str(tmp_path / "variants.cubin")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
