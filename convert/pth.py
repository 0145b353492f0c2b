"""A safe, lazy reader for PyTorch checkpoints written by `torch.save`, in both of its formats.

* The zip format (the default since PyTorch 1.6) is a zip archive holding `<archive>/data.pkl` (a pickle
  describing the saved object) and one entry `<archive>/data/<key>` per tensor storage with its raw bytes.
* The legacy format (`_use_new_zipfile_serialization=False`, and everything saved before 1.6) is a plain
  sequence in one file: a pickled magic number, a pickled protocol version (1001), a pickled dict of system
  information, the pickle of the saved object, a pickled list of storage keys, then for each of those keys
  in that order an 8-byte little-endian element count followed by the storage's raw (little-endian) bytes.
  Opening such a file parses the five pickles and walks the storage records by their counts, seeking over
  the data, so that each storage's byte offset is known without reading it.

A normal pickle load can run any code the file names, so it is never done here: every pickle of either
format goes through an unpickler that resolves only a short allowlist of globals -- the functions PyTorch
uses to rebuild tensors and parameters, the typed storage classes, dtype objects, `collections.OrderedDict`,
`torch.Size` and the `_codecs.encode` that protocol 2 uses for `bytes` -- and each is replaced by our own
stand-in. The real functions are never imported, torch is not needed, and any other global stops the load
with an `MlxVideoError` naming it.

The pickle yields tensor *references* (storage key, dtype, size, stride, storage offset). Bytes are
read only when a tensor is asked for, and only the span of its storage that it covers, so opening a
10 GB checkpoint costs the zip directory (or the storage records) and the pickle.

What `get(key)` returns (an `mx.array`, always a fresh copy laid out contiguously):

* floating and integer tensors keep their dtype, bfloat16 included (`mx.bfloat16`);
* float64 is narrowed to float32 (MLX has no float64 on the GPU), as our safetensors reader does;
* float8 tensors (`float8_e4m3fn`, `float8_e5m2`) come back as their raw uint8 codes: decode them with
  `mlx_video.convert.fp8`. `info(key).dtype` tells which format they are.

`get_numpy(key)` returns the same data as numpy, with float64 kept, bfloat16 as raw uint16 bit
patterns and float8 as uint8 codes (numpy has neither type); `read_range(key, first, count)` returns a
run of a tensor's elements the same way, reading only those bytes when the tensor is contiguous.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import operator
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError

# torch dtype name -> (bytes per element, numpy dtype holding the raw elements)
_DTYPES: dict[str, tuple[int, type]] = {
    "float32": (4, np.float32),
    "float64": (8, np.float64),
    "float16": (2, np.float16),
    "bfloat16": (2, np.uint16),
    "int64": (8, np.int64),
    "int32": (4, np.int32),
    "int16": (2, np.int16),
    "int8": (1, np.int8),
    "uint8": (1, np.uint8),
    "bool": (1, np.bool_),
    "float8_e4m3fn": (1, np.uint8),
    "float8_e5m2": (1, np.uint8),
}

# names under which `torch.<name>` denotes a dtype we can read (aliases included)
_TORCH_DTYPE_NAMES = {
    **{name: name for name in _DTYPES},
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}

# the legacy typed storage classes `torch.<Name>Storage` and the dtype each holds
_TYPED_STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

DEFAULT_NESTED_KEYS = ("state_dict", "module", "model")

# Bounds on what a small file can make us hold (each refused with a message saying so):
# a tensor may repeat its storage's bytes (a stride-0 `expand`, saved as such) up to this many bytes ...
MAX_EXPANDED_VIEW_BYTES = 1 << 20
# ... the saved object may hold this many containers and values (a state dict holds a few per tensor) ...
MAX_OBJECTS = 1_000_000
# ... its pickle may be this long (a state dict's pickle is about 100 bytes per tensor) ...
MAX_PICKLE_BYTES = 64 << 20
# ... and a compressed zip entry may declare at most deflate's largest ratio (about 1032:1) of its stored size.
MAX_DEFLATE_RATIO = 1100

# the first two pickles of a legacy-format file (torch/serialization.py: MAGIC_NUMBER, PROTOCOL_VERSION)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class PthTensorInfo:
    dtype: str  # torch dtype name, e.g. "bfloat16", "float8_e4m3fn"
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements, as torch stores it
    storage_offset: int  # in elements
    storage_key: str  # the `data/<key>` entry that holds the bytes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


# ---------------------------------------------------------------------------------------------------
# stand-ins for the objects the pickle may name. None of them is callable by the pickle except through
# the functions the unpickler hands out, and none accepts BUILD (`__setstate__` refuses).


class _Inert:
    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the pickle tries to set state on a {type(self).__name__}")


class _Callable(_Inert):
    """Wraps each function the pickle may call, so that BUILD cannot reach the function object."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _DtypeRef(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _StorageType(_Inert):
    __slots__ = ("dtype",)  # None for UntypedStorage (bytes)

    def __init__(self, dtype: str | None):
        self.dtype = dtype


class _StorageRef(_Inert):
    __slots__ = ("key", "nbytes", "dtype", "base")

    def __init__(self, key: str, nbytes: int, dtype: str | None, base: int = 0):
        self.key = key  # the storage whose bytes these are
        self.nbytes = nbytes  # how many bytes a tensor on this storage may reach, from `base`
        self.dtype = dtype  # the element type of a typed storage; None for an untyped (byte) storage
        self.base = base  # byte offset into the storage: nonzero only for a legacy storage view


class _TensorRef(_Inert):
    __slots__ = ("info",)

    def __init__(self, info: PthTensorInfo):
        self.info = info


def _is_int(x) -> bool:
    return type(x) is int


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to rebuild `bytes` objects."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("unexpected use of _codecs.encode")
    return text.encode("latin1")


def _torch_size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(_is_int(d) for d in dims):
        raise pickle.UnpicklingError("malformed torch.Size")
    return tuple(dims)


def _corrupt(path: Path, why: str) -> MlxVideoError:
    return MlxVideoError(f"{path} is corrupt: {why}")


def _storage_itemsize(dtype: str | None) -> int:
    """Bytes per element of a storage: its dtype's, or 1 for an untyped (byte) storage."""
    return _DTYPES[dtype][0] if dtype else 1


def _parse_storage_record(pid, path: Path, legacy: bool) -> tuple[_StorageType, str, int, tuple | None]:
    """(storage type, key, element count, view metadata) of a persistent id naming a storage.

    The zip format writes ("storage", type, key, location, numel); the legacy format adds a sixth item,
    None or -- in files from PyTorch versions that saved storage views -- (view key, offset, numel) in
    elements of the storage type. The location (a device name) is not used: everything is read to the CPU.
    """
    if legacy and _record_kind(pid) == "module":
        raise MlxVideoError(f"refusing to load {path}: it holds a pickled nn.Module object, not a state dict")
    if _record_kind(pid) != "storage" or len(pid) not in ((5, 6) if legacy else (5,)):
        raise _corrupt(path, f"unexpected persistent record {pid!r:.200}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType) or type(key) is not str or not _is_int(numel) or numel < 0:
        raise _corrupt(path, f"malformed storage record {pid!r:.200}")
    if view is not None and not _is_view_record(view, numel):
        raise _corrupt(path, f"malformed storage view {view!r:.200} of storage {key!r} ({numel} elements)")
    return storage_type, key, numel, view


def _record_kind(pid) -> str | None:
    """The first item of a persistent id tuple when it is a plain str ("storage", "module"), else None."""
    return pid[0] if isinstance(pid, tuple) and pid and type(pid[0]) is str else None


def _is_view_record(view, numel: int) -> bool:
    """(view key, offset, numel) inside a storage of `numel` elements."""
    return (
        isinstance(view, tuple)
        and len(view) == 3
        and type(view[0]) is str
        and all(_is_int(v) and v >= 0 for v in view[1:])
        and view[1] + view[2] <= numel
    )


def _is_c_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether elements laid out with `stride` are in C order with no gaps (size-1 dimensions ignored)."""
    step = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size == 1:
            continue
        if st != step:
            return False
        step *= size
    return True


# ---------------------------------------------------------------------------------------------------
# the archive


@dataclass
class _Entry:
    info: zipfile.ZipInfo
    data_offset: int | None = None  # absolute file offset of a stored entry's bytes, once located


class _Archive:
    """The zip container: its entry table, and byte-range reads from the storage entries."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise MlxVideoError(f"missing checkpoint file: {path}")
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.startswith(b"PK"):
            raise MlxVideoError(f"{path} is not a PyTorch checkpoint: it is not a zip archive")
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            raise MlxVideoError(f"{path} is truncated or corrupt: it is not a complete zip archive ({e})") from None
        self.entries = {i.filename: _Entry(i) for i in infos}
        for info in infos:
            self._check_entry_sizes(info)
        roots = sorted(n[: -len("/data.pkl")] for n in self.entries if n.endswith("/data.pkl") and n.count("/") == 1)
        if not roots:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in self.entries):
                raise MlxVideoError(f"{path} is a TorchScript archive, not a saved state dict")
            raise MlxVideoError(f"{path} is a zip archive but not a PyTorch checkpoint: it has no <name>/data.pkl")
        if len(roots) > 1:
            raise MlxVideoError(f"{path} holds several pickles ({', '.join(roots)}); expected one torch.save archive")
        self.prefix = roots[0]
        byteorder = self.entries.get(f"{self.prefix}/byteorder")
        self.byteorder = "little"
        if byteorder is not None:
            value = self.read_entry(f"{self.prefix}/byteorder").decode("ascii", "replace").strip()
            if value not in ("little", "big"):
                raise MlxVideoError(f"{path}: unknown byte order {value!r}")
            self.byteorder = value

    def _check_entry_sizes(self, info: zipfile.ZipInfo) -> None:
        """An entry's sizes are possible: stored bytes within the file, a deflated entry no larger than deflate
        can expand to. PyTorch writes entries uncompressed; a re-zipped checkpoint is deflated."""
        name = info.filename
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise MlxVideoError(f"{self.path}: entry {name} is compressed with method {info.compress_type}; "
                                "mlxvid reads stored or deflated entries")
        if info.compress_size > self.size:
            raise MlxVideoError(f"{self.path} is truncated: entry {name} claims {info.compress_size} bytes, "
                                f"the file has {self.size}")
        deflated = info.compress_type == zipfile.ZIP_DEFLATED
        if deflated and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise _corrupt(self.path, f"entry {name} claims to expand {info.compress_size} bytes into "
                                      f"{info.file_size}, more than deflate can")

    def data_name(self, key: str) -> str:
        return f"{self.prefix}/data/{key}"

    def resolve_storage(self, pid) -> _StorageRef:
        """The storage a persistent id of data.pkl names, checked against its data/<key> entry."""
        storage_type, key, numel, _ = _parse_storage_record(pid, self.path, legacy=False)
        nbytes = numel * _storage_itemsize(storage_type.dtype)
        name = self.data_name(key)
        entry = self.entries.get(name)
        if entry is None:
            raise MlxVideoError(f"{self.path} is incomplete: storage {key!r} has no entry {name}")
        if entry.info.file_size != nbytes:
            raise _corrupt(self.path, f"entry {name} holds {entry.info.file_size} bytes, its record says {nbytes}")
        return _StorageRef(key, nbytes, storage_type.dtype)

    def read_entry(self, name: str) -> bytes:
        info = self.entries[name].info
        return self.read_range(name, 0, info.file_size).tobytes()

    def _locate(self, entry: _Entry) -> int:
        if entry.data_offset is None:
            info = entry.info
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise MlxVideoError(f"{self.path} is truncated or corrupt: bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            entry.data_offset = info.header_offset + 30 + name_len + extra_len
        return entry.data_offset

    def read_range(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Bytes [lo, hi) of the uncompressed entry `name`, as a fresh, writable uint8 array."""
        entry = self.entries[name]
        info = entry.info
        if info.flag_bits & 0x1:
            raise MlxVideoError(f"{self.path}: entry {name} is encrypted")
        if not 0 <= lo <= hi <= info.file_size:
            raise MlxVideoError(f"{self.path}: read of bytes {lo}..{hi} outside entry {name} ({info.file_size} bytes)")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise MlxVideoError(f"{self.path} is corrupt: stored entry {name} has inconsistent sizes")
            start = self._locate(entry)
            if start + info.file_size > self.size:
                raise MlxVideoError(f"{self.path} is truncated: entry {name} runs past the end of the file")
            with open(self.path, "rb") as f:
                f.seek(start + lo)
                out = np.empty(hi - lo, dtype=np.uint8)
                got = f.readinto(memoryview(out))
            if got != hi - lo:
                raise MlxVideoError(f"{self.path} is truncated: entry {name} is incomplete")
            return out
        # PyTorch always stores entries uncompressed; a re-zipped file is decompressed as a stream, up to byte
        # `hi` only, holding one chunk besides the bytes asked for.
        out = np.empty(hi - lo, dtype=np.uint8)
        try:
            with zipfile.ZipFile(self.path) as z, z.open(info) as f:
                skip = lo
                while skip:
                    chunk = f.read(min(skip, 1 << 20))
                    if not chunk:
                        break
                    skip -= len(chunk)
                got = f.readinto(memoryview(out)) if hi > lo else 0
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError, zlib.error) as e:
            raise MlxVideoError(f"{self.path}: cannot read entry {name} ({e})") from None
        if got != hi - lo:
            raise MlxVideoError(f"{self.path} is truncated or corrupt: entry {name} is incomplete")
        return out


# ---------------------------------------------------------------------------------------------------
# the restricted unpickler


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles one pickle from `file` with only the allowlisted globals.

    `resolve_storage` turns a persistent id (a storage record) into a `_StorageRef`; None refuses persistent
    ids, as in the legacy format's pickles other than the saved object's.
    """

    def __init__(self, file, path: Path, resolve_storage=None):
        super().__init__(file)
        self.path = path
        self._resolve_storage = resolve_storage
        self._allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor"): _Callable(self._rebuild_tensor_v1),
            ("torch._utils", "_rebuild_tensor_v2"): _Callable(self._rebuild_tensor_v2),
            ("torch._utils", "_rebuild_tensor_v3"): _Callable(self._rebuild_tensor_v3),
            ("torch._utils", "_rebuild_parameter"): _Callable(self._rebuild_parameter),
            ("torch._utils", "_rebuild_parameter_with_state"): _Callable(self._rebuild_parameter),
            ("torch", "Size"): _Callable(_torch_size),
            ("_codecs", "encode"): _Callable(_latin1_encode),
            ("torch", "UntypedStorage"): _StorageType(None),
            ("torch.storage", "UntypedStorage"): _StorageType(None),
        }
        for name, dtype in _TYPED_STORAGES.items():
            self._allowed[("torch", name)] = _StorageType(dtype)
        for name, dtype in _TORCH_DTYPE_NAMES.items():
            self._allowed[("torch", name)] = _DtypeRef(dtype)

    def _fail(self, why: str) -> MlxVideoError:
        return _corrupt(self.path, why)

    def find_class(self, module, name):
        # Names are matched exactly as written in the stream: Python 2 spellings are not translated.
        found = self._allowed.get((module, name))
        if found is None:
            shown = f"{module}.{name}"
            py3 = _compat_pickle.NAME_MAPPING.get((module, name)) or (
                _compat_pickle.IMPORT_MAPPING.get(module, module),
                name,
            )
            if py3 != (module, name):
                shown += f" (that is, {py3[0]}.{py3[1]})"
            raise MlxVideoError(
                f"refusing to load {self.path}: it references {shown}, which is not a tensor or a plain container"
            )
        return found

    def persistent_load(self, pid):
        if self._resolve_storage is None:
            raise self._fail(f"unexpected persistent record {pid!r:.200} outside the saved object")
        return self._resolve_storage(pid)

    def _make_tensor(self, storage, offset, size, stride, dtype: str) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise self._fail("a tensor is rebuilt from something that is not a storage")
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
            raise self._fail("a tensor has malformed size or stride")
        if not all(_is_int(v) and v >= 0 for v in (offset, *size, *stride)):
            raise self._fail("a tensor has a negative or non-integer size, stride or offset")
        itemsize = _DTYPES[dtype][0]
        if storage.base % itemsize:
            raise self._fail(f"a {dtype} tensor starts at byte {storage.base} of storage {storage.key!r}, mid-element")
        if all(size):  # non-empty: the last element it reaches must lie inside the storage (or storage view)
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if (last + 1) * itemsize > storage.nbytes:
                raise self._fail(
                    f"a tensor of shape {list(size)} reaches byte {(last + 1) * itemsize} of storage "
                    f"{storage.key!r}, which has {storage.nbytes}"
                )
            nbytes = itemsize
            for s in size:
                nbytes *= s
            if nbytes > max(storage.nbytes, MAX_EXPANDED_VIEW_BYTES):
                raise self._fail(
                    f"a tensor of shape {list(size)} ({nbytes} bytes) is a view repeating the {storage.nbytes} "
                    f"bytes of storage {storage.key!r}; mlxvid reads such expanded views up to "
                    f"{MAX_EXPANDED_VIEW_BYTES} bytes"
                )
        return _TensorRef(PthTensorInfo(dtype, size, stride, storage.base // itemsize + offset, storage.key))

    def _rebuild_tensor_v1(self, storage, storage_offset, size, stride):
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, _StorageRef):
            raise self._fail("a tensor is rebuilt from something that is not a storage")
        if storage.dtype is None:
            raise self._fail("an untyped storage is used without a dtype")
        return self._make_tensor(storage, storage_offset, size, stride, storage.dtype)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        if not isinstance(dtype, _DtypeRef):
            raise self._fail("a tensor names something that is not a supported dtype")
        return self._make_tensor(storage, storage_offset, size, stride, dtype.name)

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None, state=None):
        if not isinstance(data, _TensorRef):
            raise self._fail("a parameter wraps something that is not a tensor")
        return data


def _load_pickle(archive: _Archive):
    name = f"{archive.prefix}/data.pkl"
    if archive.entries[name].info.file_size > MAX_PICKLE_BYTES:
        raise MlxVideoError(f"{archive.path}: its {name} claims {archive.entries[name].info.file_size} bytes; "
                            f"mlxvid reads pickles up to {MAX_PICKLE_BYTES} bytes (a state dict's is far smaller)")
    data = archive.read_entry(name)
    try:
        return _SafeUnpickler(io.BytesIO(data), archive.path, archive.resolve_storage).load()
    except MlxVideoError:
        raise
    except RecursionError:
        raise MlxVideoError(f"{archive.path} is corrupt: its pickle nests too deeply") from None
    except Exception as e:  # whatever the pickle machine raises on a malformed or hostile stream
        raise MlxVideoError(f"{archive.path} is corrupt: cannot parse its data.pkl ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------
# the legacy (pre-1.6) format


@dataclass
class _LegacyStorage:
    dtype: str | None  # as its first record names it; None: untyped (bytes)
    nbytes: int
    data_offset: int = -1  # absolute file offset of its bytes, once the storage records are walked


class _LegacyFile:
    """A legacy-format file: its pickles, parsed safely, and byte-range reads from its storages.

    It offers what `PthCheckpoint` uses of `_Archive` (`path`, `byteorder`, `data_name`, `read_range`), with a
    storage's key as its entry name. The legacy writer converts every storage to little-endian on save.
    """

    byteorder = "little"

    def __init__(self, path: Path, head: bytes):
        self.path = path
        self.size = path.stat().st_size
        self.storages: dict[str, _LegacyStorage] = {}
        with open(path, "rb") as f:
            self._check_magic(f, head)
            version = self._load(f, "protocol version")
            if version != _LEGACY_PROTOCOL:
                raise MlxVideoError(
                    f"{path}: unknown legacy torch.save protocol version {version!r:.50} (expected {_LEGACY_PROTOCOL})"
                )
            sys_info = self._load(f, "system information")
            if not isinstance(sys_info, dict):
                raise _corrupt(path, f"its system information is a {type(sys_info).__name__}, not a dict")
            self.root = self._load(f, "saved object", self.resolve_storage)
            keys = self._load(f, "storage key list")
            records_start = f.tell()
        self._check_keys(keys)
        self._walk(keys, records_start, count_may_be_big_endian=sys_info.get("little_endian", True) is False)

    def _load(self, f, what: str, resolve_storage=None):
        try:
            return _SafeUnpickler(f, self.path, resolve_storage).load()
        except MlxVideoError:
            raise
        except RecursionError:
            raise _corrupt(self.path, f"its {what} pickle nests too deeply") from None
        except Exception as e:  # whatever the pickle machine raises on a cut, malformed or hostile stream
            raise MlxVideoError(
                f"{self.path} is truncated or corrupt: cannot parse its {what} pickle ({type(e).__name__}: {e})"
            ) from None

    def _check_magic(self, f, head: bytes) -> None:
        not_torch = (
            f"{self.path} is not a PyTorch checkpoint: it is not a zip archive, and does not begin with the "
            "magic number of torch.save's legacy format"
        )
        try:
            magic = _SafeUnpickler(f, self.path).load()
        except MlxVideoError:
            raise
        except Exception:
            # a file cut inside the first pickle still starts like one
            protocols = range(pickle.HIGHEST_PROTOCOL + 1)
            if any(pickle.dumps(_LEGACY_MAGIC, protocol=p).startswith(head) for p in protocols):
                raise MlxVideoError(f"{self.path} is truncated: it ends inside its first pickle") from None
            raise MlxVideoError(not_torch) from None
        if not _is_int(magic) or magic != _LEGACY_MAGIC:
            raise MlxVideoError(not_torch)

    def resolve_storage(self, pid) -> _StorageRef:
        """The storage a persistent id of the saved object names; the first record of a key defines it."""
        storage_type, key, numel, view = _parse_storage_record(pid, self.path, legacy=True)
        itemsize = _storage_itemsize(storage_type.dtype)
        nbytes = numel * itemsize
        known = self.storages.get(key)
        if known is None:
            self.storages[key] = _LegacyStorage(storage_type.dtype, nbytes)
        elif known.dtype != storage_type.dtype or known.nbytes != nbytes:
            raise _corrupt(self.path, f"storage {key!r} is recorded twice with different types or sizes")
        if view is None:
            return _StorageRef(key, nbytes, storage_type.dtype)
        _view_key, offset, view_numel = view
        return _StorageRef(key, view_numel * itemsize, storage_type.dtype, base=offset * itemsize)

    def _check_keys(self, keys) -> None:
        if not isinstance(keys, list) or not all(type(k) is str for k in keys):
            raise _corrupt(self.path, "its storage key list is not a list of strings")
        if len(set(keys)) != len(keys):
            raise _corrupt(self.path, "its storage key list names a storage twice")
        for key in keys:
            if key not in self.storages:
                raise _corrupt(self.path, f"its storage key list names {key!r:.100}, which no tensor uses")
        listed = set(keys)
        for key in self.storages:
            if key not in listed:
                raise MlxVideoError(f"{self.path} is incomplete: storage {key!r} is used but has no data")

    def _walk(self, keys: list[str], pos: int, count_may_be_big_endian: bool) -> None:
        """Locate each storage's bytes: a count, then the data, for each key in order. Seeks over the data
        (unbuffered, so that only the 8 bytes of each count are read)."""
        with open(self.path, "rb", buffering=0) as f:
            for i, key in enumerate(keys):
                storage = self.storages[key]
                where = f"storage {key!r} ({i + 1} of {len(keys)})"
                f.seek(pos)
                head = f.read(8)
                if len(head) != 8:
                    raise MlxVideoError(
                        f"{self.path} is truncated: it ends at byte {self.size}, before the data of {where}"
                    )
                itemsize = _storage_itemsize(storage.dtype)
                count = int.from_bytes(head, "little")
                if count * itemsize != storage.nbytes:
                    # old PyTorch releases wrote the count in the saving machine's byte order (the data itself
                    # was always converted to little-endian), so a big-endian saver's count reads either way
                    if not (count_may_be_big_endian and int.from_bytes(head, "big") * itemsize == storage.nbytes):
                        raise _corrupt(
                            self.path,
                            f"{where} holds {count} elements of {itemsize} bytes by its data record, "
                            f"{storage.nbytes // itemsize} by its storage record",
                        )
                storage.data_offset = pos + 8
                pos = storage.data_offset + storage.nbytes
                if pos > self.size:
                    raise MlxVideoError(
                        f"{self.path} is truncated: the data of {where} runs to byte {pos}, the file has {self.size}"
                    )

    def data_name(self, key: str) -> str:
        return key

    def read_range(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Bytes [lo, hi) of the storage `name`, as a fresh, writable uint8 array."""
        storage = self.storages[name]
        if not 0 <= lo <= hi <= storage.nbytes:
            raise MlxVideoError(
                f"{self.path}: read of bytes {lo}..{hi} outside storage {name!r} ({storage.nbytes} bytes)"
            )
        out = np.empty(hi - lo, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(storage.data_offset + lo)
            got = f.readinto(memoryview(out))
        if got != hi - lo:
            raise MlxVideoError(f"{self.path} is truncated: storage {name!r} is incomplete")
        return out


def _open(path: Path):
    """(the container, the saved object of references) of a checkpoint in either format."""
    if not path.is_file():
        raise MlxVideoError(f"missing checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        archive = _Archive(path)
        return archive, _load_pickle(archive)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise MlxVideoError(
            f"{path} is in PyTorch's oldest, tar-based checkpoint format, which is not supported: re-save it "
            "with a recent PyTorch (torch.save(torch.load(old), new)) or use a .safetensors release"
        )
    if head[:1] in (b"\x80", b"L"):  # a pickle of a long integer: protocol 2 and later, or 0 and 1
        legacy = _LegacyFile(path, head)
        return legacy, legacy.root
    raise MlxVideoError(f"{path} is not a PyTorch checkpoint: it is not a zip archive")


# ---------------------------------------------------------------------------------------------------
# the public reader


def _children(node) -> list | None:
    """(name, child) pairs of a container the flattening descends into; None for a tensor or a plain value."""
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)) and node and any(isinstance(v, (dict, list, tuple, _TensorRef)) for v in node):
        return [(str(i), v) for i, v in enumerate(node)]
    return None


def _count_entries(node, path: Path, memo: dict, active: set, depth: int = 0) -> int:
    """How many names flattening `node` makes, each shared container counted once (memoised by identity), so
    that a pickle sharing one list at many places (`l = [l, l]` forty deep is 651 bytes, 2**40 paths) is
    measured in time linear in its size."""
    items = _children(node)
    if items is None:
        return 1
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active or depth > 64:
        raise MlxVideoError(f"{path} is corrupt: its saved object nests too deeply or contains itself")
    active.add(id(node))
    n = 0
    for _, child in items:
        n += _count_entries(child, path, memo, active, depth + 1)
    active.discard(id(node))
    memo[id(node)] = n
    return n


def _flatten_into(node, prefix: str, tensors: dict, extras: dict, path: Path) -> None:
    items = _children(node)
    if items is None:
        if prefix in tensors or prefix in extras:
            raise MlxVideoError(f"{path}: two entries flatten to the same key {prefix!r}")
        if isinstance(node, _TensorRef):
            tensors[prefix] = node.info
        else:
            extras[prefix] = node
        return
    for k, v in items:
        _flatten_into(v, f"{prefix}.{k}" if prefix else k, tensors, extras, path)


def _flatten(node, tensors: dict, extras: dict, path: Path) -> None:
    """The saved object as dotted names -> tensors (and other values); refused, before any name is made, when
    it would make more than MAX_OBJECTS names (counting every path through shared containers)."""
    n = _count_entries(node, path, {}, set())
    if n > MAX_OBJECTS:
        raise MlxVideoError(
            f"{path}: its saved object flattens to {n} entries (counted through shared containers), more than the "
            f"{MAX_OBJECTS} mlxvid reads; a state dict holds a few per tensor"
        )
    _flatten_into(node, "", tensors, extras, path)


class PthCheckpoint:
    """The tensors of one `torch.save` checkpoint, read on demand.

    `nested` picks a sub-dictionary as the state dict: a key of the saved dict ("module" for the
    official HunyuanVideo files), or a sequence of keys for deeper nesting; None takes the saved object
    as it is. `open_state_dict` picks it automatically.

    Keys are the dotted paths of all tensors under the chosen dict (nested dicts and lists are joined
    with "."). Values that are not tensors (ints, strings, None, ...) are kept in `extras`.
    """

    def __init__(self, path: str | Path, nested: str | Sequence[str] | None = None):
        self.path = Path(path)
        self._archive, self._root = _open(self.path)
        self._select(nested)

    @property
    def format(self) -> str:
        """The container: "zip" (torch.save since PyTorch 1.6) or "legacy" (older, or zip serialization off)."""
        return "legacy" if isinstance(self._archive, _LegacyFile) else "zip"

    def _select(self, nested) -> None:
        chain = () if nested is None else ((nested,) if isinstance(nested, str) else tuple(nested))
        node = self._root
        for i, key in enumerate(chain):
            if not isinstance(node, dict) or key not in node:
                where = "the saved object" if i == 0 else f"{'/'.join(chain[:i])!r}"
                have = ", ".join(repr(str(k)) for k in node) if isinstance(node, dict) else type(node).__name__
                raise MlxVideoError(f"{self.path}: {where} has no key {key!r} (it has: {have:.500})")
            node = node[key]
        if chain and not isinstance(node, dict):
            raise MlxVideoError(f"{self.path}: {'/'.join(chain)!r} is a {type(node).__name__}, not a dict of tensors")
        self.nested: tuple[str, ...] = chain
        self._tensors: dict[str, PthTensorInfo] = {}
        self.extras: dict[str, Any] = {}
        _flatten(node, self._tensors, self.extras, self.path)

    def top_level_keys(self) -> list[str]:
        """The keys of the saved object itself (before `nested` is applied), if it is a dict."""
        return [str(k) for k in self._root] if isinstance(self._root, dict) else []

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> PthTensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            raise MlxVideoError(f"{self.path} has no tensor {key!r}") from None

    def _read_elements(self, info: PthTensorInfo, first: int, count: int) -> np.ndarray:
        """Elements [first, first + count) of the tensor's storage (relative to its storage offset), in the
        file's byte order."""
        itemsize, np_dtype = _DTYPES[info.dtype]
        lo = (info.storage_offset + first) * itemsize
        raw = self._archive.read_range(self._archive.data_name(info.storage_key), lo, lo + count * itemsize)
        return raw.view(np.dtype(np_dtype).newbyteorder("<" if self._archive.byteorder == "little" else ">"))

    def get_numpy(self, key: str) -> np.ndarray:
        """The tensor as a contiguous numpy array (bfloat16 as uint16 bits, float8 as uint8 codes)."""
        info = self.info(key)
        itemsize, np_dtype = _DTYPES[info.dtype]
        if info.numel == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        extent = sum((s - 1) * st for s, st in zip(info.shape, info.stride))
        flat = self._read_elements(info, 0, extent + 1)
        if _is_c_contiguous(info.shape, info.stride):
            host = flat.reshape(info.shape)  # the common case: the bytes just read, no further copy
        else:
            host = np.lib.stride_tricks.as_strided(
                flat, shape=info.shape, strides=tuple(st * itemsize for st in info.stride), writeable=False
            )
        return host.astype(np.dtype(np_dtype), order="C", copy=not host.flags.c_contiguous or not host.flags.writeable)

    def read_range(self, key: str, first_element: int, count: int) -> np.ndarray:
        """Elements [first_element, first_element + count) of the tensor, counted in C order, as a 1-D numpy
        array of the types `get_numpy` gives.

        Only those bytes are read when the tensor is contiguous in its storage (as a state dict's tensors
        usually are), so that a large tensor can be read a few rows at a time; a strided tensor is read whole.
        """
        info = self.info(key)
        first_element, count = operator.index(first_element), operator.index(count)
        if not 0 <= first_element <= first_element + count <= info.numel:
            raise ValueError(
                f"elements {first_element}..{first_element + count} outside {key!r} ({info.numel} elements)"
            )
        np_dtype = np.dtype(_DTYPES[info.dtype][1])
        if count == 0:
            return np.zeros(0, dtype=np_dtype)
        if not _is_c_contiguous(info.shape, info.stride):
            return np.ascontiguousarray(self.get_numpy(key).reshape(-1)[first_element : first_element + count])
        host = self._read_elements(info, first_element, count)
        return host if host.dtype == np_dtype else host.astype(np_dtype)

    def get(self, key: str) -> mx.array:
        """The tensor as an MLX array: see the module docstring for the dtypes."""
        info = self.info(key)
        host = self.get_numpy(key)
        if info.dtype == "float64":
            host = host.astype(np.float32)
        arr = mx.array(host)
        return arr.view(mx.bfloat16) if info.dtype == "bfloat16" else arr

    def items(self) -> Iterator[tuple[str, mx.array]]:
        for key in self._tensors:
            yield key, self.get(key)


def open_state_dict(path: str | Path, candidates: Sequence[str] = DEFAULT_NESTED_KEYS) -> PthCheckpoint:
    """Open a checkpoint and descend into the state dict if it is wrapped (e.g. {"module": {...}}).

    The saved dict itself is used when any of its values is a tensor; otherwise the first key of
    `candidates` that holds a dict with tensors is used.
    """
    ckpt = PthCheckpoint(path)
    root = ckpt._root
    if not isinstance(root, dict) or any(isinstance(v, _TensorRef) for v in root.values()):
        return ckpt
    for key in candidates:
        sub = root.get(key)
        if isinstance(sub, dict):
            ckpt._select(key)
            if len(ckpt):
                return ckpt
    ckpt._select(None)
    return ckpt
