"""A strict, streaming reader for safetensors files and sharded folders.

Every tensor is read on its own, straight from the file into an MLX array, so that converting a model
never holds more than the tensor in hand. The header is validated before anything else is read: a
truncated or inconsistent file is refused with a message that names the file and the problem.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MlxVideoError

# safetensors dtype -> (bytes per element, numpy dtype used to read the raw bytes, MLX dtype after viewing)
_DTYPES = {
    "F64": (8, np.float64, mx.float32),  # MLX has no float64 on the GPU; read and narrow to fp32
    "F32": (4, np.float32, mx.float32),
    "F16": (2, np.float16, mx.float16),
    "BF16": (2, np.uint16, mx.bfloat16),
    "I64": (8, np.int64, mx.int64),
    "I32": (4, np.int32, mx.int32),
    "I16": (2, np.int16, mx.int16),
    "I8": (1, np.int8, mx.int8),
    "U8": (1, np.uint8, mx.uint8),
    "BOOL": (1, np.bool_, mx.bool_),
    # fp8 codes are kept as raw bytes; decoding them is the converter's job.
    "F8_E4M3": (1, np.uint8, mx.uint8),
    "F8_E5M2": (1, np.uint8, mx.uint8),
    "F8_E8M0": (1, np.uint8, mx.uint8),  # mxfp8 block scales (powers of two), decoded by convert/comfy_quant.py
}

MAX_HEADER_BYTES = 100 * 1024 * 1024

# bytes per element of every dtype the safetensors format (and MLX's writer) names: what a converted model's
# shards may hold (quantized weights are U32, for instance), checked when a model folder is opened
ITEMSIZES = {**{k: v[0] for k, v in _DTYPES.items()}, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
READABLE = {k: v[0] for k, v in _DTYPES.items()}  # what the converter reads from a checkpoint


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MlxVideoError(f"missing checkpoint file: {self.path}")
        self.tensors, self.metadata = _read_header(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def get(self, key: str) -> mx.array:
        info = self.tensors[key]
        _, np_dtype, mx_dtype = _DTYPES[info.dtype]
        with open(self.path, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.nbytes)
        if len(raw) != info.nbytes:
            raise MlxVideoError(f"{self.path}: tensor {key!r} is truncated")
        host = np.frombuffer(raw, dtype=np_dtype).reshape(info.shape)
        if info.dtype == "F64":
            host = host.astype(np.float32)
        arr = mx.array(host)
        if info.dtype == "BF16":
            arr = arr.view(mx.bfloat16)
        return arr if arr.dtype == mx_dtype else arr.astype(mx_dtype)


def looks_like_safetensors(path: Path) -> bool:
    """Whether `path` starts like a safetensors file: an 8-byte length that fits the file, then a JSON object.

    The first byte alone says nothing (it is the low byte of the header length, so it may be 0x80 or "P" as
    a pickle or a zip starts); this reads the length and the header's first non-blank byte."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                return False
            start = f.read(min(n, 4096)).lstrip(b" \t\r\n")
    except OSError:
        return False
    return start[:1] == b"{"


def _header_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxVideoError(f"{path} has a corrupt safetensors header ({e})") from None
    except RecursionError:
        raise MlxVideoError(f"{path} has a corrupt safetensors header (its JSON nests too deeply)") from None
    if not isinstance(header, dict):
        raise MlxVideoError(f"{path} has a corrupt safetensors header (not a JSON object)")
    return header


def _header_metadata(path: Path, header: dict) -> dict[str, str]:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MlxVideoError(f"{path}: the header's __metadata__ must be an object of strings (the safetensors format)")
    return metadata


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def _header_entry(
    path: Path, key: str, entry, data_len: int, itemsizes: dict[str, int]
) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, lo, hi) of one tensor's header entry, every field's type and range checked."""
    if not isinstance(entry, dict):
        raise MlxVideoError(f"{path}: malformed header entry for tensor {key!r} (not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in itemsizes:
        shown = dtype if isinstance(dtype, str) else repr(dtype)
        raise MlxVideoError(f"{path}: tensor {key!r} has unsupported dtype {shown:.50}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_count(s) for s in shape):
        raise MlxVideoError(f"{path}: tensor {key!r} has a malformed shape {shape!r:.100} (expected up to 16 counts)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise MlxVideoError(
            f"{path}: tensor {key!r} has malformed data_offsets {offsets!r:.100} (expected [start, end])"
        )
    lo, hi = offsets
    numel = 1
    for s in shape:
        numel *= s  # Python integers: a 2**64 dimension cannot wrap around
    expected = numel * itemsizes[dtype]
    if not lo <= hi <= data_len:
        raise MlxVideoError(
            f"{path} is truncated or corrupt: tensor {key!r} spans bytes {lo}..{hi}, the data section has {data_len}"
        )
    if hi - lo != expected:
        raise MlxVideoError(
            f"{path}: tensor {key!r} ({dtype}, shape {shape}) needs {expected} bytes but occupies {hi - lo}"
        )
    return dtype, tuple(shape), lo, hi


def _read_header(
    path: Path, itemsizes: dict[str, int] = READABLE
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and metadata of a safetensors file, its header validated field by field: whatever the
    file holds, the result is well-typed or an `MlxVideoError` naming the file and the field."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MlxVideoError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise MlxVideoError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file has {size}"
            )
        header = _header_json(path, f.read(n))
    metadata = _header_metadata(path, header)
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        dtype, shape, lo, hi = _header_entry(path, key, entry, data_len, itemsizes)
        tensors[key] = TensorInfo(dtype, shape, data_start + lo, data_start + hi)
        spans.append((lo, hi, key))
    spans.sort()
    for (_, hi1, k1), (lo2, _, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise MlxVideoError(f"{path} is corrupt: tensors {k1!r} and {k2!r} overlap")
    return tensors, metadata


def check_shard(path: Path, keys=()) -> None:
    """A shard (or any safetensors file) is whole: its header is valid, its tensors' bytes lie inside the file,
    and it holds `keys`. Reads only the header."""
    path = Path(path)
    if not path.is_file():
        raise MlxVideoError(f"missing weight shard {path}")
    tensors, _ = _read_header(path, ITEMSIZES)
    absent = [k for k in keys if k not in tensors]
    if absent:
        raise MlxVideoError(f"{path} lacks {len(absent)} tensors its index names, e.g. {absent[0]!r}")


def read_weight_map(index: Path) -> dict[str, str]:
    """The weight_map of a safetensors index file: tensor name -> shard file name (a plain name in the same
    folder), checked as JSON and by type."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, OSError) as e:
        raise MlxVideoError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MlxVideoError(f"{index} is not a valid safetensors index (its weight_map must map names to shard files)")
    for shard in set(weight_map.values()):
        if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise MlxVideoError(f"{index} names a shard {shard!r:.100} outside its folder; expected a file name")
    return weight_map


class TensorSource:
    """All tensors of one model component, from a single file or from a folder of shards."""

    def __init__(self, files: list[Path]):
        if not files:
            raise MlxVideoError("no safetensors files given")
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self._where:
                    raise MlxVideoError(f"tensor {k!r} appears in both {self._where[k].path} and {f.path}")
                self._where[k] = f

    @classmethod
    def from_folder(cls, folder: str | Path, what: str = "model") -> "TensorSource":
        """Read a folder holding `*.safetensors` shards, checking them against an index file if there is one."""
        folder = Path(folder)
        if not folder.is_dir():
            raise MlxVideoError(f"missing {what} folder: {folder}")
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = read_weight_map(indexes[0])
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise MlxVideoError(f"{what}: the index {indexes[0].name} names shards that are missing: {', '.join(missing)}")
            source = cls([folder / n for n in names])
            absent = [k for k in weight_map if k not in source]
            if absent:
                raise MlxVideoError(f"{what}: {len(absent)} tensors listed in {indexes[0].name} are in no shard, e.g. {absent[0]!r}")
            return source
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MlxVideoError(f"{what}: no *.safetensors files in {folder}")
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def get(self, key: str) -> mx.array:
        return self._where[key].get(key)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for f in self.files:
            merged.update(f.metadata)
        return merged
