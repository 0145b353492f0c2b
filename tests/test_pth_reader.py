"""The safe .pth reader against files written by torch.save, and against hostile or broken files."""

import collections
import io
import os
import pickle
import pickletools
import struct
import tarfile
import warnings
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


def dtype_cases() -> dict:
    """One small tensor of every dtype a Wan checkpoint can hold, fp8 included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {
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


def test_dtypes_round_trip(tmp_path):
    sd = dtype_cases()
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


def view_cases() -> dict:
    """Tensors that share one storage through transposes, permutes, slices and offsets, plus a stride-0 expand
    and a half-precision copy: the layouts a reader must rebuild from (size, stride, storage offset)."""
    base = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6)
    return {
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


def test_shared_storage_views_strides_offsets(tmp_path):
    sd = view_cases()
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


def test_non_zip_files(tmp_path):
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


def test_oldest_tar_format_is_refused(tmp_path):
    path = tmp_path / "ancient.pth"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(MlxVideoError, match="tar-based"):
        PthCheckpoint(path)


# ---------------------------------------------------------------------------------------------------
# read_range: runs of elements, as the converter reads rows


def test_read_range_reads_only_the_run(tmp_path, monkeypatch):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {"base": base, "rows": base[2:5], "t": base.t(), "bf": torch.randn(4, 3).bfloat16(), "col": base[:, 3:4]}
    torch.save(sd, tmp_path / "r.pt")
    ckpt = PthCheckpoint(tmp_path / "r.pt")
    calls = []
    real = pth_mod._Archive.read_range

    def spy(self, name, lo, hi):
        calls.append((lo, hi))
        return real(self, name, lo, hi)

    monkeypatch.setattr(pth_mod._Archive, "read_range", spy)
    got = ckpt.read_range("rows", 10, 15)  # rows 1..2 of base[2:5], i.e. elements 30..44 of the storage
    np.testing.assert_array_equal(got, np.arange(30, 45, dtype=np.float32))
    assert calls == [(120, 180)] and got.flags.writeable
    for k, t in sd.items():  # every run of every tensor, strided ones (read whole) included
        whole = ckpt.get_numpy(k).reshape(-1)
        for first in range(t.numel() + 1):
            for count in (0, 1, 7, t.numel() - first):
                if first + count <= t.numel():
                    np.testing.assert_array_equal(ckpt.read_range(k, first, count), whole[first : first + count])
    assert ckpt.read_range("col", 0, 6).tolist() == [3, 13, 23, 33, 43, 53]  # size-1 dim: contiguous runs
    with pytest.raises(ValueError):
        ckpt.read_range("rows", 20, 11)


# ---------------------------------------------------------------------------------------------------
# the legacy (pre-1.6, non-zip) format


def save_legacy(obj, path, protocol=2):
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert not path.read_bytes().startswith(b"PK")
    return path


def legacy_parts(data: bytes) -> tuple[list[bytes], bytes]:
    """The five pickles of a legacy file and the storage records after them, found without unpickling."""
    parts, pos = [], 0
    for _ in range(5):
        end = next(pos + at + 1 for op, _, at in pickletools.genops(io.BytesIO(data[pos:])) if op.name == "STOP")
        parts.append(data[pos:end])
        pos = end
    return parts, data[pos:]


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_dtypes_round_trip(tmp_path, protocol):
    sd = dtype_cases()  # fp8 is stored on an untyped storage (torch itself cannot load it back)
    path = save_legacy(sd, tmp_path / "sd.pth", protocol)
    ckpt = PthCheckpoint(path)
    assert ckpt.format == "legacy" and ckpt.keys() == list(sd)
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
    np.testing.assert_array_equal(ckpt.get_numpy("f64"), sd["f64"].numpy())
    np.testing.assert_array_equal(ckpt.get_numpy("bf16"), sd["bf16"].view(torch.int16).numpy().view(np.uint16))
    torch.save(sd, tmp_path / "sd.pt")
    assert PthCheckpoint(tmp_path / "sd.pt").format == "zip"


def test_legacy_module_state_dict_parameters_and_nesting(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    ).to(torch.bfloat16)
    ckpt = PthCheckpoint(save_legacy(net.state_dict(), tmp_path / "sd.pt"))
    assert ckpt.keys() == list(net.state_dict())  # order kept, buffers (int64 num_batches_tracked) included
    for k, t in net.state_dict().items():
        assert_reads_back(ckpt, k, t)

    params = dict(net.named_parameters())
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.note = "extra python state"
    params["with_state"] = p
    ckpt = PthCheckpoint(save_legacy(params, tmp_path / "params.pt"))
    for k, t in params.items():
        assert_reads_back(ckpt, k, t)

    inner = {"blocks.0.weight": torch.randn(2, 3), "blocks.0.bias": torch.zeros(2, dtype=torch.bfloat16)}
    path = save_legacy({"module": inner, "epoch": 7, "name": "ckpt", "shape": torch.Size([2, 3]), "blob": b"\x00\xff"}, tmp_path / "n.pt")
    flat = PthCheckpoint(path)
    assert flat.keys() == ["module.blocks.0.weight", "module.blocks.0.bias"]
    assert flat.extras == {"epoch": 7, "name": "ckpt", "shape": (2, 3), "blob": b"\x00\xff"}
    assert flat.top_level_keys() == ["module", "epoch", "name", "shape", "blob"]
    for ckpt in (PthCheckpoint(path, nested="module"), open_state_dict(path)):
        assert ckpt.keys() == list(inner)
        for k, t in inner.items():
            assert_reads_back(ckpt, k, t)


def test_legacy_shared_storage_views_strides_offsets(tmp_path):
    sd = {**view_cases(), "bf16_row": torch.arange(12.0).bfloat16().reshape(3, 4)[1]}
    path = save_legacy(sd, tmp_path / "views.pt")
    ckpt = PthCheckpoint(path)
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
        info = ckpt.info(k)
        assert info.stride == t.stride() and info.storage_offset == t.storage_offset()
    shared = {ckpt.info(k).storage_key for k in ("base", "transposed", "permuted", "row", "strided", "flat_slice", "narrow_t")}
    assert len(shared) == 1
    parts, records = legacy_parts(path.read_bytes())
    keys = pickle.loads(parts[4])  # a plain list of strings (safe to load in a test)
    assert len(keys) == 4 and set(keys) == {ckpt.info(k).storage_key for k in sd}
    # each storage once: 8-byte count + bytes (base 120 floats, expanded 3, the half copy 120, the bf16 12)
    assert len(records) == 4 * 8 + 120 * 4 + 3 * 4 + 120 * 2 + 12 * 2


def test_legacy_empty_and_zero_dim_tensors(tmp_path):
    sd = {
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(2, 0, 3, dtype=torch.float16),
        "empty_bf16": torch.zeros(0, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "scalar_int": torch.tensor(42),
        "scalar_bool": torch.tensor(True),
        "scalar_view": torch.arange(5.0)[3],
    }
    ckpt = PthCheckpoint(save_legacy(sd, tmp_path / "e.pt"))
    for k, t in sd.items():
        assert_reads_back(ckpt, k, t)
    assert ckpt.get("scalar").shape == () and ckpt.get("empty2d").shape == (2, 0, 3)
    assert ckpt.read_range("empty", 0, 0).shape == (0,) and ckpt.read_range("scalar_view", 0, 1).tolist() == [3.0]


class CountingFileIO(io.FileIO):
    """A raw file that counts the bytes read through it."""

    total = 0

    def readinto(self, b):
        n = super().readinto(b)
        CountingFileIO.total += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        CountingFileIO.total += len(data or b"")
        return data

    def readall(self):
        data = super().readall()
        CountingFileIO.total += len(data)
        return data


def test_legacy_reads_are_lazy_and_partial(tmp_path, monkeypatch):
    big = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB
    sd = {"big": big, "other": torch.randn(500_000), "part": big[100:110], "ints": torch.arange(300_000)}
    path = save_legacy(sd, tmp_path / "lazy.pth")
    assert path.stat().st_size > 8_000_000

    def counting_open(file, mode="r", buffering=-1):
        assert mode == "rb"
        raw = CountingFileIO(file, "r")
        return raw if buffering == 0 else io.BufferedReader(raw)

    monkeypatch.setattr(pth_mod, "open", counting_open, raising=False)
    CountingFileIO.total = 0
    ckpt = PthCheckpoint(path)
    assert CountingFileIO.total < 64_000, CountingFileIO.total  # the pickles and 4 count records, not the data
    calls = []
    real = pth_mod._LegacyFile.read_range

    def spy(self, name, lo, hi):
        calls.append((name, lo, hi))
        return real(self, name, lo, hi)

    monkeypatch.setattr(pth_mod._LegacyFile, "read_range", spy)
    CountingFileIO.total = 0
    np.testing.assert_array_equal(np.array(ckpt.get("part")), np.arange(100, 110, dtype=np.float32))
    assert calls == [(ckpt.info("big").storage_key, 400, 440)]  # only the 10 floats the view covers
    assert CountingFileIO.total < 64_000
    np.testing.assert_array_equal(ckpt.read_range("ints", 299_990, 10), np.arange(299_990, 300_000))
    np.testing.assert_array_equal(ckpt.get_numpy("other"), sd["other"].numpy())


class HandStorage:
    """A storage in a hand-written legacy file (the format of PyTorch releases that saved storage views)."""

    def __init__(self, key, storage_type, numel, view=None):
        self.key, self.storage_type, self.numel, self.view = key, storage_type, numel, view


class HandTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class HandLegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, HandStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel, obj.view)
        return None


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def write_hand_legacy(path, obj, keys, records: bytes, sys_info=SYS_INFO):
    buf = io.BytesIO()
    for head in (LEGACY_MAGIC, 1001, sys_info):
        pickle.dump(head, buf, protocol=2)
    HandLegacyPickler(buf, protocol=2).dump(obj)
    pickle.dump(keys, buf, protocol=2)
    path.write_bytes(buf.getvalue() + records)
    return path


def test_legacy_storage_view_metadata_matches_torch(tmp_path):
    root = np.arange(20, dtype=np.float32)
    records = struct.pack("<q", 20) + root.tobytes() + struct.pack("<q", 4) + np.arange(4, dtype=np.int64).tobytes()
    whole = HandStorage("100", torch.FloatStorage, 20)
    view_a = HandStorage("100", torch.FloatStorage, 20, ("101", 5, 10))  # elements 5..14 of storage 100
    view_b = HandStorage("100", torch.FloatStorage, 20, ("102", 12, 8))  # elements 12..19
    longs = HandStorage("7", torch.LongStorage, 4)
    obj = {
        "whole": HandTensor(whole, 2, (3, 4), (4, 1)),
        "a": HandTensor(view_a, 1, (2, 3), (1, 3)),  # strided, inside the view
        "b": HandTensor(view_b, 0, (8,), (1,)),
        "b_tail": HandTensor(view_b, 6, (2,), (1,)),
        "longs": HandTensor(longs, 0, (2, 2), (2, 1)),
    }
    path = write_hand_legacy(tmp_path / "views.pth", obj, ["100", "7"], records)
    want = torch.load(path, weights_only=False)  # our own file: torch's legacy loader is the reference
    ckpt = PthCheckpoint(path)
    assert ckpt.format == "legacy" and ckpt.keys() == list(obj)
    for k, t in want.items():
        assert_reads_back(ckpt, k, t)
        np.testing.assert_array_equal(ckpt.read_range(k, 1, t.numel() - 1), t.reshape(-1)[1:].numpy())
    assert ckpt.info("a").storage_key == "100" and ckpt.info("a").storage_offset == 6
    assert ckpt.info("b_tail").storage_offset == 18

    # a tensor reaching past the end of its view is refused, even though the root storage would hold it
    bad = {"a": HandTensor(view_a, 5, (6,), (1,))}
    write_hand_legacy(tmp_path / "past_view.pth", bad, ["100"], struct.pack("<q", 20) + root.tobytes())
    with pytest.raises(MlxVideoError, match="reaches byte 44 of storage '100', which has 40"):
        PthCheckpoint(tmp_path / "past_view.pth")
    # a view outside its storage
    outside = {"a": HandTensor(HandStorage("100", torch.FloatStorage, 20, ("101", 15, 10)), 0, (1,), (1,))}
    write_hand_legacy(tmp_path / "outside.pth", outside, ["100"], struct.pack("<q", 20) + root.tobytes())
    with pytest.raises(MlxVideoError, match="malformed storage view"):
        PthCheckpoint(tmp_path / "outside.pth")


def test_legacy_storage_record_mismatches(tmp_path):
    data = np.arange(6, dtype=np.float32).tobytes()
    s = HandStorage("1", torch.FloatStorage, 6)
    obj = {"w": HandTensor(s, 0, (6,), (1,))}
    ok = write_hand_legacy(tmp_path / "ok.pth", obj, ["1"], struct.pack("<q", 6) + data)
    np.testing.assert_array_equal(PthCheckpoint(ok).get_numpy("w"), np.arange(6, dtype=np.float32))
    write_hand_legacy(tmp_path / "count.pth", obj, ["1"], struct.pack("<q", 5) + data)
    with pytest.raises(MlxVideoError, match=r"corrupt: storage '1' \(1 of 1\) holds 5 elements .* 6 by its storage record"):
        PthCheckpoint(tmp_path / "count.pth")
    write_hand_legacy(tmp_path / "nodata.pth", obj, [], b"")
    with pytest.raises(MlxVideoError, match="incomplete: storage '1' is used but has no data"):
        PthCheckpoint(tmp_path / "nodata.pth")
    write_hand_legacy(tmp_path / "extra.pth", obj, ["1", "2"], struct.pack("<q", 6) + data)
    with pytest.raises(MlxVideoError, match="names '2', which no tensor uses"):
        PthCheckpoint(tmp_path / "extra.pth")
    write_hand_legacy(tmp_path / "twice.pth", obj, ["1", "1"], struct.pack("<q", 6) + data)
    with pytest.raises(MlxVideoError, match="names a storage twice"):
        PthCheckpoint(tmp_path / "twice.pth")
    write_hand_legacy(tmp_path / "notlist.pth", obj, {"1": 1}, struct.pack("<q", 6) + data)
    with pytest.raises(MlxVideoError, match="not a list of strings"):
        PthCheckpoint(tmp_path / "notlist.pth")
    clash = {"w": HandTensor(s, 0, (6,), (1,)), "v": HandTensor(HandStorage("1", torch.HalfStorage, 6), 0, (6,), (1,))}
    write_hand_legacy(tmp_path / "clash.pth", clash, ["1"], struct.pack("<q", 6) + data)
    with pytest.raises(MlxVideoError, match="recorded twice with different types"):
        PthCheckpoint(tmp_path / "clash.pth")
    # a file written by an old PyTorch on a big-endian machine: the count in that machine's byte order
    big_endian_count = write_hand_legacy(
        tmp_path / "be.pth", obj, ["1"], struct.pack(">q", 6) + data, sys_info={**SYS_INFO, "little_endian": False}
    )
    np.testing.assert_array_equal(PthCheckpoint(big_endian_count).get_numpy("w"), np.arange(6, dtype=np.float32))
    # the header pickles themselves
    bad_magic = tmp_path / "bad_magic.pth"
    bad_magic.write_bytes(pickle.dumps(12345, protocol=2) + ok.read_bytes()[15:])
    with pytest.raises(MlxVideoError, match="does not begin with the magic number"):
        PthCheckpoint(bad_magic)
    parts, records = legacy_parts(ok.read_bytes())
    bad_version = tmp_path / "bad_version.pth"
    bad_version.write_bytes(parts[0] + pickle.dumps(1002, protocol=2) + b"".join(parts[2:]) + records)
    with pytest.raises(MlxVideoError, match="unknown legacy torch.save protocol version 1002"):
        PthCheckpoint(bad_version)


def test_legacy_whole_module_is_refused(tmp_path):
    # older checkpoints often pickled the model object itself; torch.load would import and rebuild its classes
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when it cannot save a class's source
        path = save_legacy(net, tmp_path / "net.pth")
    with pytest.raises(MlxVideoError, match=r"refusing to load .*torch\.nn\.modules\.container\.Sequential"):
        PthCheckpoint(path)


@pytest.mark.parametrize("payload_cls, global_name", [(RunsShell, os.system.__module__ + ".system"), (RunsEval, "builtins.eval")])
@pytest.mark.parametrize("where", ["saved object", "magic", "version", "sys info", "object pickle", "key list"])
def test_legacy_malicious_pickles_are_refused_and_never_run(tmp_path, payload_cls, global_name, where):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(payload_cls(control), protocol=2))
    assert control.exists()  # the payload is live: a plain pickle load runs it

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if where == "saved object":  # torch.save itself writes the payload into an otherwise valid file
        save_legacy({"w": torch.ones(3), "x": payload_cls(marker)}, path)
    else:
        good = save_legacy({"w": torch.ones(3)}, tmp_path / "good.pth")
        parts, records = legacy_parts(good.read_bytes())
        index = ["magic", "version", "sys info", "object pickle", "key list"].index(where)
        parts[index] = pickle.dumps({"w": payload_cls(marker)} if index == 3 else payload_cls(marker), protocol=2)
        path.write_bytes(b"".join(parts) + records)
    with pytest.raises(MlxVideoError) as e:
        PthCheckpoint(path)
    assert global_name in str(e.value) and "refusing to load" in str(e.value)
    assert not marker.exists()
    # and through the converter's container
    from mlx_video.convert.formats import open_tensors

    with pytest.raises(MlxVideoError, match="refusing to load"):
        open_tensors(path, "vae")
    assert not marker.exists()


def test_legacy_persistent_id_outside_the_saved_object_is_refused(tmp_path):
    good = save_legacy({"w": torch.ones(3)}, tmp_path / "good.pth")
    parts, records = legacy_parts(good.read_bytes())
    parts[4] = parts[3]  # the key list replaced by a pickle holding storage records
    path = tmp_path / "pid.pth"
    path.write_bytes(b"".join(parts) + records)
    with pytest.raises(MlxVideoError, match="unexpected persistent record .* outside the saved object"):
        PthCheckpoint(path)


def test_legacy_truncated_anywhere(tmp_path):
    good = save_legacy({"w": torch.randn(3, 4), "b": torch.arange(3), "h": torch.randn(5).half()}, tmp_path / "good.pth")
    data = good.read_bytes()
    parts, _ = legacy_parts(data)
    starts = np.cumsum([0] + [len(p) for p in parts]).tolist()
    pickles_end = starts[-1]
    PthCheckpoint(good)  # the whole file reads
    for cut in range(1, len(data)):
        bad = tmp_path / "cut.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(MlxVideoError, match="truncated") as e:
            PthCheckpoint(bad)
        message = str(e.value)
        if cut < starts[1]:
            assert "inside its first pickle" in message, (cut, message)
        elif cut < pickles_end:
            which = ["protocol version", "system information", "saved object", "storage key list"][
                max(i for i in range(4) if cut >= starts[i + 1])
            ]
            assert f"cannot parse its {which} pickle" in message, (cut, message)
        else:
            assert "before the data of storage" in message or "the file has" in message, (cut, message)


def test_legacy_file_through_the_converter_container(tmp_path):
    from mlx_video.convert.formats import open_tensors

    base = torch.randn(6, 4)
    sd = {"w": base, "t": base.t(), "bf": torch.randn(5, 3).bfloat16(), "scalar": torch.tensor(2.0), "u8": torch.arange(8, dtype=torch.uint8)}
    for name, legacy in (("z.pth", False), ("l.pth", True)):
        path = tmp_path / name
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        tensors = open_tensors(path, "vae")
        assert tensors.keys() == list(sd) and tensors.shape("t") == (4, 6) and tensors.code("bf") == "BF16"
        for k, t in sd.items():
            got = tensors.read(k)
            if t.dtype == torch.bfloat16:
                got = got.astype(mx.float32)
            np.testing.assert_array_equal(np.array(got), t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
        np.testing.assert_array_equal(np.array(tensors.read("w", 2, 5)), base[2:5].numpy())
        np.testing.assert_array_equal(np.array(tensors.read("t", 1, 3)), base.t()[1:3].numpy())
        np.testing.assert_array_equal(np.array(tensors.read("bf", 4, 5).astype(mx.float32)), sd["bf"][4:5].float().numpy())
