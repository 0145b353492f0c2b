"""Output precisions: which layers are stored in low precision, and how each output tensor is produced.

The rule (one for every model):
    Only the weight matrices of the linear layers inside the repeated blocks are stored in low precision: in
    the diffusion transformer self- and cross-attention q, k, v, o and the two feed-forward layers; in the
    UMT5 text encoder attention q, k, v, o and the gated feed-forward's three layers. Everything else stays in
    --dtype: biases, norms, the modulation tables, the patch, text and time embeddings, the time projection,
    the output head, the token embedding, the relative position biases, and the whole VAE. With q8/q4 a layer
    whose input width is not a multiple of --group-size also stays in --dtype.
    The patterns below name Wan's layers; a family that names its block layers otherwise sets its own pattern
    on each component's plan (`ComponentPlan.low_precision`, see `covered`).
    A family may also name tensors that are stored in float32 whatever --dtype and --quantize say
    (`ComponentPlan.keep_fp32`), for those its reference keeps in float32.

Modes:
    q8, q4  MLX affine quantization (`mx.quantize`): per row, groups of `group_size` inputs share a scale and
            a bias (stored in --dtype); the runtime builds `nn.QuantizedLinear` layers for them.
    fp8     float8 e4m3fn codes with one float32 scale per tensor (`weight_scale`), decoded as
            `(decode(codes) * scale).astype(dtype)` when the layer runs. An fp8 source keeps its codes and
            scales bit for bit (e5m2 codes too); a float source is encoded with scale = max|W| / 448, as ComfyUI
            does.

GGUF sources (convert/gguf.py): a weight the rule above covers, stored in a type whose values are exactly
`scale * q + bias` per 32 inputs (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K), stays quantized
when no --quantize is given: it is written as an MLX affine layer of that type's bits (8, 4 or 5), group size
32, with float32 scales and biases, which reproduce llama.cpp's values exactly (float16 scales would not:
see `gguf.to_mlx_affine`). It costs 2 bits per weight more than the GGUF block (Q8_0 10 instead of 8.5, Q4_0
6 instead of 4.5). Every other GGUF tensor (Q2_K, Q3_K, Q6_K, the layers outside the rule, a layer of a
2-D shape the model transposes) is dequantized exactly and stored in --dtype; with --quantize every weight is
dequantized first and then re-quantized, which adds that mode's error on top of the GGUF one.

ComfyUI `comfy_quant` weights under the same rule, without --quantize: mxfp8 stays in MLX's own "mxfp8" mode
(the file's e4m3 codes and e8m0 block scales, exact); nvfp4 in MLX's "nvfp4" mode (the file's e2m1 codes and
e4m3 block scales) with the per-tensor scale kept beside it as `<layer>.tensor_scale` and applied to the
layer's output (MLX's nvfp4 matmul takes no per-tensor scale). int8_tensorwise weights are decoded exactly
and stored in --dtype (they fit the affine mode only up to a rounding), as are all of them with --quantize.

Every tensor is produced in slices of rows, so converting never holds a whole large tensor in memory (a
tensor whose key-map transform reorders its elements is the exception, and only small ones have that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError

from .fp8 import E4M3FN_MAX, encode_e4m3fn
from .formats import ComponentSource
from .gguf import AFFINE_BITS as GGUF_AFFINE_BITS
from .gguf import AFFINE_GROUP_SIZE as GGUF_GROUP_SIZE

MODES = {"q8": ("affine", 8), "q4": ("affine", 4), "fp8": ("fp8", 8)}
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64

LOW_PRECISION_LAYERS = {
    "transformer": re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.fc[12])\.weight"),
    "text_encoder": re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.(gate|fc1|fc2))\.weight"),
}
# component name -> rule applied
QUANTIZED_COMPONENTS = {"transformer": "transformer", "transformer_2": "transformer", "text_encoder": "text_encoder"}

OUT_CODES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32", mx.uint8: "U8"}
DTYPE_BY_CODE = {code: dtype for dtype, code in OUT_CODES.items()}
DTYPE_BY_NAME = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}

# Key-map transforms that only reshape: the element order on disk is unchanged, so they stream like a copy.
RESHAPE_ONLY = {"drop_leading_unit_axis", "channel_first_gamma", "conv1x1_to_linear"}

CHUNK_BYTES = 32 * 1024 * 1024  # source bytes read per slice
ENCODE_PIECE = 1 << 20  # elements encoded to fp8 at a time


def check_options(quantize: str | None, group_size: int) -> None:
    if quantize is not None and quantize not in MODES:
        raise MlxVideoError(f"--quantize must be one of {', '.join(MODES)}, not {quantize!r}")
    if group_size not in GROUP_SIZES:
        raise MlxVideoError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")


def covered(component: str, target: str, rule: re.Pattern | None = None) -> bool:
    """Whether the rule puts the target tensor in low precision: the family's own `rule` (the `low_precision`
    its planner sets on the component's plan, a pattern the whole key must match) or, without one, the
    default patterns above by component name."""
    if rule is not None:
        return bool(rule.fullmatch(target))
    return component in QUANTIZED_COMPONENTS and bool(LOW_PRECISION_LAYERS[QUANTIZED_COMPONENTS[component]].fullmatch(target))


def is_low_precision(component: str, target: str, shape: tuple[int, ...], quantize: str | None, group_size: int,
                     rule: re.Pattern | None = None) -> bool:
    """Whether the target tensor is stored in the --quantize format (see the module docstring)."""
    if quantize is None or not covered(component, target, rule) or len(shape) != 2:
        return False
    if MODES[quantize][0] == "affine" and shape[1] % group_size:
        return False
    return True


@dataclass(frozen=True)
class OutTensor:
    name: str
    code: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "U8": 1}[self.code]
        for s in self.shape:
            n *= s
        return n


@dataclass
class Item:
    """One parameter of our module and how it is made from the source."""

    target: str
    source_key: str
    transform: str | None
    shape: tuple[int, ...]  # the target shape (after the transform)
    mode: str  # "cast", "copy" (non-float), "affine", "fp8_copy", "fp8_encode"; kept as stored: "gguf_affine",
    # "mxfp8_copy", "nvfp4_copy"
    outputs: list[OutTensor]


def plan_item(
    component: str,
    target: str,
    source_key: str,
    transform: str | None,
    shape: tuple[int, ...],
    source: ComponentSource,
    dtype: str,
    quantize: str | None,
    group_size: int,
    rule: re.Pattern | None = None,
    keep_fp32: re.Pattern | None = None,
) -> Item:
    out_code = OUT_CODES[DTYPE_BY_NAME[dtype]]
    if not source.is_float(source_key):
        return Item(target, source_key, transform, shape, "copy", [OutTensor(target, source.code(source_key), shape)])
    if keep_fp32 is not None and keep_fp32.fullmatch(target):
        return Item(target, source_key, transform, shape, "cast", [OutTensor(target, "F32", shape)])
    if keeps_gguf_codes(component, target, source_key, transform, shape, source, quantize, rule):
        rows, cols = shape
        bits = GGUF_AFFINE_BITS[source.ggml_type(source_key)]
        base = target[: -len(".weight")]
        return Item(target, source_key, transform, shape, "gguf_affine", [
            OutTensor(target, "U32", (rows, cols * bits // 32)),
            OutTensor(f"{base}.scales", "F32", (rows, cols // GGUF_GROUP_SIZE)),
            OutTensor(f"{base}.biases", "F32", (rows, cols // GGUF_GROUP_SIZE)),
        ])
    if keeps_block_codes(component, target, source_key, transform, shape, source, quantize, rule):
        rows, cols = shape
        base = target[: -len(".weight")]
        if source.block_quant[source_key][0] == "mxfp8":
            return Item(target, source_key, transform, shape, "mxfp8_copy", [
                OutTensor(target, "U32", (rows, cols // 4)), OutTensor(f"{base}.scales", "U8", (rows, cols // 32)),
            ])
        return Item(target, source_key, transform, shape, "nvfp4_copy", [
            OutTensor(target, "U32", (rows, cols // 8)), OutTensor(f"{base}.scales", "U8", (rows, cols // 16)),
            OutTensor(f"{base}.tensor_scale", "F32", ()),
        ])
    if not is_low_precision(component, target, shape, quantize, group_size, rule):
        return Item(target, source_key, transform, shape, "cast", [OutTensor(target, out_code, shape)])
    base = target[: -len(".weight")]
    kind, bits = MODES[quantize]
    if kind == "affine":
        rows, cols = shape
        return Item(target, source_key, transform, shape, "affine", [
            OutTensor(target, "U32", (rows, cols * bits // 32)),
            OutTensor(f"{base}.scales", out_code, (rows, cols // group_size)),
            OutTensor(f"{base}.biases", out_code, (rows, cols // group_size)),
        ])
    if source.fp8_format(source_key) is not None and (transform is None or transform in RESHAPE_ONLY):
        scale = source.layouts[source_key].scale_key
        scale_shape = () if scale is None else (() if _size(source.tensors.shape(source._raw_key[scale])) == 1 else (shape[0],))
        return Item(target, source_key, transform, shape, "fp8_copy",
                    [OutTensor(target, "U8", shape), OutTensor(f"{base}.weight_scale", "F32", scale_shape)])
    return Item(target, source_key, transform, shape, "fp8_encode",
                [OutTensor(target, "U8", shape), OutTensor(f"{base}.weight_scale", "F32", ())])


def keeps_gguf_codes(component, target, source_key, transform, shape, source: ComponentSource, quantize, rule=None) -> bool:
    """Whether a GGUF weight is written in its exact MLX affine form (see the module docstring)."""
    if quantize is not None or source.ggml_type(source_key) not in GGUF_AFFINE_BITS:
        return False
    if transform is not None and transform not in RESHAPE_ONLY:
        return False
    if len(shape) != 2 or tuple(source.shape(source_key)) != tuple(shape) or shape[1] % GGUF_GROUP_SIZE:
        return False
    return covered(component, target, rule)


BLOCK_NATIVE = {"mxfp8": 32, "nvfp4": 16}  # comfy_quant formats MLX holds natively -> group size


def keeps_block_codes(component, target, source_key, transform, shape, source: ComponentSource, quantize, rule=None) -> bool:
    """Whether a comfy_quant mxfp8 / nvfp4 weight is written in MLX's own mode (see the module docstring)."""
    fmt = source.block_quant.get(source_key, (None,))[0]
    if quantize is not None or fmt not in BLOCK_NATIVE or transform is not None:
        return False
    if len(shape) != 2 or tuple(source.shape(source_key)) != tuple(shape) or shape[1] % BLOCK_NATIVE[fmt]:
        return False
    return covered(component, target, rule)


def kept_codes_record(items: list[Item]) -> dict | None:
    """quantization.json for the weights kept in their file's codes: the affine record with each layer's own
    settings under "per_layer" (a GGUF file may mix Q8_0, Q4_K, Q5_0 ... layers; mxfp8 layers name their
    mode), and "scales": "float32" (the GGUF layers' scales and biases)."""
    kept = [i for i in items if i.mode in ("gguf_affine", "mxfp8_copy", "nvfp4_copy")]
    if not kept:
        return None
    per_layer = {}
    for i in kept:
        if i.mode == "mxfp8_copy":
            per_layer[i.target[: -len(".weight")]] = {"bits": 8, "group_size": 32, "mode": "mxfp8"}
        elif i.mode == "nvfp4_copy":
            per_layer[i.target[: -len(".weight")]] = {"bits": 4, "group_size": 16, "mode": "nvfp4", "tensor_scale": True}
        else:
            per_layer[i.target[: -len(".weight")]] = {"bits": i.outputs[0].shape[1] * 32 // i.shape[1], "group_size": GGUF_GROUP_SIZE}
    counts: dict[int, int] = {}
    for p in per_layer.values():
        counts[p["bits"]] = counts.get(p["bits"], 0) + 1
    return {
        "mode": "affine", "bits": max(counts, key=counts.get), "group_size": GGUF_GROUP_SIZE, "layers": list(per_layer),
        "per_layer": per_layer, "scales": "float32",
    }


def _size(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _host(x: mx.array) -> np.ndarray:
    """An MLX array as numpy bytes-compatible data (bf16 as its uint16 bit patterns)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(x)


def _row_chunks(source: ComponentSource, key: str, out_row_bytes: int) -> Iterator[tuple[int, int]]:
    shape = source.shape(key)
    if len(shape) == 0:
        yield (None, None)
        return
    rows = shape[0]
    per_row = max(out_row_bytes, source.nbytes(key) // max(rows, 1), 1)
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _check_finite(x: mx.array, item: Item, source: ComponentSource) -> None:
    if not bool(mx.all(mx.isfinite(x)).item()):
        raise MlxVideoError(
            f"{source.what}: tensor {item.source_key} contains NaN or infinite values; the checkpoint is corrupt"
        )


Writer = Callable[[str, int, np.ndarray], None]  # (output name, byte offset in that tensor, data)


def produce(
    item: Item,
    source: ComponentSource,
    transforms: dict,
    dtype: str,
    group_size: int,
    write: Writer,
) -> None:
    """Compute the item's output tensors slice by slice and hand the bytes to `write` (one step per mode)."""
    # Slices are rows of the source. A reshape-only transform keeps the bytes in order, which is all a cast or a
    # copy needs; quantizing needs the target's rows, so any transform then reads the tensor whole.
    whole = item.transform is not None and (item.transform not in RESHAPE_ONLY or item.mode in ("affine", "fp8_encode"))
    step = _PRODUCERS.get(item.mode)
    if step is None:
        raise AssertionError(item.mode)
    step(_Job(item, source, transforms, DTYPE_BY_NAME[dtype], group_size, write, whole))


@dataclass
class _Job:
    """One item being produced: what `produce` hands each mode's step."""

    item: Item
    source: ComponentSource
    transforms: dict
    target_dtype: object
    group_size: int
    write: Writer
    whole: bool

    def rows(self, start, stop) -> mx.array:
        x = _read_rows(self.source, self.item, self.transforms, self.whole, start, stop)
        _check_finite(x, self.item, self.source)
        return x


def _write_raw_rows(job: _Job, row_bytes: int) -> None:
    """The source's stored bytes, rows at a time, into the first output."""
    item, source = job.item, job.source
    offset = 0
    for start, stop in _row_chunks(source, item.source_key, row_bytes):
        data = _host(source.read_raw(item.source_key, start, stop))
        job.write(item.outputs[0].name, offset, data)
        offset += data.nbytes


def _produce_copy(job: _Job) -> None:
    item, first = job.item, job.item.outputs[0]
    if job.whole:
        job.write(first.name, 0, _host(job.transforms[item.transform](job.source.read_raw(item.source_key))))
        return
    _write_raw_rows(job, 0)


def _produce_cast(job: _Job) -> None:
    item, source, first = job.item, job.source, job.item.outputs[0]
    target_dtype = DTYPE_BY_CODE[first.code]  # --dtype, or float32 for a tensor the plan keeps in float32
    if job.whole:
        x = source.read(item.source_key)
        _check_finite(x, item, source)
        job.write(first.name, 0, _host(job.transforms[item.transform](x).astype(target_dtype)))
        return
    offset = 0
    row_bytes = first.nbytes // max(item.shape[0], 1) if item.shape else first.nbytes
    for start, stop in _row_chunks(source, item.source_key, row_bytes):
        x = source.read(item.source_key, start, stop)
        _check_finite(x, item, source)
        data = _host(x.astype(target_dtype))
        job.write(first.name, offset, data)
        offset += data.nbytes
        del x, data


def _produce_affine(job: _Job) -> None:
    item = job.item
    bits = item.outputs[0].shape[1] * 32 // item.shape[1]
    rows_out = [o.nbytes // item.shape[0] for o in item.outputs]
    for start, stop in _chunks_for(job.source, item, job.whole, sum(rows_out)):
        x = job.rows(start, stop)
        q, scales, biases = mx.quantize(x.astype(job.target_dtype), group_size=job.group_size, bits=bits)
        for out, part, per_row in zip(item.outputs, (q, scales, biases), rows_out):
            job.write(out.name, (start or 0) * per_row, _host(part))
        del x, q, scales, biases


def _produce_gguf_affine(job: _Job) -> None:
    item, source = job.item, job.source
    rows_out = [o.nbytes // item.shape[0] for o in item.outputs]
    for start, stop in _row_chunks(source, item.source_key, sum(rows_out)):
        aff = source.affine_rows(item.source_key, start, stop)
        for out, part, per_row in zip(item.outputs, (aff.weight, aff.scales, aff.biases), rows_out):
            job.write(out.name, start * per_row, _host(part))
        del aff


def _produce_block_native(job: _Job) -> None:
    parts = job.source.block_native(job.item.source_key)
    for out, part in zip(job.item.outputs, parts):
        job.write(out.name, 0, _host(part) if isinstance(part, mx.array) else np.array(part, dtype=np.float32).reshape(()))


def _produce_fp8_copy(job: _Job) -> None:
    item = job.item
    _write_raw_rows(job, item.shape[1] if len(item.shape) > 1 else 1)
    scale = job.source.scale(item.source_key)
    scale = np.ones((), np.float32) if scale is None else scale.astype(np.float32)
    job.write(item.outputs[1].name, 0, scale.reshape(item.outputs[1].shape))


def _produce_fp8_encode(job: _Job) -> None:
    item, first = job.item, job.item.outputs[0]
    amax = 0.0
    chunks = list(_chunks_for(job.source, item, job.whole, item.shape[1]))
    for start, stop in chunks:
        amax = max(amax, float(mx.max(mx.abs(job.rows(start, stop).astype(mx.float32))).item()))
    scale = np.float32(amax) / np.float32(E4M3FN_MAX) if amax > 0 else np.float32(1.0)
    for start, stop in chunks:
        x = np.asarray(_read_rows(job.source, item, job.transforms, job.whole, start, stop).astype(mx.float32)).reshape(-1)
        base = (start or 0) * item.shape[1]
        for lo in range(0, x.size, ENCODE_PIECE):  # the encoder's temporaries are ~10x its input: keep it small
            job.write(first.name, base + lo, encode_e4m3fn(x[lo : lo + ENCODE_PIECE] / scale))
        del x
    job.write(item.outputs[1].name, 0, np.array(scale, dtype=np.float32).reshape(()))


_PRODUCERS = {
    "copy": _produce_copy, "cast": _produce_cast, "affine": _produce_affine, "gguf_affine": _produce_gguf_affine,
    "mxfp8_copy": _produce_block_native, "nvfp4_copy": _produce_block_native, "fp8_copy": _produce_fp8_copy,
    "fp8_encode": _produce_fp8_encode,
}


def _chunks_for(source: ComponentSource, item: Item, whole: bool, out_row_bytes: int):
    if whole:
        return [(0, item.shape[0])]
    return list(_row_chunks(source, item.source_key, out_row_bytes))


def _read_rows(source: ComponentSource, item: Item, transforms: dict, whole: bool, start, stop) -> mx.array:
    """Rows [start, stop) of the item's target tensor, float."""
    if whole:
        return transforms[item.transform](source.read(item.source_key))[start:stop]
    return source.read(item.source_key, start, stop)


def item_nbytes(item: Item) -> int:
    return sum(o.nbytes for o in item.outputs)

