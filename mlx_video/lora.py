"""LoRA files: read the formats people download, check them against a model before any step, fuse them.

Formats (safetensors), recognised per key:
    diffusers / PEFT   `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight` (optional `.lora_B.bias`);
                       scale lora_alpha / r from the `lora_adapter_metadata` header if present, else 1
    ComfyUI / lightx2v `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`
                       (also lora_A/lora_B, `.lora.down/up`, `_lora.down/up`, `.lora_linear_layer.down/up`),
                       scale alpha / rank (1 without alpha); full deltas `.diff` (ΔW) and `.diff_b` (Δbias)
    kohya / musubi     `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`

Module names are mapped onto ours through the family's converter key tables (the same tables that convert
its checkpoints), so a LoRA on `blocks.0.attn1.to_q` (diffusers) or `blocks.0.self_attn.q` (official) lands
on the layer those weights were converted into. Where the table sends a layer to one slice of a fused layer of
ours (a part key `name#i`: diffusers' separate to_q / to_k / to_v against one q|k|v projection), its delta
fills the rows of that slice; the family gives the slices' sizes (`parts`: our layer -> sizes along the
output axis). The other way round, where a file holds fused what our model keeps apart (ComfyUI's q|k|v of a
model whose checkpoint has q, k, v), the family's `splits` give each of our layers its share of the rows of `up`.
The table's transform is applied to the factors: a reordering of the output rows
(`swap_halves`) to `up` and the biases, a convolution-to-linear layout to `down`. Every key must be understood
and every shape must fit: otherwise the error names the file and the key, before any weights of the model are
read.

Fusing: W += strength · scale · up @ down (+ strength · diff), summed over all LoRAs of a layer in float32,
then written back once in the layer's storage:
    dense (bf16/fp16/fp32)  the sum is rounded once to the weight dtype: no step-time cost
    q8 / q4 (MLX affine)    dequantize, add, re-quantize with the same group size and bits: no step-time cost;
                            the fused weight carries one re-quantization error (the size of the conversion's
                            own, ~|W|/2^bits per group) instead of the exact LoRA delta
    fp8                     decode, add, re-encode as e4m3fn with a fresh scale of the same layout (per
                            tensor or per channel): no step-time cost; one fp8 rounding of the fused weight
"""

from __future__ import annotations

import hashlib
import itertools
from collections import ChainMap
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MlxVideoError
from .io.safetensors import check_shard
from .nn.linear import Fp8Linear, dense_weight

TARGETS = ("all", "high", "low")
PART_SEPARATOR = "#"  # as the converter's key tables spell a slice of a fused layer (convert.rules)
# Key-table transforms that reorder a weight's output rows: on a LoRA they apply to `up` and the biases.
_ROW_TRANSFORMS = {"swap_halves"}

# (key suffix, role); longest first so that `.lora_B.bias` wins over shorter endings.
_SUFFIXES = sorted(
    [
        (".lora_down.weight", "down"), (".lora_up.weight", "up"),
        (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
        (".lora.down.weight", "down"), (".lora.up.weight", "up"),
        ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
        (".alpha", "alpha"), (".diff", "diff"), (".diff_b", "diff_b"),
        (".dora_scale", "unsupported"), (".set_weight", "unsupported"),
    ],
    key=lambda s: -len(s[0]),
)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_KOHYA = "lora_unet_"


@dataclass
class ModuleLora:
    """What one file holds for one of our modules (`target`, e.g. `blocks.0.self_attn.q`)."""

    target: str
    source: str  # the module name as the file spells it, for messages
    keys: dict = field(default_factory=dict)  # role -> file key
    down: mx.array | None = None  # (rank, in)
    up: mx.array | None = None  # (out, rank)
    up_bias: mx.array | None = None  # (out,)
    alpha: float | None = None
    diff: mx.array | None = None  # full delta of the parameter (after the key table's transform)
    diff_b: mx.array | None = None
    param: str = "weight"  # the parameter `diff` updates (a norm or modulation diff names the parameter itself)
    part: int | None = None  # the slice of a fused layer of ours this module is (see `parts`), None: all of it

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def label(self) -> str:
        return self.target if self.part is None else f"{self.target}{PART_SEPARATOR}{self.part}"


@dataclass
class LoraFile:
    path: Path
    sha256: str
    format: str  # "peft", "comfy", "kohya" (the naming most of its keys use)
    modules: dict[str, ModuleLora]  # keyed by ModuleLora.label
    default_scale: float | None  # lora_alpha / r from a PEFT header; None: per module alpha / rank, else 1

    def module_scale(self, m: ModuleLora) -> float:
        if m.alpha is not None and m.rank:
            return m.alpha / m.rank
        return 1.0 if self.default_scale is None else self.default_scale


def parse_lora_option(text: str, option: str = "--lora") -> dict:
    """`PATH[:SCALE]` -> {"path", "scale"}; the scale must be a number (a colon in a path is kept)."""
    path, scale = text, 1.0
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if tail and not tail.startswith(("/", "\\")) and head:
            try:
                scale = float(tail)
            except ValueError:
                if not Path(text).exists():
                    raise MlxVideoError(f"{option} {text}: the strength after ':' must be a number, not {tail!r}") from None
            else:
                path = head
    return {"path": path, "scale": scale}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip_prefix(name: str) -> tuple[str, bool]:
    """(module name without the file's prefix, whether it is kohya's underscore form)."""
    if name.startswith(_KOHYA):
        return name[len(_KOHYA):], True
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], False
    return name, False


def _split_part(key: str) -> tuple[str, int | None]:
    name, sep, index = key.rpartition(PART_SEPARATOR)
    return (name, int(index)) if sep and index.isdigit() else (key, None)


def _map_dotted(name: str, keymaps: Sequence) -> tuple[str, str, str | None, int | None] | None:
    """(our parameter prefix, parameter name, transform, part) for a dotted module name, via the key tables."""
    for keymap in keymaps:
        hit = keymap.target(name + ".weight")
        if hit is not None:
            key, part = _split_part(hit[0])
            if key.endswith(".weight"):
                return key[: -len(".weight")], "weight", hit[1], part
    for keymap in keymaps:  # a parameter that is not a layer's weight (norm, modulation): named by itself
        hit = keymap.target(name)
        if hit is not None:
            key, part = _split_part(hit[0])
            module, _, param = key.rpartition(".")
            return module, param, hit[1], part
    return None


@lru_cache(maxsize=4096)
def _dotted_forms(underscored: str) -> tuple[str, ...]:
    """Every way of reading kohya's `a_b_c` as a dotted name (each `_` is either kept or a dot)."""
    tokens = underscored.split("_")
    if len(tokens) > 12:
        return ()
    forms = []
    for seps in itertools.product("._", repeat=len(tokens) - 1):
        forms.append(tokens[0] + "".join(s + t for s, t in zip(seps, tokens[1:])))
    return tuple(forms)


def _map_kohya(name: str, keymaps: Sequence):
    m = re.fullmatch(r"blocks_(\d+)_(.+)", name)
    prefix, tail = (f"blocks.{m.group(1)}.", m.group(2)) if m else ("", name)
    hits = {}
    for form in _dotted_forms(tail):
        hit = _map_dotted(prefix + form, keymaps)
        if hit is not None:
            hits[(hit[0], hit[1], hit[3])] = hit
    if len(hits) > 1:
        raise ValueError(f"ambiguous: it can be read as {sorted(t for t, _, _ in hits)}")
    return next(iter(hits.values()), None)


def read_lora(path: str | Path, keymaps: Sequence, transforms: dict | None = None, sha256: str | None = None,
              splits: Sequence[tuple[str, tuple[str, ...]]] = ()) -> LoraFile:
    """Read a LoRA file and map every key onto our module names; raises MlxVideoError naming the file and key
    for a key it cannot place or a layer with only half a pair. Tensors stay lazy (nothing is read but shapes).
    `splits`: (pattern, names) for layers a file may hold fused that our model keeps separate (see `_split`)."""
    from .convert.rules import COMMON_TRANSFORMS

    path = Path(path)
    own = {name: fn for keymap in keymaps for name, fn in getattr(keymap, "transforms", {}).items()}
    transforms = {**COMMON_TRANSFORMS, **own, **(transforms or {})}
    tensors, metadata = _open_lora(path)
    default_scale = _peft_scale(metadata, path)
    modules: dict[str, ModuleLora] = {}
    formats = []
    for name, roles in _group_keys(path, tensors).items():
        bare, kohya = _strip_prefix(name)
        formats.append("kohya" if kohya else ("peft" if any(".lora_A." in k or ".lora_B." in k for k in roles.values()) else "comfy"))
        for sub, view in _split(path, bare, roles, tensors, splits):
            m = _module_lora(path, name, roles, view, _place(path, name, roles, sub, kohya, keymaps), transforms)
            if m.label in modules:
                raise MlxVideoError(f"LoRA file {path}: key {next(iter(roles.values()))} targets {m.label}, which "
                                    f"{modules[m.label].source} targets too")
            modules[m.label] = m
    fmt = max(set(formats), key=formats.count)
    return LoraFile(path, sha256 or file_sha256(path), fmt, modules, default_scale)


def _split(path: Path, bare: str, roles: dict, tensors: dict, splits: Sequence) -> list[tuple[str, dict]]:
    """[(module name, tensors)] for one module of the file: itself, or, where a `splits` pattern matches its name
    (a layer the file holds fused, e.g. q|k|v, that our model keeps as separate layers), one entry per name the
    pattern's replacements give, each seeing its equal share of the output rows of `up`, the up bias and the
    diffs (`down` and alpha are shared: the rows of up @ down are the slices' deltas)."""
    for pattern, names in splits:
        if re.fullmatch(pattern, bare) is None:
            continue
        out = []
        for i, template in enumerate(names):
            view: dict = {}
            for role in ("up", "up_bias", "diff", "diff_b"):
                if role not in roles:
                    continue
                rows = tensors[roles[role]].shape[0]
                if rows % len(names):
                    raise MlxVideoError(f"LoRA file {path}: key {roles[role]} holds {rows} rows, which do not split "
                                        f"into the {len(names)} equal layers it fuses")
                n = rows // len(names)
                view[roles[role]] = tensors[roles[role]][i * n:(i + 1) * n]
            out.append((re.sub(pattern, template, bare), ChainMap(view, tensors)))
        return out
    return [(bare, tensors)]


def _open_lora(path: Path) -> tuple[dict, dict]:
    """The file's tensors (lazy) and metadata, after checking that it is a readable .safetensors file."""
    if not path.is_file():
        raise MlxVideoError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise MlxVideoError(f"LoRA file {path}: only .safetensors LoRAs are read")
    check_shard(path, ())  # the header, strictly: MLX's loader takes negative or overflowing shapes
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # a truncated or foreign file; mlx raises several kinds
        raise MlxVideoError(f"cannot read LoRA file {path}: {e}") from None


def _group_keys(path: Path, tensors: dict) -> dict[str, dict[str, str]]:
    """The file's keys grouped by the module they adapt: {module name: {role (down, up, alpha, ...): key}}."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in sorted(tensors):
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, role = split
        if role == "unsupported":
            raise MlxVideoError(f"LoRA file {path}: key {key} ({key.rsplit('.', 1)[-1]}) is a kind of adapter mlxvid does not apply")
        groups.setdefault(name, {})[role] = key
    if unknown:
        raise MlxVideoError(
            f"LoRA file {path} has {len(unknown)} keys that are not LoRA tensors (first: {unknown[0]}); expected "
            "names ending in .lora_A/.lora_B, .lora_down/.lora_up, .alpha, .diff or .diff_b"
        )
    if not groups:
        raise MlxVideoError(f"LoRA file {path} holds no LoRA tensors (it has {len(tensors)} tensors in all)")
    return groups


def _place(path: Path, name: str, roles: dict, bare: str, kohya: bool, keymaps: Sequence) -> tuple:
    """Where one module's LoRA goes in our model: (target, param, transform, part), or a clear error."""
    first_key = next(iter(roles.values()))
    try:
        hit = _map_kohya(bare, keymaps) if kohya else _map_dotted(bare, keymaps)
    except ValueError as e:
        raise MlxVideoError(f"LoRA file {path}: key {first_key}: module {name} is {e}") from None
    if hit is None:
        raise MlxVideoError(
            f"LoRA file {path}: key {first_key} targets {name!r}, which is not a layer of this model (a LoRA for "
            "another model or for the text encoder?)"
        )
    return hit


def _module_lora(path: Path, name: str, roles: dict, tensors: dict, hit: tuple, transforms: dict) -> ModuleLora:
    """One module's LoRA tensors, reshaped and reordered into our layer's layout."""
    target, param, transform, part = hit
    m = ModuleLora(target=target, source=name, keys=dict(roles), param=param, part=part)
    if ("down" in roles) != ("up" in roles):
        have, miss = ("down", "up") if "down" in roles else ("up", "down")
        raise MlxVideoError(f"LoRA file {path}: key {roles[have]} has no matching {miss} matrix")
    fix = transforms[transform] if transform else None
    rows = fix if transform in _ROW_TRANSFORMS else None
    if "down" in roles:
        m.down, m.up = tensors[roles["down"]], tensors[roles["up"]]
        if m.up.ndim > 2:
            m.up = m.up.reshape(m.up.shape[0], -1)
        if rows is not None:  # ΔW = up @ down: reordering ΔW's rows reorders up's
            m.up = rows(m.up)
        elif fix is not None and m.down.ndim > 2:  # a LoRA on a convolution converted to our linear
            m.down = fix(m.down)
    if "up_bias" in roles:
        m.up_bias = tensors[roles["up_bias"]] if rows is None else rows(tensors[roles["up_bias"]])
    if "alpha" in roles:
        alpha = tensors[roles["alpha"]]
        if alpha.size != 1:
            raise MlxVideoError(f"LoRA file {path}: key {roles['alpha']} has shape {tuple(alpha.shape)}, expected one number")
        m.alpha = float(alpha.astype(mx.float32).reshape(()).item())
    if "diff" in roles:
        m.diff = tensors[roles["diff"]] if fix is None else fix(tensors[roles["diff"]])
    if "diff_b" in roles:
        m.diff_b = tensors[roles["diff_b"]] if rows is None else rows(tensors[roles["diff_b"]])
    return m


def _peft_scale(metadata: dict, path: Path) -> float | None:
    text = (metadata or {}).get("lora_adapter_metadata")
    if not text:
        return None
    try:
        config = json.loads(text)
        # diffusers writes the config with its component's prefix ("transformer.r"); PEFT without one
        config = {k.rsplit(".", 1)[-1]: v for k, v in config.items() if k.count(".") <= 1}
        alpha, rank = config.get("lora_alpha"), config.get("r")
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise MlxVideoError(f"LoRA file {path}: per-module alpha/rank patterns in its adapter metadata are not supported")
        return None if not alpha or not rank else float(alpha) / float(rank)
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise MlxVideoError(f"LoRA file {path}: its lora_adapter_metadata header is not a LoRA config") from None


def check_lora(lora: LoraFile, shapes: dict[str, tuple[int, ...]], what: str = "the model",
               parts: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every module's tensors fit the model's parameter `shapes` (our keys -> shapes), ranks agree. `parts`: the
    sizes along the output axis of the slices of our fused layers (our layer name -> sizes)."""
    for m in lora.modules.values():
        key = next(iter(m.keys.values()))
        weight = shapes.get(f"{m.target}.{m.param}")
        if weight is None:
            raise MlxVideoError(f"LoRA file {lora.path}: key {key} targets {m.target}.{m.param}, which {what} does not have")
        rows = weight[0] if weight else None
        if m.part is not None:
            sizes = (parts or {}).get(m.target)
            if sizes is None or m.part >= len(sizes) or sum(sizes) != weight[0]:
                raise MlxVideoError(f"LoRA file {lora.path}: key {key} targets slice {m.part} of {m.target}, which "
                                    f"{what} does not split that way")
            rows = sizes[m.part]
            weight = (rows, *weight[1:])
        if m.down is not None:
            if len(weight) != 2:
                raise MlxVideoError(f"LoRA file {lora.path}: key {key}: {m.target} is not a linear layer")
            out_dim, in_dim = weight
            if m.down.ndim != 2 or m.up.ndim != 2:
                raise MlxVideoError(f"LoRA file {lora.path}: key {m.keys['down']}: LoRA matrices must be 2-D, got "
                                    f"{tuple(m.down.shape)} and {tuple(m.up.shape)}")
            if m.up.shape[1] != m.down.shape[0]:
                raise MlxVideoError(
                    f"LoRA file {lora.path}: key {m.keys['up']}: rank mismatch, up {tuple(m.up.shape)} against down "
                    f"{tuple(m.down.shape)} ({m.keys['down']})"
                )
            if m.down.shape[1] != in_dim or m.up.shape[0] != out_dim:
                raise MlxVideoError(
                    f"LoRA file {lora.path}: key {m.keys['down']}: the LoRA maps {m.down.shape[1]} -> {m.up.shape[0]} "
                    f"features but {m.label} of {what} maps {in_dim} -> {out_dim} (a LoRA for another model or width?)"
                )
        if m.diff is not None and tuple(m.diff.shape) != tuple(weight):
            raise MlxVideoError(f"LoRA file {lora.path}: key {m.keys['diff']} has shape {tuple(m.diff.shape)}, "
                                f"{m.label}.{m.param} of {what} has {tuple(weight)}")
        for role, tensor in (("diff_b", m.diff_b), ("up_bias", m.up_bias)):
            if tensor is None:
                continue
            bias = shapes.get(f"{m.target}.bias")
            if bias is not None and m.part is not None:
                bias = (rows,)
            if bias is None or tuple(tensor.shape) != tuple(bias):
                raise MlxVideoError(f"LoRA file {lora.path}: key {m.keys[role]} has shape {tuple(tensor.shape)}, the bias of "
                                    f"{m.label} in {what} has {None if bias is None else tuple(bias)}")


def module_deltas(loras: Iterable[tuple[LoraFile, float]],
                  parts: dict[str, tuple[int, ...]] | None = None) -> dict[str, dict[str, mx.array]]:
    """Sum the LoRAs' float32 deltas per module: {target: {param: delta}} (`param` "weight", "bias", ...). A
    slice's delta fills its rows of the fused layer (sizes from `parts`), zeros elsewhere."""
    total: dict[str, dict[str, mx.array]] = {}
    sliced: dict[tuple[str, str], dict[int, mx.array]] = {}
    for lora, strength in loras:
        for m in lora.modules.values():
            scale = strength * lora.module_scale(m)
            whole = total.setdefault(m.target, {})

            def add(param, value):
                if m.part is None:
                    whole[param] = value if param not in whole else whole[param] + value
                    return
                slot = sliced.setdefault((m.target, param), {})
                slot[m.part] = value if m.part not in slot else slot[m.part] + value

            if m.down is not None:
                add("weight", scale * (m.up.astype(mx.float32) @ m.down.astype(mx.float32)))
            if m.up_bias is not None:
                add("bias", scale * m.up_bias.astype(mx.float32))
            if m.diff is not None:
                add(m.param, strength * m.diff.astype(mx.float32))
            if m.diff_b is not None:
                add("bias", strength * m.diff_b.astype(mx.float32))
    for (target, param), slot in sliced.items():
        sizes = (parts or {})[target]
        tail = next(iter(slot.values())).shape[1:]
        delta = mx.concatenate([slot.get(i, mx.zeros((n, *tail), dtype=mx.float32)) for i, n in enumerate(sizes)])
        whole = total[target]
        whole[param] = delta if param not in whole else whole[param] + delta
    return total


def fuse_loras(model: nn.Module, loras: Sequence[tuple[LoraFile, float]],
               parts: dict[str, tuple[int, ...]] | None = None) -> int:
    """Fuse `(file, strength)` pairs into `model`'s weights in place; returns the number of layers changed.
    Dense, MLX affine-quantized and fp8 layers are handled (see the module docstring for what each costs).
    `parts`: the slice sizes of fused layers that some LoRA modules target one slice of (see `check_lora`)."""
    deltas = module_deltas(loras, parts)
    modules = dict(model.named_modules())
    fused = len(deltas)
    while deltas:  # one layer at a time: a full-size float32 delta lives only while its layer is fused
        target, parts_of_layer = deltas.popitem()
        layer = modules[target]
        for param, delta in parts_of_layer.items():
            if param == "weight" and isinstance(layer, (nn.QuantizedLinear, Fp8Linear)):
                _fuse_low_precision(layer, delta)
                continue
            old = layer[param]
            layer[param] = (old.astype(mx.float32) + delta).astype(old.dtype)
        mx.eval(layer.parameters())
        del parts_of_layer
    return fused


def _fuse_low_precision(layer, delta: mx.array) -> None:
    weight = dense_weight(layer, mx.float32) + delta
    if isinstance(layer, nn.QuantizedLinear):
        mode = getattr(layer, "mode", "affine")
        if mode != "affine":  # mxfp8 / nvfp4 kept from a comfy_quant file: re-quantize in the layer's own mode
            if "tensor_scale" in layer:  # nvfp4's per-tensor scale stays; the blocks hold weight / scale
                weight = weight / layer["tensor_scale"]
            layer.weight, layer.scales = mx.quantize(weight, group_size=layer.group_size, bits=layer.bits, mode=mode)
            return
        w, scales, biases = mx.quantize(weight.astype(layer.scales.dtype), group_size=layer.group_size, bits=layer.bits)
        layer.weight, layer.scales = w, scales
        if biases is not None:
            layer.biases = biases
        return
    from .convert.fp8 import E4M3FN_MAX, encode_e4m3fn

    old_scale = layer["weight_scale"]
    if old_scale.size == 1:
        amax = mx.max(mx.abs(weight)).reshape(old_scale.shape)
    else:  # per output channel, in the layout the conversion stored
        amax = mx.max(mx.abs(weight), axis=1).reshape(old_scale.shape)
    scale = mx.maximum(amax / E4M3FN_MAX, mx.array(1e-12, dtype=mx.float32)).astype(mx.float32)
    from .convert.fp8 import as_scale

    codes = encode_e4m3fn(np.array(weight / as_scale(scale, tuple(weight.shape))))
    layer.weight = mx.array(codes)
    layer.weight_scale = scale
    layer._fp8_format = "e4m3fn"


def lora_record(lora: LoraFile, strength: float, target: str) -> dict:
    """What the sidecar keeps of one LoRA."""
    return {"path": str(lora.path), "name": lora.path.name, "sha256": lora.sha256, "scale": strength, "target": target,
            "format": lora.format, "modules": len(lora.modules)}
