"""The MLX-native model folder that `mlxvid convert` writes and the runtime loads.

Layout:
    mlxvid.json                     what the folder holds (family, registry model, dtype, pipeline settings)
    transformer/config.json         our config dataclass, as JSON
    transformer/model-00001-of-0000N.safetensors, model.safetensors.index.json
    transformer_2/ ...              (A14B: the low-noise expert)
    text_encoder/ ...               (UMT5 encoder)
    tokenizer/spiece.model and/or tokenizer/tokenizer.json
    tokenizer_2/ ...                (a second tokenizer, e.g. HunyuanVideo's CLIP; any tokenizer* folder holds
                                    tokenizer files only, no weights)
    <component>/quantization.json   only when some layers are stored quantized (`mlxvid convert --quantize`):
                                    {"mode": "affine", "bits", "group_size", "layers": [...]} for q8/q4 (GGUF
                                    weights and comfy_quant mxfp8 kept in their codes add "per_layer":
                                    {layer: {"bits", "group_size"[, "mode": "mxfp8" | "nvfp4", "tensor_scale"]}},
                                    overriding the defaults, and "scales": "float32"), or
                                    {"mode": "fp8", "layers": {layer: "e4m3fn" | "e5m2"}} for fp8 codes + weight_scale
Weights are loaded lazily (MLX reads a tensor when it is first used), one component at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxVideoError
from .io.safetensors import check_shard, read_weight_map
from .json_config import ConfigSource
from .nn.linear import Fp8Linear
from .registry import MODELS, ModelSpec, get_spec, models_home

MANIFEST = "mlxvid.json"
FORMAT_VERSION = 1
INDEX = "model.safetensors.index.json"
QUANTIZATION = "quantization.json"  # per component, when some of its layers are stored quantized

LAYOUT_HELP = (
    "an mlxvid model folder holds mlxvid.json, transformer/ (and transformer_2/ for A14B), text_encoder/ and "
    "tokenizer/, as written by `mlxvid convert SRC DST`"
)

DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}
DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or an `MlxVideoError` naming the file, what is wrong and `fix`."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MlxVideoError(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise MlxVideoError(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise MlxVideoError(f"{path} is not valid JSON (it nests too deeply); {fix}") from None
    except OSError as e:
        raise MlxVideoError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    if not isinstance(data, dict):
        raise MlxVideoError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def dtype_from_name(name: str) -> mx.Dtype:
    for d, n in DTYPE_NAMES.items():
        if n == name:
            return d
    raise MlxVideoError(f"unknown dtype {name!r} in {MANIFEST}")


@dataclass
class ModelFolder:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        if path.is_file():
            raise MlxVideoError(f"{path} is a file, not a converted model folder; convert it once with `mlxvid convert "
                                f"{path} DST` (a checkpoint file) and pass DST")
        if not path.is_dir():
            raise MlxVideoError(f"model folder {path} does not exist; {LAYOUT_HELP}")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            if (path / "model_index.json").is_file():
                raise MlxVideoError(
                    f"{path} is a diffusers folder; convert it once with `mlxvid convert {path} DST` and pass DST"
                )
            raise MlxVideoError(f"{path} has no {MANIFEST}; {LAYOUT_HELP}")
        manifest = read_json_object(manifest_path, "re-run `mlxvid convert`")
        components = manifest.get("components")
        if not isinstance(components, list) or not all(isinstance(c, str) and _plain_name(c) for c in components):
            raise MlxVideoError(
                f"{manifest_path}: 'components' must be a list of folder names; re-run `mlxvid convert`"
            )
        if not isinstance(manifest.get("dtype"), str):
            raise MlxVideoError(f"{manifest_path}: 'dtype' must name a dtype; re-run `mlxvid convert`")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise MlxVideoError(
                f"{manifest_path} has format version {manifest.get('format_version')}; this mlxvid reads version "
                f"{FORMAT_VERSION}: re-run `mlxvid convert`"
            )
        folder = cls(path, manifest)
        for component in folder.components:
            folder._check_component(component)
        return folder

    @property
    def spec(self) -> ModelSpec:
        try:
            return self._spec()
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise MlxVideoError(
                f"{self.path / MANIFEST} is malformed ({type(e).__name__}: {e}); re-run `mlxvid convert`"
            ) from None

    def _spec(self) -> ModelSpec:
        """The model this folder holds: the manifest's own description and defaults, with the registry entry
        of the same id (if any) filling in only what the manifest lacks. A fine-tune or distilled checkpoint
        whose id the registry does not know runs from its manifest alone."""
        m = self.manifest
        known = MODELS.get(m.get("model"))
        family = m.get("family") or (known.family if known else None)
        if family is None:
            raise MlxVideoError(f"{self.path / MANIFEST} names no model family; re-run `mlxvid convert`")
        defaults = dict(known.defaults) if known else {}
        defaults.update({k: v for k, v in (m.get("defaults") or {}).items() if v is not None})
        for legacy in ("boundary", "text_len", "per_frame_timesteps"):  # written at the top level by version 1
            if m.get(legacy) is not None and legacy not in (m.get("defaults") or {}):
                defaults[legacy] = m[legacy]

        def pick(name, fallback=None):
            if m.get(name) is not None:
                return m[name]
            return getattr(known, name) if known else fallback

        vae_stride = tuple(pick("vae_stride") or ())
        sizes = tuple(tuple(s) for s in (pick("sizes") or ()))
        missing = [n for n, v in (("task", pick("task")), ("vae_stride", vae_stride), ("size_multiple", pick("size_multiple")),
                                  ("sizes", sizes)) if not v]
        if missing:
            raise MlxVideoError(
                f"{self.path / MANIFEST} lacks {', '.join(missing)} and its model {m.get('model')!r} is not in the registry; "
                "re-convert it with `mlxvid convert --base MODEL_ID` naming the published model it derives from"
            )
        return ModelSpec(
            id=m.get("model") or self.path.name, family=family, task=pick("task"), vae_stride=vae_stride,
            size_multiple=int(pick("size_multiple")), sizes=sizes, defaults=defaults,
            hf_repo=known.hf_repo if known else None,
            experts=int(m.get("experts") or (known.experts if known else 1)),
            transformer=known.transformer if known else None,
            description=known.description if known else f"converted model {m.get('model')!r}",
            frame_offset=int(pick("frame_offset", 1)),
        )

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    @property
    def dtype(self) -> mx.Dtype:
        return dtype_from_name(self.manifest["dtype"])

    def has(self, component: str) -> bool:
        return component in self.manifest["components"]

    def _check_component(self, component: str) -> None:
        d = self.path / component
        if component.startswith("tokenizer"):  # tokenizer/, tokenizer_2/ ...: tokenizer files, no weights
            # (a byte tokenizer, ByT5's, has no vocabulary file: its added tokens are all it stores)
            if not any((d / name).is_file() for name in ("spiece.model", "tokenizer.json", "added_tokens.json")):
                raise MlxVideoError(f"missing {d}/spiece.model or {d}/tokenizer.json; {LAYOUT_HELP}")
            return
        if component == "feature_extractor":  # an image preprocessor's settings, no weights
            if not (d / "preprocessor_config.json").is_file():
                raise MlxVideoError(f"missing {d}/preprocessor_config.json; {LAYOUT_HELP}")
            return
        for name in ("config.json", INDEX):
            if not (d / name).is_file():
                raise MlxVideoError(f"missing {d / name}; {LAYOUT_HELP}")
        self.config(component)
        weight_map = read_weight_map(d / INDEX)
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_shard.items()):
            if not (d / shard).is_file():
                raise MlxVideoError(f"missing weight shard {d / shard} (listed in {d / INDEX}); re-run `mlxvid convert`")
            try:  # the header and the file's size, not the data: cheap, and before any long work starts
                check_shard(d / shard, keys)
            except MlxVideoError as e:
                raise MlxVideoError(f"{e}; re-run `mlxvid convert`") from None

    def config(self, component: str) -> dict:
        path = self.path / component / "config.json"
        return ConfigSource(read_json_object(path, "re-run `mlxvid convert`"), str(path))

    def weights(self, component: str) -> dict[str, mx.array]:
        """All tensors of a component, lazily: nothing is read from disk until an array is used."""
        d = self.path / component
        weights: dict[str, mx.array] = {}
        for shard in sorted(set(read_weight_map(d / INDEX).values())):
            try:
                weights.update(mx.load(str(d / shard)))
            except (RuntimeError, ValueError, OSError) as e:  # MLX's own checks of a file changed since open()
                raise MlxVideoError(f"cannot read {d / shard} ({e}); re-run `mlxvid convert`") from None
        return weights

    def quantization(self, component: str) -> dict | None:
        """The component's quantization.json (which layers are stored quantized, and how), or None."""
        path = self.path / component / QUANTIZATION
        if not path.is_file():
            return None
        record = read_json_object(path, "re-run `mlxvid convert`")
        if record.get("mode") not in ("affine", "fp8"):
            raise MlxVideoError(f"{path} names an unknown quantization mode; re-run `mlxvid convert`")
        return record

    def load_module(self, component: str, module) -> None:
        """Load a component's weights into `module`, refusing missing or unexpected tensors.

        For a quantized component the layers listed in its quantization.json are first replaced: by
        `nn.QuantizedLinear` (affine q8/q4) or by `Fp8Linear` (fp8 codes decoded when the layer runs).
        """
        from mlx.utils import tree_flatten

        weights = self.weights(component)
        record = self.quantization(component)
        if record is not None:
            _prepare_quantized(module, record, weights, self.dtype, self.path / component)
        expected = dict(tree_flatten(module.parameters()))
        missing = sorted(set(expected) - set(weights))
        unknown = sorted(set(weights) - set(expected))
        if missing or unknown:
            raise MlxVideoError(
                f"{self.path / component} does not match the model: "
                + (f"missing {len(missing)} tensors (first: {missing[0]}) " if missing else "")
                + (f"unexpected {len(unknown)} tensors (first: {unknown[0]})" if unknown else "")
            )
        for k, w in weights.items():
            if tuple(w.shape) != tuple(expected[k].shape):
                raise MlxVideoError(
                    f"{self.path / component}: tensor {k} has shape {tuple(w.shape)}, the model expects "
                    f"{tuple(expected[k].shape)}"
                )
        module.load_weights(list(weights.items()), strict=True)
        if hasattr(module, "set_compute_dtype"):
            module.set_compute_dtype(self.dtype)  # what the weights were converted to, per the manifest


class SameDtypeQuantizedLinear(nn.QuantizedLinear):
    """A quantized layer kept in its file's codes (convert/quantize.py): MLX affine with float32 scales and biases
    (GGUF), or MLX mxfp8 (comfy_quant). Its output is returned in the input's dtype, as any other linear layer's."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y if y.dtype == x.dtype else y.astype(x.dtype)


class TensorScaledQuantizedLinear(SameDtypeQuantizedLinear):
    """An MLX nvfp4 layer holding comfy_quant nvfp4 codes: `quantized_matmul` gives x @ (e2m1 * e4m3)^T, and
    the file's per-tensor scale (`tensor_scale`, float32) multiplies that before the bias is added."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_scale = mx.ones((), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=self.get("biases"), transpose=True,
                                group_size=self.group_size, bits=self.bits, mode=self.mode) * self["tensor_scale"]
        if "bias" in self:
            y = y + self["bias"]
        return y if y.dtype == x.dtype else y.astype(x.dtype)


def _prepare_quantized(module, record: dict, weights: dict, dtype, where: Path) -> None:
    """Swap the listed nn.Linear layers of `module` for their quantized counterparts."""
    from mlx.utils import tree_flatten, tree_unflatten

    leaves = dict(tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module))
    layers = record.get("layers") or []
    names = list(layers)
    bad = [p for p in names if not isinstance(leaves.get(p), nn.Linear)]
    if bad:
        raise MlxVideoError(f"{where}/{QUANTIZATION} lists {bad[0]}, which is not a linear layer of the model")
    if record["mode"] == "affine" and (record.get("per_layer") or record.get("scales") == "float32"):
        per_layer = record.get("per_layer") or {}
        cls = SameDtypeQuantizedLinear
        replacements = []
        for path in names:
            params = per_layer.get(path) or {}
            linear = leaves[path]
            out_dims, in_dims = linear.weight.shape
            kind = TensorScaledQuantizedLinear if params.get("tensor_scale") else cls
            layer = kind(in_dims, out_dims, "bias" in linear, group_size=int(params.get("group_size", record["group_size"])),
                        bits=int(params.get("bits", record["bits"])), mode=params.get("mode", "affine"))
            replacements.append((path, layer))
        module.update_modules(tree_unflatten(replacements))
        return
    if record["mode"] == "affine":
        chosen = set(names)
        nn.quantize(
            module,
            group_size=int(record["group_size"]),
            bits=int(record["bits"]),
            class_predicate=lambda path, m: path in chosen,
        )
        return
    replacements = []
    for path in names:
        linear = leaves[path]
        out_dims, in_dims = linear.weight.shape
        scale = weights.get(f"{path}.weight_scale")
        replacements.append(
            (path, Fp8Linear(in_dims, out_dims, "bias" in linear, layers[path], () if scale is None else scale.shape, dtype))
        )
    module.update_modules(tree_unflatten(replacements))


def resolve_model(model: str) -> ModelFolder:
    """`--model` takes a folder or a registry id (looked up under the models home)."""
    path = Path(model).expanduser()
    if path.exists():
        return ModelFolder.open(path)
    spec = get_spec(model)  # raises, listing the known ids, for anything else
    home = models_home() / spec.id
    if not (home / MANIFEST).is_file():
        raise MlxVideoError(
            f"model {spec.id} is not converted yet (looked in {home}). Run `mlxvid download {spec.id}`, or download "
            f"huggingface.co/{spec.hf_repo} yourself and run: mlxvid convert PATH/TO/{spec.hf_repo.split('/')[-1]} {home}"
        )
    return ModelFolder.open(home)
