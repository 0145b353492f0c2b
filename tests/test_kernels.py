"""Custom kernels (mlx_video.kernels and kernels/): portable paths against numpy / torch references, the kernel
source strings, the host conformance tests (CMake + ctest), and the Metal / CUDA code path of the dispatch
layer run end to end on the host through the kernel bodies compiled for the CPU.

No Metal device or CUDA GPU is needed or used: where a test exercises the "metal" or "cuda" path, the
kernel objects MLX would compile are replaced by the bodies built by CMakeLists.txt (kernels/tests), launched
with the same grid, template arguments and inputs.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
import re
import shutil
import subprocess
import time
import types
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_video import kernels
from mlx_video.convert import fp8 as convert_fp8
from mlx_video.errors import MlxVideoError
from mlx_video.families.wan import transformer as wan_transformer
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.transformer import WanTransformer
from mlx_video.nn import rope as nn_rope
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
def _clean_kernel_state():
    """No MLXVID_KERNELS, no verdicts, the mode read afresh; and read again once the test's own monkeypatch
    (torn down before this fixture) has restored the environment, so that no cached mode leaks out."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(kernels.ENV_VAR, raising=False)
        patch.setattr(kernels, "_PROBES", {})
        kernels.refresh()
        yield
    kernels.refresh()


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
    assert kernels.refresh() == kernels.active_backend() == "portable"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(MlxVideoError, match="MLXVID_KERNELS"):
        kernels.refresh()
    with pytest.raises(MlxVideoError, match="MLXVID_KERNELS"):  # a bad value is not cached
        kernels.active_backend()
    # A GPU back-end alone is not enough: the default device must be the GPU (looked at on every call).
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    kernels.refresh()
    monkeypatch.setattr(kernels, "_gpu_backend", lambda: "metal")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert kernels.active_backend() == "metal"
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert kernels.active_backend() == "portable"


def test_mode_is_read_once_until_refresh(monkeypatch):
    monkeypatch.setattr(kernels, "_gpu_backend", lambda: "cuda")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert kernels.active_backend() == "cuda"
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    reads = []

    class CountingEnviron(dict):
        def get(self, *args):
            reads.append(args)
            return os.environ.get(*args)

    monkeypatch.setattr(kernels, "os", types.SimpleNamespace(environ=CountingEnviron()))
    for _ in range(3):
        assert kernels.active_backend() == "cuda" and kernels.kernel_mode() == "auto"  # still the cached mode
    assert reads == []
    assert kernels.refresh() == "portable" and kernels.kernel_mode() == "portable"
    assert len(reads) == 1
    kernels.active_backend()
    assert len(reads) == 1


def test_warm_up_on_the_portable_backend_does_not_run(monkeypatch):
    ran = []
    assert kernels.active_backend() == "portable"  # this machine: the CPU back-end
    assert kernels.warm_up(lambda: ran.append(1)) == {}
    # A GPU present but MLXVID_KERNELS=portable: still nothing runs.
    monkeypatch.setattr(kernels, "_gpu_backend", lambda: "metal")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    kernels.refresh()
    assert kernels.warm_up(lambda: ran.append(1)) == {}
    assert ran == []


def test_probing_flag_is_scoped():
    assert not kernels._PROBING[0]
    with kernels.probing():
        assert kernels._PROBING[0]
        with kernels.probing():
            assert kernels._PROBING[0]
        assert kernels._PROBING[0]
    assert not kernels._PROBING[0]
    with pytest.raises(ZeroDivisionError), kernels.probing():
        1 / 0
    assert not kernels._PROBING[0]


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
    # Per-axis tables (what the kernels read) give bit for bit the rotation of the (L, D/2) tables.
    for dtype in FLOATS:
        qd, kd = mx.array(q).astype(dtype), mx.array(k).astype(dtype)
        got_q, got_k = kernels.apply_rope_qk(qd, kd, axes)
        assert got_q.dtype == got_k.dtype == dtype
        assert_same_bits(got_q, apply_rope_interleaved(qd, *full))
        assert_same_bits(got_k, apply_rope_interleaved(kd, *full))
        if dtype != mx.float32:  # one rounding to 16 bits of the float64 rotation
            assert rel(f32(got_q), complex_rope(f32(qd), grid, split, theta)) < 1e-2


def test_rope_tables_under_mx_compile():
    """RopeTables.full() first called inside an mx.compile trace: no host sync, and the cached tables stay
    plain constants usable outside it."""
    grid, head_dim = (2, 3, 4), 36
    rope = kernels.rope_tables(grid, head_dim)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 24, 2, head_dim)).astype(np.float32)
    k = rng.standard_normal(q.shape).astype(np.float32)
    rotate = mx.compile(lambda q, k: kernels.apply_rope_qk(q, k, rope))
    got_q, got_k = rotate(mx.array(q), mx.array(k))
    again_q, _ = rotate(mx.array(2 * q), mx.array(k))
    split = nn_rope.default_axis_dims(head_dim)
    assert rel(np.array(got_q), complex_rope(q, grid, split)) < 1e-6
    assert rel(np.array(got_k), complex_rope(k, grid, split)) < 1e-6
    assert rel(np.array(again_q), complex_rope(2 * q, grid, split)) < 1e-6
    want = rope_tables_3d(grid, head_dim)
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(rope.full(), want))


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
    # The Wan blocks' mix: float32 stream and gate, a bfloat16 branch output; a float32 result.
    y16 = mx.array(y).astype(mx.bfloat16)
    got = kernels.gated_residual(mx.array(x), mx.array(gate), y16)
    assert got.dtype == mx.float32
    assert rel(np.array(got), x.astype(np.float64) + f32(y16).astype(np.float64) * gate) < 1e-6
    got = kernels.adaln_modulate(mx.array(x).astype(mx.bfloat16), mx.array(shift), mx.array(scale), 1e-5)
    assert got.dtype == mx.float32
    assert rel(np.array(got), adaln_reference(f32(mx.array(x).astype(mx.bfloat16)), shift, scale, 1e-5)) < 1e-6


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


TINY_WAN_GRID = (3, 3, 5)  # the latents (3, 6, 10) over the patch (1, 2, 2)


def use_per_axis_rope(model: WanTransformer) -> None:
    """Hand the model's blocks per-axis RopeTables (what the kernels read) instead of the (cos, sin) pair."""
    model.rope_tables = lambda grid: kernels.rope_tables(grid, model.config.dim // model.config.num_heads)


WAN_OPS = ("adaln_modulate", "gated_residual", "apply_rope_qk")


def record_wan_ops(monkeypatch) -> list:
    """Wrap the kernel operations the Wan transformer calls (wherever it imported them from) so that each
    call's arguments and result are kept: (name, bound arguments, result)."""
    records = []
    for name in WAN_OPS:
        original = getattr(kernels, name)
        signature = inspect.signature(original)

        def wrapper(*args, _name=name, _original=original, _signature=signature, **kwargs):
            out = _original(*args, **kwargs)
            bound = _signature.bind(*args, **kwargs)
            bound.apply_defaults()
            records.append((_name, dict(bound.arguments), out))
            return out

        monkeypatch.setattr(kernels, name, wrapper)
        if hasattr(wan_transformer, name):
            monkeypatch.setattr(wan_transformer, name, wrapper)
    return records


def check_wan_ops_against_float64(records, grid, head_dim, bound=1e-6):
    """Every recorded operation of a tiny Wan forward against its float64 numpy reference."""
    split = nn_rope.default_axis_dims(head_dim)
    for name, args, out in records:
        if name == "adaln_modulate":
            want = adaln_reference(f32(args["x"]), f32(args["shift"]), f32(args["scale"]), args["eps"])
            got = [out]
            wants = [want]
        elif name == "gated_residual":
            x, gate, y = (f32(args[n]).astype(np.float64) for n in ("x", "gate", "y"))
            got, wants = [out], [x + y * gate]
        else:
            got = list(out)
            wants = [complex_rope(f32(args["q"]), grid, split), complex_rope(f32(args["k"]), grid, split)]
        for g, w in zip(got, wants):
            assert g.shape == w.shape
            assert rel(f32(g), w) < bound, name


@pytest.mark.parametrize("per_frame_timesteps", [False, True])
def test_portable_wan_operations_match_float64(monkeypatch, per_frame_timesteps):
    """Each adaLN, gated residual and RoPE call of the tiny Wan transformer (its real shapes and broadcasts,
    one or per-frame modulation groups) against float64 numpy."""
    model, latents, timestep, context = tiny_wan_inputs(seed=3)
    if per_frame_timesteps:
        timestep = mx.array([[999.0, 500.0, 10.0], [250.0, 250.0, 0.0]])
    records = record_wan_ops(monkeypatch)
    mx.eval(model(latents, timestep, context))
    assert sorted({r[0] for r in records}) == sorted(WAN_OPS)
    assert len(records) == 5 * TINY_WAN.num_layers + 1
    check_wan_ops_against_float64(records, TINY_WAN_GRID, TINY_WAN.dim // TINY_WAN.num_heads)


def test_portable_wan_per_axis_rope_tables_bit_identical():
    """The tiny Wan transformer given per-axis RopeTables equals it given rope_tables_3d's pair, bit for bit."""
    model, latents, timestep, context = tiny_wan_inputs(seed=4)
    pairs = np.array(model(latents, timestep, context))
    use_per_axis_rope(model)
    assert np.array_equal(np.array(model(latents, timestep, context)), pairs)


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
    assert re.search(r"tests passed, 0 tests failed out of 15\b", ctest.stdout)


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

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **_ignored):
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
    status = kernels.warm_up(lambda: kernels.dequantize_fp8(codes[:1], fmt, 1.0, dtype))
    assert status == {("mlxvid_fp8_dequant", fmt, str(dtype).removeprefix("mlx.core."), backend): True}
    calls.clear()
    for scale in (1.0, 0.0625, mx.array([1.5, -2.0, 0.25, 3.0, -0.5, 1e-3]), mx.array([[2.0]] * 6)):
        got = kernels.dequantize_fp8(codes, fmt, scale, dtype)
        want = convert_fp8.dequantize_fp8(codes, fmt, scale, dtype)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert_same_bits(got, want)
    assert [c[0] for c in calls] == ["mlxvid_fp8_dequant"] * 4 and kernels.kernel_status() == status
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
    status = kernels.warm_up(lambda: [kernels.apply_rope_qk(q, k, per_axis), kernels.apply_rope(k, per_axis)])
    assert sorted(k[0] for k, ok in status.items() if ok) == ["mlxvid_rope", "mlxvid_rope_qk"]
    calls.clear()
    bound = 1e-6 if dtype == mx.float32 else 1e-2  # one rounding to 16 bits on top for half types
    for rope in (full, per_axis):
        got_q, got_k = kernels.apply_rope_qk(q, k, rope)
        single = kernels.apply_rope(k, rope)
        assert got_q.dtype == got_k.dtype == single.dtype == dtype
        assert rel(f32(got_q), f32(want_q)) < bound and rel(f32(got_k), f32(want_k)) < bound
        assert rel(f32(single), f32(want_k)) < bound
    split = axis_dims or nn_rope.default_axis_dims(head_dim)
    for x, got in ((q, got_q), (k, got_k)):
        assert rel(f32(got), complex_rope(f32(x), grid, split, theta)) < bound
    names = [c[0] for c in calls]
    assert names.count("mlxvid_rope_qk") == 2 and names.count("mlxvid_rope") == 2
    assert kernels.kernel_status() == status


@pytest.mark.parametrize("dim,x_dtype", [(40, mx.float32), (96, mx.float32), (1536, mx.bfloat16)])
def test_gpu_path_adaln_and_gated(emulated_gpu, dim, x_dtype):
    backend, calls = emulated_gpu
    rng = np.random.default_rng(dim)
    x = mx.array((3 + 2 * rng.standard_normal((2, 3, 5, dim))).astype(np.float32)).astype(x_dtype)
    shift, scale, gate = (mx.array(0.5 * rng.standard_normal((2, 3, 1, dim)).astype(np.float32)) for _ in range(3))
    y = mx.array(rng.standard_normal((2, 3, 5, dim)).astype(np.float32)).astype(mx.bfloat16)
    x32 = x.astype(mx.float32)
    status = kernels.warm_up(
        lambda: [kernels.adaln_modulate(x, shift, scale, 1e-6), kernels.gated_residual(x32, gate, y)]
    )
    assert sorted(k[0] for k, ok in status.items() if ok) == ["mlxvid_adaln_modulate", "mlxvid_gated_residual"]
    calls.clear()
    got = kernels.adaln_modulate(x, shift, scale, 1e-6)
    want = adaln_reference(f32(x), np.array(shift), np.array(scale), 1e-6)
    assert got.dtype == mx.float32 and rel(np.array(got), want) < 1e-6
    got = kernels.gated_residual(x32, gate, y)
    assert got.dtype == mx.float32
    assert rel(np.array(got), f32(x32).astype(np.float64) + f32(y).astype(np.float64) * np.array(gate)) < 1e-6
    # Modulation shared by every row: (dim,) onto (B, G, N, dim).
    got = kernels.adaln_modulate(x, shift[0, 0, 0], scale[0, 0, 0], 1e-5)
    want = adaln_reference(f32(x), np.array(shift[0, 0, 0]), np.array(scale[0, 0, 0]), 1e-5)
    assert rel(np.array(got), want) < 1e-6
    assert [c[0] for c in calls] == ["mlxvid_adaln_modulate", "mlxvid_gated_residual", "mlxvid_adaln_modulate"]
    assert kernels.kernel_status() == status


@pytest.mark.parametrize("per_axis_rope", [False, True], ids=["pair-tables", "per-axis-tables"])
def test_gpu_path_wan_transformer(emulated_gpu, monkeypatch, per_axis_rope):
    """The tiny Wan transformer, warmed up, with every modulation, gated residual and RoPE through the kernel
    bodies: each operation against float64 numpy, and the whole output against the portable path."""
    backend, calls = emulated_gpu
    model, latents, timestep, context = tiny_wan_inputs(seed=5)
    if per_axis_rope:
        use_per_axis_rope(model)
    status = kernels.warm_up(lambda: model(latents[:1, :1, :2, :2], timestep[:1], context[:1, :1]))
    used = sorted(k[0] for k, ok in status.items() if ok)
    assert used == ["mlxvid_adaln_modulate", "mlxvid_gated_residual", "mlxvid_rope_qk"]
    calls.clear()
    records = record_wan_ops(monkeypatch)
    got = np.array(model(latents, timestep, context))
    names = [c[0] for c in calls]
    layers = TINY_WAN.num_layers
    assert names.count("mlxvid_adaln_modulate") == 2 * layers + 1
    assert names.count("mlxvid_gated_residual") == 2 * layers
    assert names.count("mlxvid_rope_qk") == layers
    assert len(names) == 5 * layers + 1  # no probe ran again
    check_wan_ops_against_float64(records, TINY_WAN_GRID, TINY_WAN.dim // TINY_WAN.num_heads)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "active_backend", lambda: "portable")
        want = np.array(model(latents, timestep, context))
    print(f"Wan tiny transformer, {backend} bodies on the host vs portable: rel {rel(got, want):.2e}")
    assert rel(got, want) < 1e-5
    assert kernels.kernel_status() == status


def test_forward_outside_warm_up_never_probes(emulated_gpu, monkeypatch):
    """Without a warm-up, a forward on a GPU backend builds no kernel and evaluates nothing (so mx.compile can
    trace it): every unprobed variant takes the portable path, and no verdict is recorded."""
    backend, calls = emulated_gpu
    model, latents, timestep, context = tiny_wan_inputs(seed=6)
    evals = []
    real_eval = mx.eval
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("error")
        patch.setattr(mx, "eval", lambda *a, **k: evals.append(a) or real_eval(*a, **k))
        out = model(latents, timestep, context)
        compiled = mx.compile(lambda lat: model(lat, timestep, context))(latents)
        assert evals == [] and calls == []
    assert kernels.kernel_status() == {}
    assert rel(np.array(compiled), np.array(out)) < 1e-5
    # The same forward after a warm-up: kernels run, without probing again inside the forward.
    kernels.warm_up(lambda: model(latents[:1, :1, :2, :2], timestep[:1], context[:1, :1]))
    calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mx, "eval", lambda *a, **k: evals.append(a) or real_eval(*a, **k))
        model(latents, timestep, context)
    assert evals == [] and len(calls) == 5 * TINY_WAN.num_layers + 1  # the forward's launches, no probe's


def test_warm_up_evaluates_its_outputs_once(emulated_gpu):
    backend, calls = emulated_gpu
    runs = []
    x = mx.ones((1, 2, 3, 16))

    def run():
        runs.append(1)
        return {"out": kernels.gated_residual(x, x[:, :, :1], x), "step": 3}

    status = kernels.warm_up(run)
    assert runs == [1] and status == {("mlxvid_gated_residual", "float32", "float32", "float32", backend): True}
    # The probe launch plus the launch of run()'s own call, evaluated by warm_up itself.
    assert [c[0] for c in calls] == ["mlxvid_gated_residual"] * 2


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
    assert kernels.adaln_modulate(x, shift, shift, 1e-6) is not None and kernels.kernel_status() == {}
    with pytest.warns(UserWarning, match="disabled"), kernels.probing():
        got = kernels.adaln_modulate(x, shift, shift, 1e-6)
    assert np.array_equal(np.array(got), np.array(layer_norm_fp32(x, eps=1e-6) + shift))
    assert list(kernels.kernel_status().values()) == [False]
    with warnings.catch_warnings(), kernels.probing():
        warnings.simplefilter("error")
        kernels.adaln_modulate(x, shift, shift, 1e-6)  # no second probe, no second warning


# ---- the sources as MLX would compile them ----


def _exercise_all_variants():
    """One call of every kernel variant the Wan transformer, fp8 loading and radial attention use."""
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
    ptr, idx = kernels.tile_lists(np.array([[True, False], [True, True]]))
    for dtype in FLOATS:
        q = mx.array(rng.standard_normal((1, 8, 2, 24)).astype(np.float32)).astype(dtype)
        kernels.block_sparse_attention(q, q, q, ptr, idx, 4, 0.2)


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 1e-2)], ids=str)
def test_gpu_path_block_sparse_attention(emulated_gpu, monkeypatch, dtype, tol):
    """Radial attention through the Metal / CUDA block-sparse kernel (run by the host-compiled bodies) equals its
    oracle, the portable path of mlx_video.nn.radial (in float32, as the kernel accumulates), with text after the
    video, padded keys and a query subset."""
    from mlx_video.nn.radial import RadialPlan, radial_attention, radial_block_mask

    backend, calls = emulated_gpu
    frames, per_frame, text, tile = 4, 24, 5, 8
    tokens = frames * per_frame + text
    plan = RadialPlan.of(radial_block_mask(frames, per_frame, block=tile, decay=1.0, text_tokens=text), tile, tokens)
    assert not plan.mask.all()
    rng = np.random.default_rng(4)
    q, k, v = (mx.array(rng.standard_normal((2, tokens, 3, 40)).astype(np.float32)).astype(dtype) for _ in range(3))
    padding = np.ones((2, 1, 1, tokens), dtype=bool)
    padding[1, ..., -2:] = False
    padding = mx.array(padding)
    assert kernels.warm_up_block_sparse_attention(dtype, 40)
    assert kernels.kernel_status() == {("mlxvid_block_sparse_attention", str(dtype).removeprefix("mlx.core."), 40,
                                        backend): True}
    calls.clear()
    got = [radial_attention(q, k, v, plan, scale=0.15, mask=padding),
           radial_attention(q[:, : frames * per_frame], k, v, plan, scale=0.15, mask=padding)]  # the video asks alone
    assert [c[0] for c in calls] == ["mlxvid_block_sparse_attention"] * 2
    monkeypatch.setattr(kernels, "active_backend", lambda: "portable")
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    want = [radial_attention(q, k, v, plan, scale=0.15, mask=padding),
            radial_attention(q[:, : frames * per_frame], k, v, plan, scale=0.15, mask=padding)]
    assert len(calls) == 2  # the oracle ran no kernel
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        err = float(mx.max(mx.abs(g.astype(mx.float32) - w.astype(mx.float32)))) / float(mx.max(mx.abs(w.astype(mx.float32))))
        assert err < tol, err


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
    kernels.warm_up(_exercise_all_variants)
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
