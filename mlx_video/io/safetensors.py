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


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
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
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MlxVideoError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise MlxVideoError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MlxVideoError(f"{path}: malformed header entry for tensor {key!r}") from None
        if dtype not in _DTYPES:
            raise MlxVideoError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        if any(s < 0 for s in shape):
            raise MlxVideoError(f"{path}: tensor {key!r} has a negative dimension {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][0]
        if not (0 <= lo <= hi <= data_len):
            raise MlxVideoError(
                f"{path} is truncated or corrupt: tensor {key!r} spans bytes {lo}..{hi}, the data section has {data_len}"
            )
        if hi - lo != expected:
            raise MlxVideoError(
                f"{path}: tensor {key!r} ({dtype}, shape {list(shape)}) needs {expected} bytes but occupies {hi - lo}"
            )
        tensors[key] = TensorInfo(dtype, shape, data_start + lo, data_start + hi)
        spans.append((lo, hi, key))
    spans.sort()
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise MlxVideoError(f"{path} is corrupt: tensors {k1!r} and {k2!r} overlap")
    return tensors, metadata


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
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MlxVideoError(f"{indexes[0]} is not a valid safetensors index (no weight_map)") from None
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
