"""What a checkpoint file holds, read the same way whatever its container and precision.

Three layers, each small:

* `TensorFile`: one container's tensors -- a safetensors file or sharded folder (our strict streaming reader)
  or a `torch.save` archive (our pickle-free reader) -- with a uniform dtype code (safetensors' spelling)
  and reads of a range of rows, so that no tensor needs to be held whole to be converted.
* `ComponentSource`: the tensors of one model component by their model names. It strips a wrapper prefix
  (`model.diffusion_model.` and the like) and folds fp8 side tensors into the weights they scale:
  ComfyUI's legacy "scaled fp8" (`scaled_fp8` marker, `<layer>.scale_weight`, `<layer>.scale_input`), the
  newer mixed-precision layout (`<layer>.weight_scale`, `<layer>.comfy_quant` JSON, `<layer>.input_scale`)
  and plain fp8 casts without scales. A weight then reads as `decode(codes) * scale` in float32. `comfy_quant`
  nvfp4 / mxfp8 / int8_tensorwise weights read decoded exactly (comfy_quant.py).
* `split_all_in_one`: a ComfyUI all-in-one checkpoint as one view per component, by prefix.
* `classify`: what kind of component a set of keys is (a Wan transformer in official or diffusers names, a
  UMT5 encoder, a Wan VAE, ...) and, for checkpoints of other families, which model they look like.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError
from mlx_video.io.safetensors import SafetensorsFile, TensorSource, looks_like_safetensors

from .fp8 import decode_fp8
from .tensor_file import TensorFile, raw_to_mx  # noqa: F401  (re-exported: the base of every container)
from .rules import PART_SEPARATOR, KeyMap, Rule, is_part_key

# dtype code -> (bytes per element, numpy dtype of the raw elements)
RAW_DTYPES: dict[str, tuple[int, type]] = {
    "F64": (8, np.float64),
    "F32": (4, np.float32),
    "F16": (2, np.float16),
    "BF16": (2, np.uint16),
    "I64": (8, np.int64),
    "I32": (4, np.int32),
    "I16": (2, np.int16),
    "I8": (1, np.int8),
    "U8": (1, np.uint8),
    "BOOL": (1, np.bool_),
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "F8_E8M0": (1, np.uint8),  # power-of-two scales of mxfp8 (comfy_quant); never a weight of its own
}
MAX_COMFY_QUANT_BYTES = 1 << 20  # a `<layer>.comfy_quant` tensor is a few dozen bytes of JSON
MAX_SPIECE_BYTES = 64 << 20  # an embedded SentencePiece model (UMT5's is about 4.5 MB)
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
FP8_CODES = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
DTYPE_NAMES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8 e4m3fn", "F8_E5M2": "fp8 e5m2"}

# torch dtype names (as our .pth reader reports them) -> the codes above
_TORCH_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# containers


def _row_span(shape: tuple[int, ...], start: int | None, stop: int | None) -> tuple[int, int, tuple[int, ...]]:
    """(first element, element count, shape of the read) for rows [start, stop)."""
    if not shape:
        if start not in (None, 0) or stop not in (None, 1):
            raise ValueError("a 0-d tensor has one row")
        return 0, 1, ()
    rows = shape[0]
    start = 0 if start is None else start
    stop = rows if stop is None else stop
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows {start}..{stop} outside {rows}")
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    return start * per_row, (stop - start) * per_row, (stop - start, *shape[1:])


class SafetensorsTensors(TensorFile):
    def __init__(self, source: TensorSource):
        self._source = source
        self.paths = [f.path for f in source.files]
        self.metadata = source.metadata
        self._shapes = {k: tuple(source.info(k).shape) for k in source.keys()}
        self._codes = {k: source.info(k).dtype for k in source.keys()}

    @classmethod
    def open(cls, path: Path, what: str) -> "SafetensorsTensors":
        path = Path(path)
        if path.is_dir():
            return cls(TensorSource.from_folder(path, what))
        return cls(TensorSource([path]))

    def _file(self, key: str) -> SafetensorsFile:
        return self._source._where[key]

    def read(self, key, start=None, stop=None):
        f = self._file(key)
        info = f.info(key)
        itemsize, np_dtype = RAW_DTYPES[info.dtype]
        first, count, shape = _row_span(info.shape, start, stop)
        with open(f.path, "rb") as fh:
            fh.seek(info.start + first * itemsize)
            host = np.fromfile(fh, dtype=np_dtype, count=count)
        if host.size != count:
            raise MlxVideoError(f"{f.path}: tensor {key!r} is truncated")
        return raw_to_mx(host.reshape(shape), info.dtype)


class PthTensors(TensorFile):
    def __init__(self, path: Path):
        from .pth import open_state_dict

        self._ckpt = open_state_dict(path)
        self.paths = [Path(path)]
        self.metadata = {}
        self._shapes, self._codes = {}, {}
        for key in self._ckpt.keys():
            info = self._ckpt.info(key)
            if info.dtype not in _TORCH_CODES:
                raise MlxVideoError(f"{path}: tensor {key!r} has dtype {info.dtype}, which mlxvid cannot convert")
            self._shapes[key] = tuple(info.shape)
            self._codes[key] = _TORCH_CODES[info.dtype]

    def read(self, key, start=None, stop=None):
        first, count, shape = _row_span(self._shapes[key], start, stop)
        # only the rows' bytes for a contiguous tensor; the reader handles strided and big-endian storage
        return raw_to_mx(self._ckpt.read_range(key, first, count).reshape(shape), self._codes[key])


def open_tensors(path: str | Path, what: str) -> TensorFile:
    """A safetensors file, a folder of safetensors shards, a torch.save archive (.pth/.pt/.bin/.ckpt) or a GGUF
    file (quantized tensors read dequantized, exactly; see gguf.py)."""
    path = Path(path)
    if not path.exists():
        raise MlxVideoError(f"{what}: {path} does not exist")
    if path.is_dir():
        return SafetensorsTensors.open(path, what)
    kind = checkpoint_kind(path)
    if kind == "gguf":
        from .gguf import GGUFTensors  # imported here: gguf.py builds on this module

        return GGUFTensors(path)
    if kind == "pth":
        return PthTensors(path)
    return SafetensorsTensors.open(path, what)


PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def checkpoint_kind(path: Path) -> str:
    """"safetensors", "gguf" or "pth" for a checkpoint file: from its whole header, then its name, then its
    first bytes.

    A safetensors file starts with its header's length, whose low byte may be anything -- 0x80 as a pickle
    starts, "P" as a zip does -- so a file is safetensors when its length and JSON header say so, whatever
    its first bytes; a file named .safetensors is read (and refused, if it must be) as one."""
    if looks_like_safetensors(path):
        return "safetensors"
    suffix = path.suffix.lower()
    if suffix in (".gguf", ".safetensors"):
        return suffix[1:]
    if suffix in PTH_SUFFIXES:
        return "pth"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise MlxVideoError(f"cannot read {path} ({e.strerror or e})") from None
    if head == b"GGUF":
        return "gguf"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pth"
    return "safetensors"  # its reader says what is wrong with it


# ---------------------------------------------------------------------------------------------------
# one component by model names, fp8 side tensors folded in

# Wrapper prefixes that checkpoint tools put before the model's own names (ComfyUI full checkpoints and
# repackaged files, Lightning-style wrappers). Stripped only when every key but the root markers carries one.
PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "first_stage_model.",
    "text_encoders.umt5xxl.transformer.",
    "umt5xxl.transformer.",
    "model.",
    "vae.",
)
ROOT_MARKERS = ("scaled_fp8", "spiece_model")
_SIDE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
_SUPPORTED_COMFY_FORMATS = {"float8_e4m3fn": "e4m3fn", "float8_e5m2": "e5m2"}
# comfy_quant block formats, decoded exactly by convert/comfy_quant.py: format -> (stored weight dtypes, side tensors)
_BLOCK_COMFY_FORMATS = {
    "nvfp4": ({"U8", "I8"}, ("weight_scale", "weight_scale_2")),
    "mxfp8": ({"F8_E4M3", "U8"}, ("weight_scale",)),
    "int8_tensorwise": ({"I8", "U8"}, ("weight_scale",)),
}


@dataclass(frozen=True)
class Fp8Layout:
    fmt: str | None  # "e4m3fn" / "e5m2" when the stored weight is fp8 codes, None for a float weight
    scale_key: str | None  # the side tensor holding the scale, if any


class ComponentSource:
    """One component's tensors by model names; fp8 weights read dequantized unless asked for their codes."""

    def __init__(self, tensors: TensorFile, what: str):
        self.tensors = tensors
        self.what = what
        keys = tensors.keys()
        self.prefix = _common_prefix(keys)
        self._raw_key = self._names_without_prefix(keys)
        names = set(self._raw_key)
        self.marker = "scaled_fp8" if "scaled_fp8" in names else None
        self.spiece_model = "spiece_model" if "spiece_model" in names else None
        quant_conf = self._comfy_quant_configs(names)
        self.comfy_layers = set(quant_conf)
        self.layouts: dict[str, Fp8Layout] = {}
        # weight -> (comfy_quant format, its config): nvfp4 / mxfp8 / int8_tensorwise, read decoded (comfy_quant.py)
        self.block_quant: dict[str, tuple[str, dict]] = {}
        self._decoded: tuple[str, np.ndarray] | None = None
        side = {n for n in names if n.endswith(_SIDE_SUFFIXES)}
        used_side: set[str] = set()
        # Each fp8 weight's own dtype says which format it is (the legacy marker's dtype says it too, less directly).
        for name in sorted(names - side - {m for m in ROOT_MARKERS if m in names}):
            self._read_layout(name, names, quant_conf, used_side)
        self.orphans = sorted(side - used_side)
        self.logical = sorted(names - side - {m for m in ROOT_MARKERS if m in names})
        self._logical_set = set(self.logical)

    def _names_without_prefix(self, keys) -> dict[str, str]:
        """Model name -> the file's key, the wrapper prefix removed (two keys may not become one name)."""
        raw_key: dict[str, str] = {}
        for k in keys:
            name = k[len(self.prefix) :] if self.prefix and k.startswith(self.prefix) else k
            if name in raw_key:
                raise MlxVideoError(f"{self.what}: {k!r} and {raw_key[name]!r} are the same tensor once the prefix is removed")
            raw_key[name] = k
        return raw_key

    def _read_layout(self, name: str, names: set, quant_conf: dict, used_side: set) -> None:
        """How one tensor is stored: a block-quantized comfy_quant weight, an fp8 weight (and its scale), or plain."""
        code = self._code(name)
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        scale_key = None
        if layer is not None:
            scale_key = next((layer + s for s in (".scale_weight", ".weight_scale") if layer + s in names), None)
            used_side.update(layer + s for s in _SIDE_SUFFIXES if layer + s in names)
        fmt = FP8_CODES.get(code)
        conf = quant_conf.get(layer) if layer is not None else None
        if conf is not None and conf.get("format") in _BLOCK_COMFY_FORMATS:
            self._check_block_quant(name, layer, conf, names)
            self.block_quant[name] = (conf["format"], conf)
            return
        if layer is not None and layer + ".weight_scale_2" in names:
            raise MlxVideoError(
                f"{self.what}: {layer} has a weight_scale_2 (a block-scaled 4-bit format such as nvfp4) but no comfy_quant "
                "entry saying which format it is; mlxvid reads nvfp4, mxfp8 and int8_tensorwise when comfy_quant names them"
            )
        if conf is not None:
            self._check_fp8_comfy_quant(layer, conf, fmt, code)
        if fmt is not None or scale_key is not None:
            if scale_key is not None:
                self._check_scale(name, scale_key)
            self.layouts[name] = Fp8Layout(fmt, scale_key)

    def _check_fp8_comfy_quant(self, layer: str, conf: dict, fmt: str | None, code: str) -> None:
        wanted = conf.get("format")
        if wanted not in _SUPPORTED_COMFY_FORMATS:
            raise MlxVideoError(
                f"{self.what}: {layer} is quantized as {wanted!r} (comfy_quant), which mlxvid does not read; it reads "
                f"{', '.join([*_SUPPORTED_COMFY_FORMATS, *_BLOCK_COMFY_FORMATS])}"
            )
        if fmt != _SUPPORTED_COMFY_FORMATS[wanted]:
            raise MlxVideoError(
                f"{self.what}: {layer}.comfy_quant says {wanted} but its weight is stored as {code}; the file is inconsistent"
            )

    # -- description

    def _code(self, name: str) -> str:
        return self.tensors.code(self._raw_key[name])

    def _comfy_quant_configs(self, names: set[str]) -> dict[str, dict]:
        configs: dict[str, dict] = {}
        meta = self.tensors.metadata.get("_quantization_metadata") if self.tensors.metadata else None
        if meta:
            try:
                layers = json.loads(meta).get("layers", {})
                configs.update({str(k)[len(self.prefix) :] if self.prefix and str(k).startswith(self.prefix) else str(k): v for k, v in layers.items()})
            except (json.JSONDecodeError, AttributeError, TypeError, RecursionError):
                raise MlxVideoError(f"{self.what}: the header's _quantization_metadata is not valid JSON") from None
        for name in names:
            if not name.endswith(".comfy_quant"):
                continue
            if int(np.prod(self.tensors.shape(self._raw_key[name]), dtype=object)) > MAX_COMFY_QUANT_BYTES:
                raise MlxVideoError(f"{self.what}: {name} is larger than a comfy_quant JSON blob can be")
            blob = np.array(self.tensors.read(self._raw_key[name])).astype(np.uint8).tobytes()
            try:
                conf = json.loads(blob.decode("utf-8"))
                if not isinstance(conf, dict):
                    raise ValueError
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise MlxVideoError(f"{self.what}: {name} is not a JSON object (a comfy_quant blob)") from None
            configs[name[: -len(".comfy_quant")]] = conf
        for layer, conf in configs.items():  # ComfyUI reads extra fields flat or under "params"
            if not isinstance(conf, dict):
                raise MlxVideoError(f"{self.what}: the quantization entry of {layer} is not a JSON object")
            if isinstance(conf.get("params"), dict):
                configs[layer] = {**conf["params"], **{k: v for k, v in conf.items() if k != "params"}}
        return configs

    def _check_block_quant(self, name: str, layer: str, conf: dict, names: set[str]) -> None:
        fmt = conf["format"]
        codes, sides = _BLOCK_COMFY_FORMATS[fmt]
        if self._code(name) not in codes or len(self.tensors.shape(self._raw_key[name])) != 2:
            raise MlxVideoError(
                f"{self.what}: {layer}.comfy_quant says {fmt} but its weight is a {self._code(name)} tensor of shape "
                f"{list(self.tensors.shape(self._raw_key[name]))}; the file is inconsistent"
            )
        missing = [s for s in sides if f"{layer}.{s}" not in names]
        if missing:
            raise MlxVideoError(f"{self.what}: {layer} is {fmt} (comfy_quant) but has no {', '.join(missing)}")

    def _check_scale(self, name: str, scale_key: str) -> None:
        shape = self.tensors.shape(self._raw_key[scale_key])
        if self._code(scale_key) not in FLOAT_CODES - set(FP8_CODES):
            raise MlxVideoError(f"{self.what}: the scale {scale_key} has dtype {self._code(scale_key)}; expected a float")
        n = int(np.prod(shape, dtype=np.int64))
        wshape = self.shape(name)
        if n != 1 and not (len(shape) >= 1 and wshape and n == wshape[0] and shape[0] == wshape[0]):
            raise MlxVideoError(
                f"{self.what}: the scale {scale_key} has shape {list(shape)}, which fits neither one scale per tensor "
                f"nor one per output channel of {name} {list(wshape)}"
            )

    def scheme(self) -> str:
        """A one-line description of how the weights are stored."""
        codes: dict[str, int] = {}
        for name in self.logical:
            codes[self._code(name)] = codes.get(self._code(name), 0) + 1
        main = max(codes, key=codes.get) if codes else "F32"
        fp8 = [n for n, lay in self.layouts.items() if lay.fmt]
        scaled = [n for n, lay in self.layouts.items() if lay.scale_key]
        ggml = getattr(self.tensors, "ggml_type", None)
        if ggml is not None:
            return self.tensors.gguf.describe()
        if self.block_quant:
            counts: dict[str, int] = {}
            for fmt, _ in self.block_quant.values():
                counts[fmt] = counts.get(fmt, 0) + 1
            rest = sorted({DTYPE_NAMES.get(self._code(n), self._code(n)) for n in self.logical if n not in self.block_quant})
            return (
                "ComfyUI comfy_quant " + ", ".join(f"{n} {f}" for f, n in sorted(counts.items()))
                + " tensors (nvfp4 / mxfp8 block linears kept in MLX's nvfp4 / mxfp8 unless --quantize; the rest decoded exactly)"
                + (f", the rest {'/'.join(rest)}" if rest else "")
            )
        if not fp8:
            return DTYPE_NAMES.get(main, main)
        fmts = sorted({self.layouts[n].fmt for n in fp8})
        if self.marker:
            kind = "ComfyUI scaled fp8 (legacy: scaled_fp8 marker, per-tensor scale_weight)"
        elif any(n[: -len(".weight")] in self.comfy_layers for n in fp8):
            kind = "ComfyUI mixed precision fp8 (weight_scale + comfy_quant)"
        elif any(self.layouts[n].scale_key and self.layouts[n].scale_key.endswith(".weight_scale") for n in fp8):
            kind = "fp8 with weight_scale (no comfy_quant)"
        elif not scaled:
            kind = "plain fp8 cast (no scales)"
        else:
            kind = "fp8 with scales"
        rest = sorted({DTYPE_NAMES.get(self._code(n), self._code(n)) for n in self.logical if n not in fp8})
        return f"{kind}, {len(fp8)} {'/'.join(fmts)} tensors" + (f", the rest {'/'.join(rest)}" if rest else "")

    # -- tensors

    def keys(self) -> list[str]:
        return list(self.logical)

    def __contains__(self, name: str) -> bool:
        return name in self._logical_set

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.tensors.shape(self._raw_key[name])
        if name in self.block_quant and self.block_quant[name][0] == "nvfp4":
            return (stored[0], 2 * stored[1])  # two 4-bit codes per byte
        return stored

    def code(self, name: str) -> str:
        return "F32" if name in self.block_quant else self._code(name)

    def is_float(self, name: str) -> bool:
        return name in self.block_quant or self._code(name) in FLOAT_CODES

    # GGUF sources (convert/gguf.py): the stored ggml type, and the exact MLX affine form of rows of a weight

    def ggml_type(self, name: str) -> str | None:
        get = getattr(self.tensors, "ggml_type", None)
        return None if get is None else get(self._raw_key[name])

    def affine_rows(self, name: str, start: int | None = None, stop: int | None = None):
        return self.tensors.affine_rows(self._raw_key[name], start, stop)

    def _block_sides(self, name: str) -> dict[str, np.ndarray]:
        fmt = self.block_quant[name][0]
        layer = name[: -len(".weight")]
        scales = {}
        for side in _BLOCK_COMFY_FORMATS[fmt][1]:
            raw = self.tensors.read(self._raw_key[f"{layer}.{side}"])
            scales[side] = np.array(raw.astype(mx.float32) if raw.dtype in (mx.bfloat16, mx.float16) else raw)
            if side == "weight_scale" and fmt != "int8_tensorwise":
                scales[side] = scales[side].astype(np.uint8)  # fp8 / e8m0 codes
        return scales

    def block_native(self, name: str) -> tuple:
        """An mxfp8 / nvfp4 comfy_quant weight in MLX's own mode: (weight, scales) for mxfp8, (weight, scales,
        per-tensor scale) for nvfp4; the file's codes and scales."""
        from . import comfy_quant

        fmt = self.block_quant[name][0]
        codes = np.array(self.tensors.read(self._raw_key[name]))
        sides = self._block_sides(name)
        if fmt == "mxfp8":
            return comfy_quant.to_mlx_mxfp8(codes, sides["weight_scale"])
        return comfy_quant.to_mlx_nvfp4(codes, sides["weight_scale"], sides["weight_scale_2"])

    def _block_decoded(self, name: str) -> np.ndarray:
        """A comfy_quant nvfp4 / mxfp8 / int8_tensorwise weight decoded exactly to float32 (the last one is kept,
        since the writer reads a tensor in slices of rows)."""
        from . import comfy_quant

        if self._decoded is not None and self._decoded[0] == name:
            return self._decoded[1]
        fmt, conf = self.block_quant[name]
        weight = np.array(self.tensors.read(self._raw_key[name]))
        values = comfy_quant.dequantize(fmt, weight, self._block_sides(name), conf)
        self._decoded = (name, values)
        return values

    def fp8_format(self, name: str) -> str | None:
        lay = self.layouts.get(name)
        return lay.fmt if lay else None

    def scale(self, name: str) -> np.ndarray | None:
        """The float32 scale of a weight (shape () or (out,)), None when it has none."""
        lay = self.layouts.get(name)
        if lay is None or lay.scale_key is None:
            return None
        value = np.array(self.tensors.read(self._raw_key[lay.scale_key]).astype(mx.float32))
        return value.reshape(()) if value.size == 1 else value.reshape(-1)

    def read_raw(self, name: str, start: int | None = None, stop: int | None = None) -> mx.array:
        if name in self.block_quant:
            return self.read(name, start, stop)
        return self.tensors.read(self._raw_key[name], start, stop)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> mx.array:
        """Rows of a tensor as stored, or, for fp8 or scaled weights, `decode(codes) * scale` in float32 (and
        comfy_quant block formats decoded exactly, in float32)."""
        if name in self.block_quant:
            return mx.array(self._block_decoded(name)[slice(start, stop)])
        raw = self.read_raw(name, start, stop)
        lay = self.layouts.get(name)
        if lay is None:
            return raw
        values = decode_fp8(raw, lay.fmt) if lay.fmt else raw.astype(mx.float32)
        scale = self.scale(name)
        if scale is None:
            return values
        if scale.ndim == 0:
            return values * mx.array(scale)
        rows = scale[slice(start, stop)] if values.ndim else scale
        return values * mx.array(rows).reshape((-1,) + (1,) * (values.ndim - 1))

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as read (a GGUF or comfy_quant weight reads as float32): what a slice costs in memory."""
        return int(np.prod(self.shape(name), dtype=np.int64)) * RAW_DTYPES[self.code(name)][0]

    def stored_nbytes(self, name: str) -> int:
        """Bytes of the tensor in the file (a quantized GGUF block type or a 4-bit weight takes less than `nbytes`)."""
        stored = getattr(self.tensors, "stored_nbytes", None)
        if stored is not None:
            return stored(self._raw_key[name])
        shape = self.tensors.shape(self._raw_key[name])
        return int(np.prod(shape, dtype=np.int64)) * RAW_DTYPES[self._code(name)][0]


# ComfyUI all-in-one checkpoints ("Save Checkpoint"): the diffusion model, the text encoder and the VAE in one
# file, each under its own prefix. (prefix, component kind); the SentencePiece model may sit beside the encoder.
ALL_IN_ONE = (("model.diffusion_model.", "transformer"), ("text_encoders.umt5xxl.transformer.", "text_encoder"), ("vae.", "vae"))
_ALL_IN_ONE_EXTRA = {"text_encoders.umt5xxl.spiece_model": ("text_encoder", "spiece_model")}


class PrefixView(TensorFile):
    """The tensors of one component inside a larger file, under names with its prefix removed."""

    def __init__(self, base: TensorFile, names: dict[str, str], label: str):
        self._base, self._map, self.label = base, names, label
        self.paths = base.paths
        self.metadata = {}
        self._shapes = {n: base.shape(k) for n, k in names.items()}
        self._codes = {n: base.code(k) for n, k in names.items()}

    def read(self, key, start=None, stop=None):
        return self._base.read(self._map[key], start, stop)

    def describe(self) -> str:
        return f"{self._base.describe()} [{self.label}]"


def split_all_in_one(tensors: TensorFile) -> tuple[dict[str, PrefixView], list[str]] | None:
    """An all-in-one checkpoint split by prefix: ({kind: view}, keys under none of the prefixes), or None when
    the file holds fewer than two components."""
    keys = tensors.keys()
    parts: dict[str, dict[str, str]] = {}
    labels = {}
    for prefix, kind in ALL_IN_ONE:
        names = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
        if names:
            parts[kind], labels[kind] = names, prefix
    if len(parts) < 2:
        return None
    for key, (kind, name) in _ALL_IN_ONE_EXTRA.items():
        if key in tensors and kind in parts:
            parts[kind][name] = key
    used = {k for names in parts.values() for k in names.values()}
    return {kind: PrefixView(tensors, names, labels[kind]) for kind, names in parts.items()}, sorted(set(keys) - used)


def _common_prefix(keys: list[str]) -> str:
    body = [k for k in keys if k not in ROOT_MARKERS]
    for prefix in PREFIXES:
        if body and all(k.startswith(prefix) for k in body):
            return prefix
    return ""


# ---------------------------------------------------------------------------------------------------
# what a set of keys is

# Checkpoints of models no family converts: (description, any of these keys or key patterns); each family's
# planner adds the variants of its own models it does not convert (`LOOKALIKES`), which are tried first.
_LOOKALIKES = [
    ("a Flux-style transformer (double/single stream blocks)", (r"double_blocks\.\d+\.img_attn\.qkv\..*",)),
    ("an LTX-Video transformer", (r"adaln_single\..*", r"patchify_proj\..*")),
    ("a Stable Diffusion UNet", (r"input_blocks\.\d+\..*", r"down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\..*")),
    ("a CLIP text encoder", (r"text_model\.encoder\.layers\.\d+\..*",)),
    ("a Llama-style language model", (r"(model\.)?layers\.\d+\.self_attn\.q_proj\..*",)),
    ("a Stable Diffusion / HunyuanVideo-style VAE", (r"encoder\.down\.\d+\.block\.\d+\..*", r"encoder\.down_blocks\.\d+\.resnets\.\d+\.conv1\.weight")),
]


@dataclass(frozen=True)
class Kind:
    kind: str | None  # "transformer", "text_encoder", "vae" or None
    naming: str | None
    description: str
    family: str | None = None


def _signatures() -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(family, kind, naming, description, required keys) of every family's planner (`SIGNATURES`)."""
    from mlx_video.families import FAMILIES, converter

    return [sig for name in FAMILIES for sig in getattr(converter(name), "SIGNATURES", ())]


def _lookalikes() -> list[tuple[str, tuple[str, ...]]]:
    from mlx_video.families import FAMILIES, converter

    return [lk for name in FAMILIES for lk in getattr(converter(name), "LOOKALIKES", ())] + _LOOKALIKES


def classify(keys, family: str | None = None) -> Kind:
    """What a set of keys is. Every signature is scored (a full match of its required keys counts, the more
    required keys the more specific); the most specific full match wins, and a tie between different kinds
    is reported as ambiguous instead of taking the first. `family`: the family asking (its planner), whose own
    signature wins a tie with another family's identical one (two families may share a checkpoint format)."""
    names = set(keys)
    # a required key written "!key" must be absent (e.g. T5 v1.1 against UMT5: no per-block position table)
    matches = [sig for sig in _signatures()
               if all((k[1:] not in names) if k.startswith("!") else (k in names) for k in sig[4])]
    if matches:
        best = max(len(sig[4]) for sig in matches)
        top = [sig for sig in matches if len(sig[4]) == best]
        top = [sig for sig in top if sig[0] == family] or top
        if len({(sig[0], sig[1], sig[2]) for sig in top}) > 1:
            return Kind(None, None, "ambiguous: it matches " + " and ".join(sig[3] for sig in top))
        family, kind, naming, description, _ = top[0]
        return _refined(Kind(kind, naming, description, family), names)
    for description, patterns in _lookalikes():
        for pattern in patterns:
            rx = re.compile(pattern)
            if any(rx.fullmatch(k) for k in names):
                return Kind(None, None, description)
    shown = ", ".join(sorted(names)[:4])
    return Kind(None, None, f"no model mlxvid knows (first keys: {shown})")


def _refined(kind: Kind, names: set) -> Kind:
    """The family planner's second look at a match (`refine_kind(kind, names)`), where it has one."""
    from mlx_video.families import converter

    refine = getattr(converter(kind.family), "refine_kind", None)
    return refine(kind, names) if refine is not None else kind


def lookalike(keys) -> str | None:
    """For a checkpoint that carries parts no converter knows, which model or variant it looks like."""
    names = set(keys)
    for description, patterns in _lookalikes():
        for pattern in patterns:
            rx = re.compile(pattern)
            if any(rx.fullmatch(k) for k in names):
                return description
    return None


def count_blocks(keys, pattern: str) -> int:
    """1 + the largest block index captured by `pattern` (group 1), 0 when none matches."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found) + 1 if found else 0


def embedded_spiece(source: ComponentSource) -> bytes | None:
    """The SentencePiece model some ComfyUI text encoder files embed as a uint8 tensor, if present."""
    if source.spiece_model is None:
        return None
    size = int(np.prod(source.tensors.shape(source._raw_key["spiece_model"]), dtype=object))
    if size > MAX_SPIECE_BYTES:
        raise MlxVideoError(f"{source.what}: its spiece_model tensor holds {size} bytes, more than a tokenizer model "
                            f"({MAX_SPIECE_BYTES} at most)")
    data = np.array(source.tensors.read(source._raw_key["spiece_model"])).astype(np.uint8).tobytes()
    return data or None


# ---------------------------------------------------------------------------------------------------
# fused parameters as one virtual tensor (see rules.PART_SEPARATOR): diffusers' split q/k/v read as our fused
# qkv, row range by row range, so the shared writer's one-to-one mapping applies unchanged

FUSED = "fused:"


class FusedParts(TensorFile):
    """`inner`'s tensors with each group of part keys (the keymap sends them to `name#0`, `name#1`, ...) shown
    as one tensor `fused:name`, their concatenation along axis 0; every other key is shown as is."""

    def __init__(self, inner: TensorFile, keymap: KeyMap, what: str):
        self.inner, self.paths, self.metadata = inner, inner.paths, inner.metadata
        self._shapes, self._codes, self._parts = {}, {}, {}
        groups: dict[str, dict[int, str]] = {}
        for key in inner.keys():
            hit = keymap.target(key)
            if hit is not None and is_part_key(hit[0]):
                if hit[1] is not None:
                    raise MlxVideoError(f"{what}: the part {key} needs a transform, which fused parts do not apply")
                name, _, index = hit[0].rpartition(PART_SEPARATOR)
                groups.setdefault(name, {})[int(index)] = key
            else:
                self._shapes[key], self._codes[key] = inner.shape(key), inner.code(key)
        for name, parts in sorted(groups.items()):
            if sorted(parts) != list(range(len(parts))):
                missing = sorted(set(range(max(parts) + 1)) - set(parts))
                raise MlxVideoError(f"{what}: {name} is split in parts but part(s) {missing} are missing")
            keys = [parts[i] for i in range(len(parts))]
            shapes = [inner.shape(k) for k in keys]
            codes = {inner.code(k) for k in keys}
            if len(codes) > 1 or len({s[1:] for s in shapes}) > 1:
                raise MlxVideoError(f"{what}: the parts of {name} ({', '.join(keys)}) differ in dtype or width")
            virtual = FUSED + name
            self._parts[virtual] = list(zip(keys, [s[0] for s in shapes]))
            self._shapes[virtual] = (sum(s[0] for s in shapes), *shapes[0][1:])
            self._codes[virtual] = codes.pop()

    def read(self, key, start=None, stop=None):
        if key not in self._parts:
            return self.inner.read(key, start, stop)
        start = 0 if start is None else start
        stop = self._shapes[key][0] if stop is None else stop
        pieces, offset = [], 0
        for part, rows in self._parts[key]:
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                pieces.append(self.inner.read(part, lo - offset, hi - offset))
            offset += rows
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)


# ---------------------------------------------------------------------------------------------------
# the other way round: a layer a checkpoint holds fused (e.g. ComfyUI's q|k|v) shown as the separate layers of the
# checkpoint format the key tables know, each an equal share of its rows


class SplitRows(TensorFile):
    """`inner`'s tensors with each layer whose name (the wrapper prefix aside) fully matches a pattern of `splits`,
    [(pattern, (name template, ...))], shown as len(templates) layers named by the templates (`re` replacement
    templates of the match): their weights and biases are equal consecutive row ranges of the fused ones; a side
    tensor of the layer (fp8 scales, comfy_quant) goes to every part whole when it is one value (or the JSON blob),
    else by the same rows. Every other key is shown as is."""

    def __init__(self, inner: TensorFile, splits, what: str):
        self.inner, self.paths, self.metadata = inner, inner.paths, inner.metadata
        self._shapes, self._codes, self._rows = {}, {}, {}
        prefix = _common_prefix(inner.keys())
        for key in inner.keys():
            parts = self._parts(key[len(prefix):] if key.startswith(prefix) else key, splits)
            if parts is None:
                self._shapes[key], self._codes[key] = inner.shape(key), inner.code(key)
                continue
            shape, whole = inner.shape(key), key.endswith(".comfy_quant") or int(np.prod(inner.shape(key))) == 1
            if not whole and (not shape or shape[0] % len(parts)):
                raise MlxVideoError(f"{what}: {key} has shape {shape}, which does not split into the {len(parts)} "
                                    f"layers ({', '.join(parts)}) it fuses")
            n = None if whole else shape[0] // len(parts)
            for i, name in enumerate(parts):
                virtual = prefix + name
                self._shapes[virtual] = shape if whole else (n, *shape[1:])
                self._codes[virtual] = inner.code(key)
                self._rows[virtual] = (key, None if whole else i * n)

    @staticmethod
    def _parts(name: str, splits) -> list[str] | None:
        """The part names of a fused layer's tensor (`<layer>.<param>`), None when its layer is not split."""
        layer, _, param = name.rpartition(".")
        for pattern, templates in splits:
            m = re.fullmatch(pattern, layer)
            if m is not None:
                return [f"{m.expand(t)}.{param}" for t in templates]
        return None

    def read(self, key, start=None, stop=None):
        if key not in self._rows:
            return self.inner.read(key, start, stop)
        fused, first = self._rows[key]
        if first is None:
            return self.inner.read(fused, start, stop)
        start = 0 if start is None else start
        stop = self._shapes[key][0] if stop is None else stop
        return self.inner.read(fused, first + start, first + stop)


def fused_keymap(keymap: KeyMap) -> KeyMap:
    """`keymap` plus the identity on `FusedParts`' virtual keys."""
    rules = [Rule(rf"{FUSED}(.+)", r"\1"), *[rule for _, rule in keymap.rules]]
    return KeyMap(rules, [p.pattern for p in keymap.ignore], keymap.transforms)
