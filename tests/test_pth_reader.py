"""The safe .pth reader against files written by torch.save, and against hostile or broken files."""

import os
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video.convert import pth as pth_mod
from mlx_video.convert.pth import PthCheckpoint, open_state_dict
from mlx_video.errors import MlxVideoError


def to_numpy_like_reader(t: torch.Tensor) -> np.ndarray:
    """What `get(...)` should hold, as numpy: bf16 compared as float32, fp8 as raw codes."""
    t = t.detach()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.contiguous().view(torch.uint8).numpy()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    if t.dtype == torch.float64:
        return t.float().numpy()
    return t.numpy()


def assert_reads_back(ckpt: PthCheckpoint, key: str, t: torch.Tensor):
    got = ckpt.get(key)
    want = to_numpy_like_reader(t)
    assert tuple(got.shape) == tuple(t.shape), key
    if t.dtype == torch.bfloat16:
        assert got.dtype == mx.bfloat16
        got = got.astype(mx.float32)
    host = np.array(got)
    assert host.dtype == want.dtype, (key, host.dtype, want.dtype)
    np.testing.assert_array_equal(host, want, err_msg=key)
    info = ckpt.info(key)
    assert info.shape == tuple(t.shape)
    assert info.dtype == str(t.dtype).removeprefix("torch.")


def test_dtypes_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    sd = {
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "f64": x.double(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "e4m3": (x * 30).to(torch.float8_e4m3fn),
        "e5m2": (x * 30).to(torch.float8_e5m2),
    }
    path = tmp_path / "sd.pth"
    torch.save(sd, path)
    ckpt = PthCheckpoint(path)
    assert sorted(ckpt.keys()) == sorted(sd)
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
    np.testing.assert_array_equal(ckpt.get_numpy("f64"), sd["f64"].numpy())  # numpy keeps float64
    assert ckpt.get("f64").dtype == mx.float32
    np.testing.assert_array_equal(ckpt.get_numpy("bf16"), sd["bf16"].view(torch.int16).numpy().view(np.uint16))


def test_module_state_dict_and_parameters(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    ).to(torch.bfloat16)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    ckpt = PthCheckpoint(tmp_path / "sd.pt")
    assert ckpt.keys() == list(net.state_dict())  # order kept, buffers included
    for k, t in net.state_dict().items():
        assert_reads_back(ckpt, k, t)

    # nn.Parameter objects themselves (torch._utils._rebuild_parameter[_with_state])
    params = dict(net.named_parameters())
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.note = "extra python state"  # forces _rebuild_parameter_with_state
    params["with_state"] = p
    torch.save(params, tmp_path / "params.pt")
    ckpt = PthCheckpoint(tmp_path / "params.pt")
    for k, t in params.items():
        assert_reads_back(ckpt, k, t)


def test_shared_storage_views_strides_offsets(tmp_path):
    base = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6)
    sd = {
        "base": base,
        "transposed": base.transpose(0, 2),
        "permuted": base.permute(1, 2, 0),
        "row": base[2],
        "strided": base[1:, 1:4, ::2],
        "flat_slice": base.view(-1)[37:59],
        "narrow_t": base[3].t()[2:],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        "half_view": base.half()[:, 2],
    }
    assert not sd["strided"].is_contiguous() and sd["row"].storage_offset() > 0
    torch.save(sd, tmp_path / "views.pt")
    ckpt = PthCheckpoint(tmp_path / "views.pt")
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
        info = ckpt.info(k)
        assert info.stride == t.stride() and info.storage_offset == t.storage_offset()
    shared = {ckpt.info(k).storage_key for k in ("base", "transposed", "permuted", "row", "strided", "flat_slice")}
    assert len(shared) == 1
    with zipfile.ZipFile(tmp_path / "views.pt") as z:
        assert sum("/data/" in n for n in z.namelist()) == 3  # base, expanded, half_view storages


def test_reads_are_lazy_and_partial(tmp_path, monkeypatch):
    base = torch.arange(1000, dtype=torch.float32)
    torch.save({"base": base, "part": base[100:110]}, tmp_path / "lazy.pt")
    calls = []
    real = pth_mod._Archive.read_range

    def spy(self, name, lo, hi):
        calls.append((name.rsplit("/", 1)[-1], lo, hi))
        return real(self, name, lo, hi)

    monkeypatch.setattr(pth_mod._Archive, "read_range", spy)
    ckpt = PthCheckpoint(tmp_path / "lazy.pt")
    assert all(n in ("data.pkl", "byteorder") for n, _, _ in calls)  # no tensor bytes yet
    calls.clear()
    np.testing.assert_array_equal(np.array(ckpt.get("part")), np.arange(100, 110, dtype=np.float32))
    assert calls == [("0", 400, 440)]  # only the 10 floats the view covers


def test_nested_state_dict(tmp_path):
    inner = {"blocks.0.weight": torch.randn(2, 3), "blocks.0.bias": torch.zeros(2, dtype=torch.bfloat16)}
    torch.save({"module": inner, "epoch": 7, "name": "ckpt", "shape": torch.Size([2, 3]), "blob": b"\x00\xff"}, tmp_path / "n.pt")

    flat = PthCheckpoint(tmp_path / "n.pt")
    assert flat.keys() == ["module.blocks.0.weight", "module.blocks.0.bias"]
    assert flat.extras == {"epoch": 7, "name": "ckpt", "shape": (2, 3), "blob": b"\x00\xff"}
    assert flat.top_level_keys() == ["module", "epoch", "name", "shape", "blob"]

    for ckpt in (PthCheckpoint(tmp_path / "n.pt", nested="module"), open_state_dict(tmp_path / "n.pt")):
        assert ckpt.keys() == list(inner)
        for k, t in inner.items():
            assert_reads_back(ckpt, k, t)

    torch.save({"state_dict": {"model": {"w": torch.ones(2)}}}, tmp_path / "deep.pt")
    deep = PthCheckpoint(tmp_path / "deep.pt", nested=("state_dict", "model"))
    assert deep.keys() == ["w"]
    with pytest.raises(MlxVideoError, match=r"no key 'ema'.*'module'"):
        PthCheckpoint(tmp_path / "n.pt", nested="ema")

    # a plain state dict is left as it is by open_state_dict
    torch.save({"module.x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "plain.pt")
    assert open_state_dict(tmp_path / "plain.pt").keys() == ["module.x", "y"]


def test_empty_and_zero_dim_tensors(tmp_path):
    sd = {
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(2, 0, 3, dtype=torch.float16),
        "empty_bf16": torch.zeros(0, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "scalar_int": torch.tensor(42),
        "scalar_fp8": torch.tensor(0.5).to(torch.float8_e4m3fn),
        "scalar_view": torch.arange(5.0)[3],
    }
    torch.save(sd, tmp_path / "e.pt")
    ckpt = PthCheckpoint(tmp_path / "e.pt")
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
    assert ckpt.get("scalar").shape == () and ckpt.get("empty2d").shape == (2, 0, 3)


def test_deflated_archive_still_reads(tmp_path):
    sd = {"a": torch.randn(4, 4), "b": torch.arange(10)}
    torch.save(sd, tmp_path / "s.pt")
    with zipfile.ZipFile(tmp_path / "s.pt") as src, zipfile.ZipFile(tmp_path / "d.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    ckpt = PthCheckpoint(tmp_path / "d.pt")
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)


# ---------------------------------------------------------------------------------------------------
# hostile and broken files


def write_zip(path, data_pkl: bytes, extra: dict | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload_cls, global_name", [(RunsShell, os.system.__module__ + ".system"), (RunsEval, "builtins.eval")])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload_cls, global_name):
    # The payload is live: a plain pickle load runs it.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps({"w": payload_cls(control)}, protocol=2))
    assert control.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_zip(path, pickle.dumps({"w": payload_cls(marker)}, protocol=2), {"version": b"3\n"})
    with pytest.raises(MlxVideoError) as e:
        PthCheckpoint(path)
    assert global_name in str(e.value) and "refusing to load" in str(e.value)
    assert not marker.exists()


def test_hand_written_os_system_global_is_named(tmp_path):
    marker = tmp_path / "pwned"
    stream = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.pth"
    write_zip(path, stream)
    with pytest.raises(MlxVideoError, match=r"refusing to load .*evil\.pth: it references os\.system, which is not a tensor"):
        PthCheckpoint(path)
    assert not marker.exists()


def test_build_on_allowed_callable_is_refused(tmp_path):
    # BUILD on an allowed global must not let the pickle reach (and mutate) the function behind it.
    stream = b"ctorch._utils\n_rebuild_tensor_v2\n(dS'x'\nI1\nsb."
    path = tmp_path / "build.pth"
    write_zip(path, stream)
    with pytest.raises(MlxVideoError, match="corrupt"):
        PthCheckpoint(path)


def test_legacy_format_and_non_zip(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(MlxVideoError, match="legacy"):
        PthCheckpoint(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world")
    with pytest.raises(MlxVideoError, match="not a zip archive"):
        PthCheckpoint(junk)
    with pytest.raises(MlxVideoError, match="missing checkpoint"):
        PthCheckpoint(tmp_path / "nope.pth")


def test_truncated_zip(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(MlxVideoError, match="truncated or corrupt"):
            PthCheckpoint(bad)


def test_missing_and_short_data_entries(tmp_path):
    sd = {"a": torch.randn(3, 3), "b": torch.randn(5)}
    torch.save(sd, tmp_path / "s.pt")
    with zipfile.ZipFile(tmp_path / "s.pt") as src:
        entries = {i.filename: src.read(i) for i in src.infolist()}
    data_names = sorted(n for n in entries if "/data/" in n)

    def rewrite(path, changes):
        with zipfile.ZipFile(path, "w") as dst:
            for name, data in entries.items():
                if name in changes:
                    if changes[name] is None:
                        continue
                    data = changes[name]
                dst.writestr(name, data)

    rewrite(tmp_path / "missing.pt", {data_names[1]: None})
    with pytest.raises(MlxVideoError, match="has no entry"):
        PthCheckpoint(tmp_path / "missing.pt")
    rewrite(tmp_path / "short.pt", {data_names[0]: entries[data_names[0]][:-4]})
    with pytest.raises(MlxVideoError, match="holds 32 bytes, its record says 36"):
        PthCheckpoint(tmp_path / "short.pt")


def test_zip_without_pickle_and_unknown_tensor(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(MlxVideoError, match="no <name>/data.pkl"):
        PthCheckpoint(tmp_path / "other.zip")
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(MlxVideoError, match="no tensor 'x'"):
        PthCheckpoint(tmp_path / "w.pt").get("x")


def test_unsupported_dtype_is_refused_by_name(tmp_path):
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(MlxVideoError, match=r"torch\.Complex|torch\.complex64"):
        PthCheckpoint(tmp_path / "c.pt")


def test_runtime_does_not_import_torch():
    import ast
    import inspect

    for mod in (pth_mod, __import__("mlx_video.convert.fp8", fromlist=["x"])):
        tree = ast.parse(inspect.getsource(mod))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names


def test_big_endian_archive(tmp_path):
    # torch writes a `byteorder` record; a file saved on a big-endian machine holds byte-swapped storages.
    sd = {"f": torch.randn(3, 2).t(), "h": torch.randn(4).half(), "b": torch.randn(2).bfloat16(), "i": torch.arange(3)}
    torch.save(sd, tmp_path / "le.pt")
    ckpt = PthCheckpoint(tmp_path / "le.pt")
    itemsize = {k: ckpt.info(k).itemsize for k in sd}
    key_of = {ckpt.info(k).storage_key: k for k in sd}
    with zipfile.ZipFile(tmp_path / "le.pt") as src, zipfile.ZipFile(tmp_path / "be.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                n = itemsize[key_of[info.filename.rsplit("/", 1)[-1]]]
                data = np.frombuffer(data, dtype=f"<u{n}").astype(f">u{n}").tobytes()
            dst.writestr(info.filename, data)
    be = PthCheckpoint(tmp_path / "be.pt")
    for k, t in sd.items():
        assert_reads_back(be, k, t)
