"""`mlxvid convert`: a published checkpoint folder in, an MLX-native model folder out.

The work is planned before anything is written: every source key is mapped (unknown keys stop the run),
the mapped names and shapes are checked against the model we will load, and the tensors are assigned to
shards. Then the shards are written one at a time into `DST.part/`, each shard atomically, and the folder
is renamed to DST at the end. Re-running an interrupted conversion keeps the shards already complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_video import __version__
from mlx_video.errors import MlxVideoError
from mlx_video.io.safetensors import TensorSource
from mlx_video.model_folder import DTYPE_NAMES, DTYPES, FORMAT_VERSION, INDEX, MANIFEST, ModelFolder
from mlx_video.registry import MODELS

from .rules import KeyMap

DEFAULT_SHARD_BYTES = 2 * 1024**3

_SOURCE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ComponentPlan:
    """How one component (e.g. `transformer`) is converted."""

    name: str
    source: TensorSource
    keymap: KeyMap
    config: dict  # our config dataclass as a dict, written to config.json
    module: object  # our module, built lazily, whose parameter names and shapes the output must match
    dtype: str | None = None  # overrides the conversion's --dtype (the VAE stays fp32, as the official code runs it)
    # target key -> (source key, target shape); filled by `plan()`
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


@dataclass
class ConversionPlan:
    source_format: str
    manifest: dict
    components: list[ComponentPlan]
    copy_files: dict[str, list[Path]]  # component folder -> files copied as they are (tokenizer)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MlxVideoError(f"missing {path} ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MlxVideoError(f"{path} is not valid JSON ({e})") from None


def detect_format(src: Path) -> str:
    if not src.exists():
        raise MlxVideoError(f"source {src} does not exist")
    if (src / "model_index.json").is_file():
        return "diffusers"
    if (src / MANIFEST).is_file():
        raise MlxVideoError(f"{src} is already an mlxvid model folder; nothing to convert")
    raise MlxVideoError(
        f"cannot tell what {src} holds: expected a diffusers folder (model_index.json, transformer/, "
        "text_encoder/, tokenizer/, vae/)"
    )


def plan_diffusers_wan(src: Path) -> ConversionPlan:
    from mlx_video.models.wan.transformer import WanTransformer
    from mlx_video.text_encoders.umt5 import UMT5Config, UMT5Encoder

    from .umt5 import TRANSFORMERS_UMT5
    from .wan import DIFFUSERS_TRANSFORMER, transformer_config_from_diffusers

    index = _read_json(src / "model_index.json", "the diffusers pipeline description")
    pipeline_class = index.get("_class_name", "")
    if not pipeline_class.startswith("Wan"):
        raise MlxVideoError(f"{src} holds a {pipeline_class or 'unknown'} pipeline; mlxvid converts Wan 2.2 pipelines")
    expected = ["transformer", "text_encoder", "tokenizer"]
    two_experts = bool(index.get("transformer_2")) and index["transformer_2"][0] is not None
    if two_experts:
        expected.append("transformer_2")
    for name in expected:
        if not (src / name).is_dir():
            raise MlxVideoError(
                f"{src} is missing the folder {name}/; a diffusers Wan folder holds model_index.json, transformer/ "
                "(and transformer_2/ for A14B), text_encoder/, tokenizer/, vae/"
            )

    components = []
    configs = {}
    for name in ["transformer", "transformer_2"] if two_experts else ["transformer"]:
        try:
            cfg = transformer_config_from_diffusers(_read_json(src / name / "config.json", f"the {name} config"))
        except ValueError as e:
            raise MlxVideoError(f"{src / name / 'config.json'}: {e}") from None
        configs[name] = cfg
        components.append(
            ComponentPlan(name, TensorSource.from_folder(src / name, name), DIFFUSERS_TRANSFORMER, cfg.to_dict(), WanTransformer(cfg))
        )
    try:
        te_cfg = UMT5Config.from_transformers(_read_json(src / "text_encoder" / "config.json", "the text encoder config"))
    except ValueError as e:
        raise MlxVideoError(f"{src / 'text_encoder' / 'config.json'}: {e}") from None
    components.append(
        ComponentPlan(
            "text_encoder", TensorSource.from_folder(src / "text_encoder", "text_encoder"), TRANSFORMERS_UMT5,
            te_cfg.to_dict(), UMT5Encoder(te_cfg),
        )
    )
    if (src / "vae").is_dir():
        from mlx_video.models.wan.vae import WanVAE, WanVAEConfig

        from .wan_vae import DIFFUSERS_VAE

        try:
            vae_cfg = WanVAEConfig.from_diffusers(_read_json(src / "vae" / "config.json", "the VAE config"))
        except ValueError as e:
            raise MlxVideoError(f"{src / 'vae' / 'config.json'}: {e}") from None
        components.append(
            ComponentPlan("vae", TensorSource.from_folder(src / "vae", "vae"), DIFFUSERS_VAE, vae_cfg.to_dict(), WanVAE(vae_cfg), "fp32")
        )
    tokenizer_files = [p for p in (src / "tokenizer" / "spiece.model", src / "tokenizer" / "tokenizer.json") if p.is_file()]
    if not tokenizer_files:
        raise MlxVideoError(f"{src / 'tokenizer'} has neither spiece.model nor tokenizer.json")

    cfg = configs["transformer"]
    if two_experts and (cfg.in_channels == 36 or pipeline_class == "WanImageToVideoPipeline"):
        model_id = "wan2.2-i2v-a14b"
    elif two_experts:
        model_id = "wan2.2-t2v-a14b"
    else:
        model_id = "wan2.2-ti2v-5b"
    spec = MODELS[model_id]
    if two_experts and index.get("boundary_ratio") is None:
        raise MlxVideoError(f"{src / 'model_index.json'} has two transformers but no boundary_ratio")
    vae_stride = list(spec.vae_stride)
    if (src / "vae").is_dir():
        vae_stride = [vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial, vae_cfg.scale_factor_spatial]
    manifest = {
        "format": "mlxvid-model",
        "format_version": FORMAT_VERSION,
        "family": "wan",
        "model": model_id,
        "boundary": index.get("boundary_ratio") if two_experts else None,
        "per_frame_timesteps": bool(index.get("expand_timesteps", False)),
        "vae_stride": vae_stride,
        "text_len": spec.text_len,
    }
    return ConversionPlan("diffusers", manifest, components, {"tokenizer": tokenizer_files})


def plan(src: str | Path) -> ConversionPlan:
    src = Path(src)
    fmt = detect_format(src)
    conversion = plan_diffusers_wan(src)
    for comp in conversion.components:
        _plan_component(comp)
    return conversion


def _plan_component(comp: ComponentPlan) -> None:
    keys = comp.source.keys()
    unknown = comp.keymap.unknown_keys(keys)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise MlxVideoError(f"{comp.name}: {len(unknown)} keys that mlxvid does not know: {shown}")
    expected = {k: tuple(v.shape) for k, v in tree_flatten(comp.module.parameters())}
    for key in keys:
        hit = comp.keymap.target(key)
        if hit is None:
            continue  # deliberately ignored
        target, transform = hit
        if target in comp.tensors:
            raise MlxVideoError(f"{comp.name}: {key} and {comp.tensors[target][0]} both map to {target}")
        shape = comp.source.info(key).shape
        if transform is not None:  # the transform on a lazy array gives the shape without computing anything
            shape = tuple(comp.keymap.transforms[transform](mx.zeros(shape)).shape)
        if target not in expected:
            raise MlxVideoError(f"{comp.name}: {key} maps to {target}, which the model does not have")
        if shape != expected[target]:
            raise MlxVideoError(
                f"{comp.name}: {key} has shape {list(shape)} but the model expects {list(expected[target])} for "
                f"{target}; is this checkpoint of another size than its config.json says?"
            )
        comp.tensors[target] = (key, shape)
    missing = sorted(set(expected) - set(comp.tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MlxVideoError(f"{comp.name}: the checkpoint lacks {len(missing)} tensors the model needs: {shown}")


def _shards(comp: ComponentPlan, itemsize: int, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for target in sorted(comp.tensors):
        shape = comp.tensors[target][1]
        n = itemsize
        for s in shape:
            n *= s
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(target)
        size += n
    return shards


def _shard_is_complete(path: Path, keys: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        from mlx_video.io.safetensors import SafetensorsFile

        return sorted(SafetensorsFile(path).keys()) == sorted(keys)
    except MlxVideoError:
        return False


def convert_model(
    src: str | Path,
    dst: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Convert `src` into an MLX-native folder at `dst`. Returns `dst`."""
    if dtype not in DTYPES:
        raise MlxVideoError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise MlxVideoError(f"{dst} already exists; pass --overwrite to replace it")
    target_dtype = DTYPES[dtype]
    conversion = plan(src)
    log(f"source format: {conversion.source_format} ({conversion.manifest['model']}-style Wan pipeline)")

    work = dst.with_name(dst.name + ".part")
    fingerprint = {"source": str(Path(src).resolve()), "dtype": dtype, "shard_bytes": shard_bytes, "version": __version__}
    stamp = work / ".conversion.json"
    if work.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint):
        shutil.rmtree(work)  # left by a conversion with other settings: nothing in it can be reused
    if work.exists():
        log(f"resuming the interrupted conversion in {work}")
    work.mkdir(parents=True, exist_ok=True)
    _write_json(stamp, fingerprint)
    total = sum(len(c.tensors) for c in conversion.components)
    done = 0
    for comp in conversion.components:
        out = work / comp.name
        out.mkdir(exist_ok=True)
        comp_dtype = comp.dtype or dtype
        shards = _shards(comp, {"bf16": 2, "fp16": 2, "fp32": 4}[comp_dtype], shard_bytes)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            weight_map.update({k: name for k in keys})
            path = out / name
            if _shard_is_complete(path, keys):
                done += len(keys)
                if progress:
                    progress(comp.name, done, total)
                continue
            tensors = {}
            for target in keys:
                source_key = comp.tensors[target][0]
                _, value = comp.keymap.apply(source_key, comp.source.get(source_key))
                if mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(DTYPES[comp_dtype])
                tensors[target] = value
                done += 1
                if progress:
                    progress(comp.name, done, total)
            tmp = out / (name + ".tmp.safetensors")
            mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
            os.replace(tmp, path)
            del tensors
        _write_json(out / INDEX, {"metadata": {"mlxvid_version": __version__}, "weight_map": weight_map})
        _write_json(out / "config.json", comp.config)
    for folder, files in conversion.copy_files.items():
        (work / folder).mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(f, work / folder / f.name)
    manifest = dict(conversion.manifest)
    manifest.update(
        dtype=DTYPE_NAMES[target_dtype],
        components=[c.name for c in conversion.components] + list(conversion.copy_files),
        source={"path": str(Path(src).resolve()), "format": conversion.source_format},
        mlxvid_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _write_json(work / MANIFEST, manifest)
    stamp.unlink()
    ModelFolder.open(work)  # the folder must load before it takes the final name
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(work, dst)
    return dst


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
