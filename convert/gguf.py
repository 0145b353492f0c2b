"""A torch-free, lazy reader for GGUF files (llama.cpp / ComfyUI-GGUF), with exact dequantization.

Why our own reader rather than the `gguf` package: opening must cost the header only (the package's
`GGUFReader` memory-maps the file and builds a numpy view per metadata field and tensor up front), every
error must name the file and say what is wrong with it, and we need row ranges of one tensor at a time.
The format is small; the `gguf` package serves as the independent reference in the tests.

File layout (GGUF v2 and v3; all little-endian; v1, from 2023, used 32-bit counts and is refused):

* magic `GGUF`, uint32 version, uint64 tensor count, uint64 metadata count;
* metadata: key (a string: uint64 byte length + UTF-8 bytes), uint32 value type, value. Value types:
  0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array (uint32 item type, uint64
  count, items), 10 u64, 11 i64, 12 f64;
* tensor infos: name, uint32 n_dims, uint64 dims[n_dims] (innermost first: numpy's shape is the
  reverse), uint32 ggml type, uint64 offset relative to the data section;
* padding to `general.alignment` (uint32, default 32); then the data section.

Quantized types store rows in blocks (see `GGML_TYPES`); `dequantize` decodes them to float32. Every
decoded value is the float32 rounding of the real-number formula of llama.cpp's `dequantize_row_*` (each
formula is a product of exact terms, at most one of them rounded), so the results do not depend on the
order of operations: they equal llama.cpp's and gguf-py's bit for bit.

ComfyUI-GGUF fix-ups: a tensor's shape is taken from the metadata key `comfy.gguf.orig_shape.<name>` (an
integer array, written for archs whose rows had to be reshaped to a multiple of 256) when present, else it
is the reversed GGUF dims. Wan's 5-D `patch_embedding.weight` is written by ComfyUI-GGUF's
fix_5d_tensors.py as an F32 tensor with all five dims (more than ggml's 4), which this reader accepts.

llama.cpp names of T5 / UMT5 encoders (`enc.blk.N.attn_q.weight`, `token_embd.weight`, ...) map onto
transformers' names with `LLAMA_CPP_T5` (a `KeyMap`), as ComfyUI-GGUF does.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError

from .rules import KeyMap, Rule
from .tensor_file import TensorFile, raw_to_mx

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml itself has 4; ComfyUI-GGUF writes 5-D conv weights
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_elems: int
    block_bytes: int
    numpy_dtype: Any = None  # the element dtype for unblocked types (BF16: raw uint16 bits)


# ggml type id -> layout (ggml.h `enum ggml_type`; block sizes from ggml-common.h)
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4, np.float32),
    1: GGMLType("F16", 1, 2, np.float16),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    24: GGMLType("I8", 1, 1, np.int8),
    25: GGMLType("I16", 1, 2, np.int16),
    26: GGMLType("I32", 1, 4, np.int32),
    27: GGMLType("I64", 1, 8, np.int64),
    28: GGMLType("F64", 1, 8, np.float64),
    30: GGMLType("BF16", 1, 2, np.uint16),
}
TYPE_IDS = {t.name: i for i, t in GGML_TYPES.items()}
# Types ggml knows that this reader does not decode (the i-quants, ternary and fp4 types ...)
_KNOWN_UNSUPPORTED = {
    9: "Q8_1", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4",
}  # fmt: skip
INT_TYPES = {"I8", "I16", "I32", "I64"}

# metadata value types: id -> (name, struct format) for the fixed-size ones
_SCALARS = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}  # fmt: skip
_NUMPY_OF_SCALAR = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_INTEGER_VALUE_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy order, after the ComfyUI orig_shape fix-up
    stored_shape: tuple[int, ...]  # numpy order of the GGUF dims (reversed)
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id].name

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_quantized(self) -> bool:
        return GGML_TYPES[self.type_id].block_elems > 1


# arrays of arrays in the metadata: llama.cpp writes at most two levels; deeper is corruption or an attack
MAX_ARRAY_NESTING = 8


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf, path: Path, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise MlxVideoError(
                f"{self.path} is truncated or corrupt: reading {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        if count > self.size:  # cheaper than overflowing the multiplication below
            self.need(self.size + 1, what)
        self.need(count * itemsize, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * itemsize
        return out


class GGUFFile:
    """The header of one GGUF file, and its tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MlxVideoError(f"missing GGUF file: {self.path}")
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise MlxVideoError(f"{self.path} is not a GGUF file: it is only {self.size} bytes long")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            self._parse(_Cursor(buf, self.path, self.size))

    # -- header

    def _parse(self, cur: _Cursor) -> None:
        self.version = self._parse_version(cur)
        n_tensors = cur.unpack("<Q", "the tensor count")
        n_kv = cur.unpack("<Q", "the metadata count")
        # every metadata entry and tensor info takes at least 12 / 24 bytes: a larger count is corruption
        if n_kv * 12 > self.size or n_tensors * 24 > self.size:
            raise MlxVideoError(f"{self.path} is corrupt: it claims {n_tensors} tensors and {n_kv} metadata entries")
        self._parse_metadata(cur, n_kv)
        self.alignment = self._alignment()
        raw = self._parse_tensor_infos(cur, n_tensors)
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in raw:
            self.tensors[name] = self._tensor_info(name, dims, type_id, offset)
        spans = sorted((t.start, t.start + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end1, n1), (start2, _, n2) in zip(spans, spans[1:]):
            if start2 < end1:
                raise MlxVideoError(f"{self.path} is corrupt: tensors {n1!r} and {n2!r} overlap")

    def _parse_version(self, cur: _Cursor) -> int:
        path = self.path
        magic = bytes(cur.buf[:4])
        if magic != MAGIC:
            raise MlxVideoError(f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
        cur.pos = 4
        version = cur.unpack("<I", "the version")
        if version not in (2, 3):
            if struct.unpack("<I", struct.pack(">I", version))[0] in (1, 2, 3):
                raise MlxVideoError(f"{path} is a big-endian GGUF file, which mlxvid does not read")
            if version == 1:
                raise MlxVideoError(f"{path} is a GGUF v1 file (2023, 32-bit counts); convert it again with llama.cpp")
            raise MlxVideoError(f"{path} has GGUF version {version}; mlxvid reads versions 2 and 3")
        return version

    def _parse_metadata(self, cur: _Cursor, n_kv: int) -> None:
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[str, ...]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            vtype = cur.unpack("<I", f"the type of metadata {key!r}")
            if key in self.metadata:
                raise MlxVideoError(f"{self.path} is corrupt: metadata key {key!r} appears twice")
            self.metadata[key], self.metadata_types[key] = self._value(cur, vtype, key)

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            self.metadata_types.get("general.alignment", ("UINT32",)) != ("UINT32",)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise MlxVideoError(f"{self.path}: general.alignment must be a power of two stored as UINT32, got {alignment!r}")
        return int(alignment)

    def _parse_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        seen = set()
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            n_dims = cur.unpack("<I", f"the rank of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise MlxVideoError(f"{self.path} is corrupt: tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(int(d) for d in cur.array("<u8", n_dims, f"the dims of tensor {name!r}"))
            type_id = cur.unpack("<I", f"the type of tensor {name!r}")
            offset = cur.unpack("<Q", f"the offset of tensor {name!r}")
            if name in seen:
                raise MlxVideoError(f"{self.path} is corrupt: tensor {name!r} appears twice")
            seen.add(name)
            raw.append((name, dims, type_id, offset))
        return raw

    def _value(self, cur: _Cursor, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            name, fmt = _SCALARS[vtype]
            return cur.unpack(fmt, f"metadata {key!r}"), (name,)
        if vtype == _STRING:
            return cur.string(f"metadata {key!r}"), ("STRING",)
        if vtype == _ARRAY:
            item_type = cur.unpack("<I", f"the item type of metadata {key!r}")
            count = cur.unpack("<Q", f"the length of metadata {key!r}")
            if item_type in _SCALARS:
                values = cur.array(_NUMPY_OF_SCALAR[item_type], count, f"metadata {key!r}")
                if item_type == 7:
                    values = values.astype(bool)
                return values, ("ARRAY", _SCALARS[item_type][0])
            if item_type == _STRING:
                if count > cur.size // 8:
                    cur.need(cur.size + 1, f"metadata {key!r}")
                return [cur.string(f"metadata {key!r}") for _ in range(count)], ("ARRAY", "STRING")
            if item_type == _ARRAY:
                if depth >= MAX_ARRAY_NESTING:
                    raise MlxVideoError(
                        f"{self.path} is corrupt: metadata {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep"
                    )
                if count > cur.size // 12:
                    cur.need(cur.size + 1, f"metadata {key!r}")
                items = [self._value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
                return [v for v, _ in items], ("ARRAY", "ARRAY")
            raise MlxVideoError(f"{self.path} is corrupt: metadata {key!r} is an array of unknown type {item_type}")
        raise MlxVideoError(f"{self.path} is corrupt: metadata {key!r} has unknown value type {vtype}")

    def _tensor_info(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> GGUFTensorInfo:
        path = self.path
        if type_id not in GGML_TYPES:
            what = _KNOWN_UNSUPPORTED.get(type_id, f"unknown type {type_id}")
            raise MlxVideoError(
                f"{path}: tensor {name!r} is stored as {what}, which mlxvid does not decode; it reads "
                + ", ".join(t.name for t in GGML_TYPES.values())
            )
        t = GGML_TYPES[type_id]
        numel = int(np.prod(dims, dtype=object)) if dims else 1
        if dims and dims[0] % t.block_elems:
            raise MlxVideoError(
                f"{path} is corrupt: tensor {name!r} ({t.name}) has rows of {dims[0]}, not a multiple of {t.block_elems}"
            )
        nbytes = numel // t.block_elems * t.block_bytes
        if offset % self.alignment:
            raise MlxVideoError(
                f"{path} is corrupt: tensor {name!r} starts at {offset}, not a multiple of the alignment {self.alignment}"
            )
        start = self.data_start + offset
        if start + nbytes > self.size:
            raise MlxVideoError(
                f"{path} is truncated: tensor {name!r} ({t.name}, {nbytes} bytes) ends at byte {start + nbytes}, "
                f"but the file has {self.size} bytes"
            )
        stored = tuple(reversed(dims))
        shape = stored
        key = ORIG_SHAPE_KEY + name
        if key in self.metadata:
            orig = self.metadata[key]
            kind = self.metadata_types[key]
            if kind[0] != "ARRAY" or kind[1] not in {_SCALARS[i][0] for i in _INTEGER_VALUE_TYPES} or len(orig) == 0:
                raise MlxVideoError(f"{path}: metadata {key!r} must be an array of integers, got {kind}")
            shape = tuple(int(d) for d in orig)
            if any(d < 0 for d in shape) or int(np.prod(shape, dtype=object)) != numel:
                raise MlxVideoError(f"{path}: {key!r} = {list(shape)} does not hold the {numel} elements of {name!r}")
        return GGUFTensorInfo(name, type_id, shape, stored, start, nbytes)

    # -- description

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MlxVideoError(f"{self.path} has no tensor {name!r}") from None

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts

    # -- data

    def _element_span(self, info: GGUFTensorInfo, start, stop) -> tuple[int, int, tuple[int, ...]]:
        shape = info.shape
        if not shape:
            if start not in (None, 0) or stop not in (None, 1):
                raise ValueError("a 0-d tensor has one row")
            return 0, 1, ()
        start = 0 if start is None else start
        stop = shape[0] if stop is None else stop
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}..{stop} outside {shape[0]} of {info.name!r}")
        per_row = int(np.prod(shape[1:], dtype=np.int64))
        return start * per_row, (stop - start) * per_row, (stop - start, *shape[1:])

    def _read_bytes(self, info: GGUFTensorInfo, first: int, count: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(info.start + first)
            data = np.fromfile(f, dtype=np.uint8, count=count)
        if data.size != count:
            raise MlxVideoError(f"{self.path}: tensor {info.name!r} is truncated (did the file change after opening?)")
        return data

    def read_raw(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as stored: unblocked types as their elements in the tensor's shape (BF16 as
        uint16 bits), block types as a uint8 array (blocks, block_bytes) of the blocks that hold those rows."""
        info = self.info(name)
        t = GGML_TYPES[info.type_id]
        first, count, shape = self._element_span(info, start, stop)
        if t.block_elems == 1:
            data = self._read_bytes(info, first * t.block_bytes, count * t.block_bytes)
            return data.view(np.dtype(t.numpy_dtype).newbyteorder("<")).astype(t.numpy_dtype, copy=False).reshape(shape)
        b0, b1 = first // t.block_elems, -(-(first + count) // t.block_elems)
        return self._read_bytes(info, b0 * t.block_bytes, (b1 - b0) * t.block_bytes).reshape(-1, t.block_bytes)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) along the first axis (all by default), as float32 (integer types keep theirs)."""
        info = self.info(name)
        t = GGML_TYPES[info.type_id]
        first, count, shape = self._element_span(info, start, stop)
        raw = self.read_raw(name, start, stop)
        if t.name in INT_TYPES:
            return raw
        if t.block_elems == 1:
            return dequantize(raw.reshape(-1), t.name).reshape(shape)
        values = dequantize(raw, t.name)
        skip = first - (first // t.block_elems) * t.block_elems
        return values[skip : skip + count].reshape(shape)

    def read_mlx_affine(self, name: str) -> "AffineWeight":
        """A 2-D tensor of a type that MLX's affine quantization holds exactly (see `AFFINE_BITS`), as
        (weight, scales, biases) for `mx.dequantize` / `mx.quantized_matmul` / `nn.QuantizedLinear`."""
        info = self.info(name)
        if len(info.shape) != 2 or info.shape != info.stored_shape:
            raise MlxVideoError(f"{self.path}: {name!r} has shape {list(info.shape)}; only 2-D tensors stay quantized")
        return to_mlx_affine(self.read_raw(name), info.type_name, info.shape)

    def describe(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.type_counts().items(), key=lambda kv: -kv[1]))
        return f"GGUF v{self.version} ({self.architecture or 'no architecture'}): {counts}"


def is_gguf(path: str | Path) -> bool:
    """Whether a file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# dequantization: `blocks` is a uint8 array (n_blocks, block_bytes); the result is float32 (n_blocks * elems,)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 column (n, 1)."""
    return blocks[:, at : at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles (the legacy 32-element order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _qh_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5_0/Q5_1: the 32 fifth bits held in a little-endian uint32 at byte `at`, bit j for element j, as 0/16."""
    qh = blocks[:, at : at + 4].copy().view("<u4")
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _q5_0(b):
    return _f16(b, 0) * ((_nibbles(b[:, 6:22]) | _qh_bits(b, 2)).astype(np.float32) - 16)


def _q5_1(b):
    return _f16(b, 0) * (_nibbles(b[:, 8:24]) | _qh_bits(b, 4)).astype(np.float32) + _f16(b, 2)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _k_walk(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K element order: (n, 64) bytes -> (n, 2, 4, 32) 2-bit fields [half, shift j, l]."""
    q = qs.reshape(-1, 2, 1, 32)
    return (q >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3


def _q2_k(b):
    sc = b[:, 0:16].reshape(-1, 16, 1)  # one byte per 16 elements: low nibble scale, high nibble min
    q = _k_walk(b[:, 16:80]).reshape(-1, 16, 16).astype(np.float32)
    d, dmin = _f16(b, 80)[:, :, None], _f16(b, 82)[:, :, None]
    return (d * (sc & 15).astype(np.float32)) * q - dmin * (sc >> 4).astype(np.float32)


def _q3_k(b):
    hmask, s = b[:, 0:32], b[:, 96:108].astype(np.int16)
    i = np.arange(16)
    low4 = (s[:, i % 8] >> (4 * (i // 8))) & 15
    high2 = (s[:, 8 + i % 4] >> (2 * (i // 4))) & 3
    scale = ((low4 | (high2 << 4)) - 32).astype(np.float32).reshape(-1, 16, 1)
    low2 = _k_walk(b[:, 32:96])
    # the high bit of element (half n, shift j, l) is bit 4n + j of hmask[l]; a clear bit subtracts 4
    bit = (hmask.reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)) & 1
    q = (low2.astype(np.int16) - 4 * (1 - bit.astype(np.int16))).reshape(-1, 16, 16).astype(np.float32)
    return _f16(b, 108)[:, :, None] * scale * q


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 scale bytes -> eight 6-bit (scale, min) pairs, each (n, 8)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32)[:, :, None], mn.astype(np.float32)[:, :, None]


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) -> (n, 8, 32): chunk c's low nibbles are group 2c, its high nibbles group 2c + 1."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    return (d * sc) * _k4_nibbles(b[:, 16:144]).astype(np.float32) - dmin * mn


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    high = ((b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4
    q = (_k4_nibbles(b[:, 48:176]) | high).astype(np.float32)
    return (d * sc) * q - dmin * mn


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)  # [half, -, which 32 of the 64 bytes, l]
    low4 = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # quarter t = 2 * nibble + which
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    high2 = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = ((low4 | (high2 << 4)).astype(np.float32) - 32).reshape(-1, 16, 16)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 16, 1)
    return (_f16(b, 208)[:, :, None] * sc) * q


def _q8_k(b):
    d = b[:, 0:4].copy().view("<f4").astype(np.float32)
    return d * b[:, 4:260].view(np.int8).astype(np.float32)


_BLOCK_DECODERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "Q8_K": _q8_k,
}  # fmt: skip


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Stored data -> float32, flat. Block types take uint8 (n_blocks, block_bytes) (or the flat bytes);
    F32/F16/F64 take their elements, BF16 its uint16 bit patterns."""
    if type_name in ("F32", "F16", "F64"):
        return np.asarray(raw).astype(np.float32).reshape(-1)
    if type_name == "BF16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1)
    if type_name not in _BLOCK_DECODERS:
        raise MlxVideoError(f"GGUF type {type_name} cannot be dequantized by mlxvid")
    t = GGML_TYPES[TYPE_IDS[type_name]]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8)
    if blocks.size % t.block_bytes:
        raise ValueError(f"{blocks.size} bytes are not a whole number of {type_name} blocks ({t.block_bytes} bytes)")
    with np.errstate(over="ignore", invalid="ignore"):
        return _BLOCK_DECODERS[type_name](blocks.reshape(-1, t.block_bytes)).astype(np.float32, copy=False).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# MLX affine form: w = scale * q + bias with unsigned q, groups of 32 along each row

# GGUF types whose values are exactly scale * q + bias per 32 consecutive elements of a row
AFFINE_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
AFFINE_GROUP_SIZE = 32


@dataclass(frozen=True)
class AffineWeight:
    weight: mx.array  # uint32, (rows, cols * bits / 32)
    scales: mx.array  # (rows, cols / 32)
    biases: mx.array
    group_size: int
    bits: int

    def dequantize(self, dtype=None) -> mx.array:
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits, dtype=dtype
        )


def pack_mlx_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows, cols) -> MLX's packing: one little-endian bit stream per row, element 0 in the
    lowest bits of the first uint32 (for every width, 3, 5 and 6 bits included)."""
    rows, cols = q.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} codes of {bits} bits do not fill whole uint32 words")
    if bits in (2, 4, 8):  # codes never straddle a word: pack whole words per lane
        per = 32 // bits
        lanes = q.astype(np.uint32).reshape(rows, -1, per) << (bits * np.arange(per, dtype=np.uint32))
        return np.bitwise_or.reduce(lanes, axis=-1)
    bitstream = ((q.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, -1, 8)
    return np.packbits(bitstream, axis=-1, bitorder="little").reshape(rows, -1).view("<u4")


def affine_parts(blocks: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF blocks -> (unsigned codes (n_groups, 32) uint8, scale (n_groups,), bias (n_groups,)) in float32,
    with value == scale * code + bias exactly."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, GGML_TYPES[TYPE_IDS[type_name]].block_bytes)
    if type_name == "Q8_0":
        d = _f16(b, 0)
        return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d[:, 0], -128 * d[:, 0]
    if type_name == "Q4_0":
        d = _f16(b, 0)
        return _nibbles(b[:, 2:18]), d[:, 0], -8 * d[:, 0]
    if type_name == "Q4_1":
        return _nibbles(b[:, 4:20]), _f16(b, 0)[:, 0], _f16(b, 2)[:, 0]
    if type_name == "Q5_0":
        d = _f16(b, 0)
        return _nibbles(b[:, 6:22]) | _qh_bits(b, 2), d[:, 0], -16 * d[:, 0]
    if type_name == "Q5_1":
        return _nibbles(b[:, 8:24]) | _qh_bits(b, 4), _f16(b, 0)[:, 0], _f16(b, 2)[:, 0]
    if type_name in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales(b[:, 4:16])
        d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
        if type_name == "Q4_K":
            q = _k4_nibbles(b[:, 16:144])
        else:
            high = ((b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4
            q = _k4_nibbles(b[:, 48:176]) | high
        return q.reshape(-1, 32), (d * sc).reshape(-1), (-(dmin * mn)).reshape(-1)
    raise MlxVideoError(f"GGUF type {type_name} has no exact MLX affine form; it reads as float")


def to_mlx_affine(blocks: np.ndarray, type_name: str, shape: tuple[int, int]) -> AffineWeight:
    """A 2-D GGUF tensor (its raw blocks) in MLX's affine quantized form, group size 32, float32 scales.

    `mx.dequantize` then gives the float32 values of `dequantize` exactly, except that a zero may come out
    as +0.0 where llama.cpp gives -0.0 (code * scale + bias = +0 for Q8_0/Q4_0/Q5_0 when scale < 0): every
    product scale * code is exact in float32 and the one addition is the same single rounding. Float16
    scales would not do: MLX then computes scale * code + bias in float16, and the cancellation in it
    costs up to hundreds of float16 ulps of the result (measured: Q8_0 113, Q4_1 256).
    """
    if type_name not in AFFINE_BITS:
        raise MlxVideoError(f"GGUF type {type_name} has no exact MLX affine form; it reads as float")
    rows, cols = shape
    t = GGML_TYPES[TYPE_IDS[type_name]]
    if cols % t.block_elems or np.asarray(blocks).size != rows * cols // t.block_elems * t.block_bytes:
        raise ValueError(f"these {type_name} blocks do not hold a ({rows}, {cols}) tensor")
    bits = AFFINE_BITS[type_name]
    q, scale, bias = affine_parts(blocks, type_name)
    return AffineWeight(
        mx.array(pack_mlx_bits(q.reshape(rows, cols), bits)),
        mx.array(scale.reshape(rows, -1)),
        mx.array(bias.reshape(rows, -1)),
        AFFINE_GROUP_SIZE,
        bits,
    )


# ---------------------------------------------------------------------------------------------------
# llama.cpp T5 / UMT5 encoder names -> transformers names (what ComfyUI-GGUF's T5_SD_MAP produces)

_ENC = r"enc\.blk\.(\d+)\."
_TO = r"encoder.block.\1.layer."
LLAMA_CPP_T5 = KeyMap(
    [
        Rule(r"token_embd\.weight", "shared.weight"),
        Rule(_ENC + r"attn_norm\.weight", _TO + "0.layer_norm.weight"),
        Rule(_ENC + r"attn_([qkvo])\.weight", _TO + r"0.SelfAttention.\2.weight"),
        Rule(_ENC + r"attn_rel_b\.weight", _TO + "0.SelfAttention.relative_attention_bias.weight"),
        Rule(_ENC + r"ffn_norm\.weight", _TO + "1.layer_norm.weight"),
        Rule(_ENC + r"ffn_gate\.weight", _TO + "1.DenseReluDense.wi_0.weight"),
        Rule(_ENC + r"ffn_up\.weight", _TO + "1.DenseReluDense.wi_1.weight"),
        Rule(_ENC + r"ffn_down\.weight", _TO + "1.DenseReluDense.wo.weight"),
        Rule(r"enc\.output_norm\.weight", "encoder.final_layer_norm.weight"),
    ],
    # the decoder half and the LM head of a full T5 file are not used
    ignore=[r"dec\..*", r"output\.weight"],
)
T5_ARCHITECTURES = ("t5", "t5encoder")


def gguf_names(gguf: GGUFFile) -> dict[str, str]:
    """Our name for each tensor of a GGUF file -> its GGUF name. T5 / UMT5 encoders (arch `t5`/`t5encoder`)
    are renamed with `LLAMA_CPP_T5` (their unused decoder tensors dropped); other files keep their names."""
    if gguf.architecture not in T5_ARCHITECTURES:
        return {k: k for k in gguf.keys()}
    unknown = LLAMA_CPP_T5.unknown_keys(gguf.keys())
    if unknown:
        raise MlxVideoError(f"{gguf.path}: T5 tensors that mlxvid cannot name: {', '.join(unknown[:5])}")
    out = {}
    for key in gguf.keys():
        hit = LLAMA_CPP_T5.target(key)
        if hit is not None:
            out[hit[0]] = key
    return out


# ---------------------------------------------------------------------------------------------------
# the converter's view (convert/tensor_file.py `TensorFile`)

_CODES = {name: name for name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")}  # the rest read as F32


class GGUFTensors(TensorFile):
    """A GGUF file as a `TensorFile`: tensors under our names (T5 encoders renamed), float tensors as stored,
    quantized ones dequantized to float32 (code "F32"); `ggml_type` tells the stored type and `affine`
    gives the exact MLX quantized form of the types in `AFFINE_BITS`."""

    def __init__(self, path: str | Path):
        self.gguf = GGUFFile(path)
        self.paths = [self.gguf.path]
        self.metadata = self.gguf.metadata
        self._names = gguf_names(self.gguf)
        self._shapes, self._codes = {}, {}
        for name, key in self._names.items():
            info = self.gguf.info(key)
            self._shapes[name] = info.shape
            self._codes[name] = _CODES.get(info.type_name, "F32")

    def ggml_type(self, key: str) -> str:
        return self.gguf.info(self._names[key]).type_name

    def stored_nbytes(self, key: str) -> int:
        """Bytes on disk (`ComponentSource.nbytes` counts a quantized tensor at its float32 size)."""
        return self.gguf.info(self._names[key]).nbytes

    def read(self, key, start=None, stop=None):
        gguf_key = self._names[key]
        info = self.gguf.info(gguf_key)
        if info.is_quantized:
            return mx.array(self.gguf.read(gguf_key, start, stop))
        return raw_to_mx(self.gguf.read_raw(gguf_key, start, stop), self._codes[key])

    def affine(self, key: str) -> AffineWeight | None:
        """The MLX affine form of a 2-D tensor whose type has one, else None."""
        info = self.gguf.info(self._names[key])
        if info.type_name not in AFFINE_BITS or len(info.shape) != 2 or info.shape != info.stored_shape:
            return None
        return self.gguf.read_mlx_affine(self._names[key])

    def affine_rows(self, key: str, start: int | None = None, stop: int | None = None) -> AffineWeight:
        """Rows [start, stop) of a 2-D weight in the exact MLX affine form (the converter writes it in slices)."""
        gguf_key = self._names[key]
        info = self.gguf.info(gguf_key)
        if info.type_name not in AFFINE_BITS or len(info.shape) != 2 or info.shape != info.stored_shape:
            raise MlxVideoError(f"{self.gguf.path}: {gguf_key!r} ({info.type_name}, {list(info.shape)}) has no MLX affine form")
        start = 0 if start is None else start
        stop = info.shape[0] if stop is None else stop
        return to_mlx_affine(self.gguf.read_raw(gguf_key, start, stop), info.type_name, (stop - start, info.shape[1]))

    def describe(self) -> str:
        return f"{self.gguf.path} ({self.gguf.describe()})"


__all__ = [
    "AFFINE_BITS", "AffineWeight", "GGML_TYPES", "GGUFFile", "GGUFTensorInfo", "GGUFTensors", "LLAMA_CPP_T5",
    "affine_parts", "dequantize", "gguf_names", "is_gguf", "pack_mlx_bits", "to_mlx_affine",
]  # fmt: skip

