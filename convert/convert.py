"""`mlxvid convert`: published checkpoints in, an MLX-native model folder out.

Each model family's converter (`convert/families/<family>.py`, found through `mlx_video.families`) says which
sources it takes (`claims`) and plans them (`plan`): its layouts (diffusers folders, official releases, single
files given per component), how its components are recognised and configured, and its manifest. `plan` below
only picks the family; everything after the plan is shared.

Weights may be fp32, fp16, bf16 or fp8 (ComfyUI's scaled layouts or plain casts; see `formats.py`), under a
wrapper prefix or not. Single files carry no config: dimensions are read from the shapes and checked against
the registry model, and a checkpoint of another family or size is named as what it looks like.

The work is planned before anything is written: every source key is mapped (unknown keys stop the run unless
allowed), mapped names and shapes are checked against the module we will load, each output tensor's
precision is decided (`quantize.py`) and tensors are assigned to shards. Then each shard is written slice by
slice into `DST.part/` (`shards.py`), under a temporary name renamed when complete, and the folder is renamed
to DST at the end. Re-running an interrupted conversion keeps the shards already complete. A failure before
writing leaves nothing; a failure while writing leaves only `DST.part/`, which a re-run resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_video import __version__
from mlx_video.errors import MlxVideoError
from mlx_video.io.destination import check_destination
from mlx_video.model_folder import DTYPE_NAMES, DTYPES, FORMAT_VERSION, INDEX, MANIFEST, QUANTIZATION, ModelFolder

from .formats import ComponentSource, lookalike
from .quantize import (
    DEFAULT_GROUP_SIZE,
    MODES,
    Item,
    check_options,
    item_nbytes,
    plan_item,
    produce,
)
from .rules import KeyMap
from .part import STAMP, check_free_space, destination_lock, prepare_part
from .shards import ShardWriter, shard_is_complete

DEFAULT_SHARD_BYTES = 2 * 1024**3
QUANTIZATION_FILE = QUANTIZATION
COMPONENTS = ("transformer", "transformer_2", "text_encoder", "vae")
KIND_OF = {"transformer": "transformer", "transformer_2": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
KIND_WORDS = {"transformer": "a diffusion transformer", "text_encoder": "a text encoder", "vae": "a VAE"}
OPTION_OF = {"transformer": "--transformer", "transformer_2": "--transformer-2", "text_encoder": "--text-encoder", "vae": "--vae"}

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".gguf")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# transformers' UMT5 stores its tied token embedding under both names; either may be present, or both.
TIED = {"shared.weight", "encoder.embed_tokens.weight"}
# Working-memory cap for MLX's buffer cache while converting (freed buffers beyond it go back to the OS).
CONVERT_CACHE_BYTES = 64 * 1024**2


@dataclass
class ComponentInput:
    """Where one component's weights come from, before they are read."""

    name: str
    path: Path
    origin: str  # how the user supplied it, for messages
    config_json: dict | None = None
    config_hint: dict | None = None  # the config of the component this one replaces (shapes leave the heads open)


@dataclass
class ComponentPlan:
    """How one component (e.g. `transformer`) is converted."""

    name: str
    source: ComponentSource
    keymap: KeyMap
    config: dict  # our config dataclass as a dict, written to config.json
    module: object  # our module, built lazily, whose parameter names and shapes the output must match
    dtype: str | None = None  # overrides the conversion's --dtype (the VAE stays fp32, as the official code runs it)
    origin: str = ""
    size_hint: Callable[[], str] | None = None  # what the checkpoint's shapes look like, for shape errors
    # target key -> (source key, target shape, transform); filled by `plan_component`
    tensors: dict[str, tuple[str, tuple[int, ...], str | None]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # unknown keys left out (--allow-unknown-keys)
    items: list[Item] = field(default_factory=list)
    # the target keys --quantize stores in low precision, set by the family's planner (a pattern the whole key
    # matches); None: quantize.py's default rule for the component's name (Wan's block layers)
    low_precision: re.Pattern | None = None
    # target keys stored in float32 whatever --dtype and --quantize say (a pattern the whole key matches), for
    # tensors the reference keeps in float32 (e.g. Mochi's RoPE frequencies and q/k norm gains); None: none
    keep_fp32: re.Pattern | None = None


@dataclass
class ConversionPlan:
    source_format: str
    manifest: dict
    components: list[ComponentPlan]
    copy_files: dict[str, list[tuple[Path | bytes, str]]]  # component folder -> (file or bytes, name) copied as is
    source_files: list[Path] = field(default_factory=list)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MlxVideoError(f"missing {path} ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxVideoError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise MlxVideoError(f"{path} is not valid JSON (it nests too deeply)") from None
    if not isinstance(data, dict):
        raise MlxVideoError(f"{path} is not a JSON object ({what})")
    return data


# ---------------------------------------------------------------------------------------------------
# helpers the families' planners share


def tokenizer_files(path: Path, what: str, nested: Path | None = None) -> list[tuple[Path, str]]:
    """The tokenizer files in `path` (a folder, a .model or a tokenizer.json); `nested`: a sub-folder a release
    keeps them in (e.g. Wan's google/umt5-xxl/), looked in when the folder itself has none."""
    if path.is_file():
        if path.name == "tokenizer.json":
            return [(path, "tokenizer.json")]
        if path.suffix == ".model":
            return [(path, "spiece.model")]
        raise MlxVideoError(f"{what}: {path} is neither a SentencePiece model (.model) nor a tokenizer.json")
    if not path.is_dir():
        raise MlxVideoError(f"{what}: {path} does not exist")
    found = [(path / n, n) for n in TOKENIZER_FILES if (path / n).is_file()]
    if not found and nested is not None and (path / nested).is_dir():
        found = [(path / nested / n, n) for n in TOKENIZER_FILES if (path / nested / n).is_file()]
    if not found:
        raise MlxVideoError(f"{what}: {path} has neither spiece.model nor tokenizer.json")
    return found


def diffusers_pipeline_class(src) -> str | None:
    """The `_class_name` of a diffusers folder's model_index.json: None when `src` has none, "" when it cannot
    be read. Each family's `claims` looks at it."""
    index = Path(src) / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return ""
    return str(data.get("_class_name", "")) if isinstance(data, dict) else ""


def component_input(name: str, path: Path, origin: str) -> ComponentInput:
    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        raise MlxVideoError(f"{origin}: {path} cannot be read (a broken symlink or a symlink loop)")
    if not path.exists():
        raise MlxVideoError(f"{origin}: {path} does not exist")
    config = None
    if path.is_dir() and (path / "config.json").is_file():
        config = read_json(path / "config.json", f"the {name} config")
    return ComponentInput(name, path, origin, config)


# ---------------------------------------------------------------------------------------------------
# steps the family planners share


def check_diffusers_folder(src: Path, pipeline_class: str, transformer_class: str) -> dict:
    """model_index.json of a diffusers folder that must hold `pipeline_class`, its transformer/config.json (when
    there is one) describing `transformer_class`; returns the index."""
    index = read_json(src / "model_index.json", "the diffusers pipeline description")
    found = str(index.get("_class_name", ""))
    if found != pipeline_class:
        raise MlxVideoError(f"{src} holds a {found} pipeline; mlxvid converts {pipeline_class} (text to video)")
    transformer_json = src / "transformer" / "config.json"
    if transformer_json.is_file():
        described = read_json(transformer_json, "the transformer config").get("_class_name")
        if described not in (None, transformer_class):
            raise MlxVideoError(
                f"{src} holds a {found} pipeline by its model_index.json, but its transformer/config.json "
                f"describes a {described}: the folder mixes models"
            )
    return index


def diffusers_component_inputs(src: Path, names, optional=("vae",)) -> dict[str, ComponentInput]:
    """The component folders of a diffusers folder; a missing optional one is left out, a missing other refused."""
    inputs = {}
    for name in names:
        folder = src / name
        if not folder.is_dir():
            if name in optional:
                continue  # e.g. the VAE: without it the pipeline stops at latents
            raise MlxVideoError(f"{src} has no {name}/")
        inputs[name] = component_input(name, folder, f"{src.name}/{name}")
    return inputs


def check_component_names(components: dict, options: dict[str, str], title: str) -> None:
    """Refuse a replaced component the family does not have (`options`: component -> its option)."""
    unknown = sorted(set(components) - set(options))
    if unknown:
        raise MlxVideoError(f"{title} has no {', '.join(unknown)}; its replaceable components are "
                            f"{', '.join(options.values())}")


def replace_components(inputs: dict, components: dict, options: dict[str, str], carry: str = "config_json") -> None:
    """Put the files given by option (`components`) in place of the source's components. A single file carries no
    config: the replaced component's config.json goes with it, as `carry` ("config_json", or "config_hint" where
    the file's shapes decide and the config only settles what they leave open)."""
    for name, path in components.items():
        given = component_input(name, Path(path), options[name])
        replaced = inputs.get(name)
        if given.config_json is None and replaced is not None and replaced.config_json is not None:
            setattr(given, carry, replaced.config_json)
        inputs[name] = given


@contextmanager
def config_errors(inp: ComponentInput, *errors: type[Exception]):
    """A bad config.json (what `errors` the config parser raises) as an error naming the file."""
    try:
        yield
    except errors or (ValueError,) as e:
        raise MlxVideoError(f"{inp.path / 'config.json'}: {e}") from None


def model_manifest(family: str, spec, vae_stride, size_multiple: int, defaults: dict, experts: int = 1, **extra) -> dict:
    """The converted folder's manifest (mlxvid.json): self-describing, the published defaults travel with it."""
    return {
        "format": "mlxvid-model",
        "format_version": FORMAT_VERSION,
        "family": family,
        "model": spec.id,
        "task": spec.task,
        "experts": experts,
        "vae_stride": list(vae_stride),
        "size_multiple": size_multiple,
        "sizes": [list(s) for s in spec.sizes],
        "defaults": defaults,
        **extra,
    }


def finish_plan(source_format: str, manifest: dict, planned: list[ComponentPlan], copy_files: dict,
                allow_unknown_keys: bool = False, log: Callable[[str], None] = lambda s: None) -> ConversionPlan:
    """Map every component's keys (`plan_component`) and list the files read."""
    for comp in planned:
        plan_component(comp, allow_unknown_keys, log)
    files = [p for comp in planned for p in comp.source.tensors.paths]
    files += [p for entries in copy_files.values() for p, _ in entries if isinstance(p, Path)]
    return ConversionPlan(source_format, manifest, planned, copy_files, files)


def with_overrides(source_format: str, components: dict, planned: list[ComponentPlan], options: dict[str, str]) -> str:
    """The source format, naming each component replaced by option and how its file stores the weights."""
    if not components:
        return source_format
    return source_format + " + " + ", ".join(f"{options[n]} ({c.source.scheme()})" for n in components
                                             for c in planned if c.name == n)


def plan(
    src: str | Path | None,
    components: dict[str, str | Path] | None = None,
    tokenizer: str | Path | None = None,
    base: str | None = None,
    allow_unknown_keys: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> ConversionPlan:
    """The whole conversion, planned and checked before anything is written: which family's converter takes the
    source (`mlx_video.families`), then that converter's plan."""
    from mlx_video.families import FAMILIES, converter
    from mlx_video.registry import get_spec

    check_readable(src)
    if base is not None:
        family = get_spec(base).family
    else:
        claims = [name for name in FAMILIES if converter(name).claims(src, components or {})]
        if len(claims) > 1:
            raise MlxVideoError(
                f"{src} could be a checkpoint of several families ({', '.join(claims)}); pass --base MODEL_ID to say which"
            )
        # no claim: the family that declares catch_all plans it anyway, and names what it does not recognise
        family = claims[0] if claims else next(f.name for f in FAMILIES.values() if f.catch_all)
    return converter(family).plan(src, components, tokenizer, base, allow_unknown_keys, log)


def check_readable(src) -> None:
    """Every entry of a source folder can be read: a component folder that is a broken symlink, a symlink loop
    or unreadable is an error here, not a component silently left out."""
    if src is None:
        return
    src = Path(src)
    try:
        entries = list(os.scandir(src)) if src.is_dir() else []
    except OSError as e:
        raise MlxVideoError(f"cannot read the source folder {src} ({e.strerror or e})") from None
    for entry in entries:
        try:
            if os.path.isdir(os.path.realpath(entry.path, strict=True)):
                os.listdir(entry.path)
            else:
                os.stat(entry.path)
        except (OSError, RuntimeError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise MlxVideoError(
                f"cannot read {entry.path} ({why}: a broken symlink, a symlink loop or no permission?); every entry of "
                "the source folder must be readable: fix it or remove it"
            ) from None


def plan_component(comp: ComponentPlan, allow_unknown_keys: bool = False, log: Callable[[str], None] = lambda s: None) -> None:
    keys = comp.source.keys()
    unknown = comp.keymap.unknown_keys(keys) + comp.source.orphans
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        extra = lookalike(keys)
        if not allow_unknown_keys:
            raise MlxVideoError(
                f"{comp.name}: {comp.source.what} has {_count(len(unknown), 'key')} that mlxvid does not know: {shown}"
                + (f"; the checkpoint looks like {extra}" if extra else "")
                + ". Pass --allow-unknown-keys to leave them out"
            )
        log(f"{comp.name}: leaving out {_count(len(unknown), 'unknown key')}: {shown}")
        comp.skipped = list(unknown)
    skip = set(comp.skipped)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(comp.module.parameters())}
    for key in keys:
        if key in skip:
            continue
        hit = comp.keymap.target(key)
        if hit is None:
            continue  # deliberately ignored
        target, transform = hit
        if target in comp.tensors:
            other = comp.tensors[target][0]
            if {key, other} == TIED:
                comp.tensors[target] = ("shared.weight", *comp.tensors[target][1:])
                continue
            raise MlxVideoError(f"{comp.name}: {key} and {other} both map to {target}")
        shape = comp.source.shape(key)
        if transform is not None:  # the transform on a lazy array gives the shape without computing anything
            try:
                shape = tuple(comp.keymap.transforms[transform](mx.zeros(shape)).shape)
            except ValueError as e:
                raise MlxVideoError(f"{comp.name}: {key} of shape {list(shape)} cannot be converted: {e}") from None
        if target not in expected:
            raise MlxVideoError(f"{comp.name}: {key} maps to {target}, which the model does not have")
        if shape != expected[target]:
            hint = comp.size_hint() if comp.size_hint else ""
            raise MlxVideoError(
                f"{comp.name}: {key} has shape {list(shape)} but the model expects {list(expected[target])} for "
                f"{target}: is the checkpoint of another size than its configuration says?{hint}"
            )
        comp.tensors[target] = (key, shape, transform)
    missing = sorted(set(expected) - set(comp.tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MlxVideoError(
            f"{comp.name}: {comp.source.what} lacks {_count(len(missing), 'tensor')} the model needs: {shown}"
            + (comp.size_hint() if comp.size_hint else "")
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------------------------------
# writing


def _shards(items: list[Item], shard_bytes: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in sorted(items, key=lambda i: i.target):
        n = item_nbytes(item)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def _fingerprint(conversion: ConversionPlan, settings: dict) -> dict:
    files = []
    for p in conversion.source_files:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return {**settings, "sources": files, "version": __version__}


def _quantization_record(comp: ComponentPlan, quantize: str | None, group_size: int) -> dict | None:
    from .quantize import kept_codes_record

    if quantize is None:  # GGUF / mxfp8 weights kept in their file's codes (quantize.py), if any
        return kept_codes_record(comp.items)
    low = [i for i in comp.items if i.mode in ("affine", "fp8_copy", "fp8_encode")]
    if not low:
        return None
    layers = [i.target[: -len(".weight")] for i in low]
    if MODES[quantize][0] == "affine":
        return {"mode": "affine", "bits": MODES[quantize][1], "group_size": group_size, "layers": layers}
    formats = {}
    for i in low:
        formats[i.target[: -len(".weight")]] = comp.source.fp8_format(i.source_key) if i.mode == "fp8_copy" else "e4m3fn"
    return {"mode": "fp8", "layers": formats}


def convert_model(
    src: str | Path | None,
    dst: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    *,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    base: str | None = None,
    components: dict[str, str | Path] | None = None,
    tokenizer: str | Path | None = None,
    allow_unknown_keys: bool = False,
) -> Path:
    """Convert `src` (and/or per-component files) into an MLX-native folder at `dst`. Returns `dst`."""
    if dtype not in DTYPES:
        raise MlxVideoError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_options(quantize, group_size)
    dst = Path(dst)
    if os.path.lexists(dst) and not overwrite:
        raise MlxVideoError(f"{dst} already exists; pass --overwrite to replace it")
    if src is not None and Path(src).exists() and Path(src).resolve() in (dst.resolve(), *dst.resolve().parents):
        raise MlxVideoError(f"the destination {dst} must not be the source {src} or inside it")
    check_destination(dst, "the converted model")
    with destination_lock(dst):
        return _convert_locked(src, dst, dtype, overwrite, shard_bytes, progress, log, quantize, group_size, base,
                               components, tokenizer, allow_unknown_keys)


def _convert_locked(src, dst: Path, dtype, overwrite, shard_bytes, progress, log, quantize, group_size, base,
                    components, tokenizer, allow_unknown_keys) -> Path:
    conversion = plan(src, components, tokenizer, base, allow_unknown_keys, log)
    from mlx_video.families import get_family

    title = get_family(conversion.manifest["family"]).title
    log(f"source format: {conversion.source_format} ({conversion.manifest['model']}-style {title} pipeline)")
    for comp in conversion.components:
        prefix = f", prefix {comp.source.prefix!r} removed" if comp.source.prefix else ""
        log(f"  {comp.name}: {comp.origin}: {comp.source.scheme()}{prefix}")

    for comp in conversion.components:
        comp_dtype = comp.dtype or dtype
        comp.items = [
            plan_item(comp.name, target, key, transform, shape, comp.source, comp_dtype, quantize, group_size,
                      comp.low_precision, comp.keep_fp32)
            for target, (key, shape, transform) in comp.tensors.items()
        ]
    if quantize is not None:
        low = sum(1 for c in conversion.components for i in c.items if i.mode != "cast" and i.mode != "copy")
        log(f"quantization: {quantize}" + (f" (group size {group_size})" if MODES[quantize][0] == "affine" else "")
            + f", {low} weight matrices of the transformer blocks; everything else stays {dtype}")

    work = dst.with_name(dst.name + ".part")
    settings = {"dtype": dtype, "quantize": quantize, "group_size": group_size, "shard_bytes": shard_bytes,
                "base": base, "skipped": {c.name: c.skipped for c in conversion.components}}
    fingerprint = _fingerprint(conversion, settings)
    fingerprint["files"] = _planned_files(conversion, shard_bytes)
    stamp = work / STAMP
    check_free_space(work, _planned_bytes(conversion), fingerprint["files"])
    if prepare_part(work, fingerprint):
        log(f"resuming the interrupted conversion in {work}")
    try:
        _write_json(stamp, fingerprint)
        _write_components(conversion, work, dtype, shard_bytes, progress, quantize, group_size)
        _write_manifest(conversion, work, src, dtype, quantize, group_size)
        ModelFolder.open(work)  # the folder must load before it takes the final name
        stamp.unlink()
        _publish(work, dst)
    except OSError as e:
        raise MlxVideoError(
            f"could not write {e.filename or work} ({e.strerror or e}); the finished shards are kept in {work}: "
            "free space (or fix the folder) and re-run the same command to resume"
        ) from None
    return dst


def _publish(work: Path, dst: Path) -> None:
    """Rename the finished folder to DST; an existing DST (--overwrite) is moved aside first and removed only once
    the new folder has its name, so that a failure leaves either the old DST or the new one, never neither."""
    if not os.path.lexists(dst):
        os.replace(work, dst)
        return
    old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(work, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _write_components(conversion: ConversionPlan, work: Path, dtype, shard_bytes, progress, quantize,
                      group_size) -> None:
    total = sum(len(c.items) for c in conversion.components)
    done = 0
    previous_cache = mx.set_cache_limit(CONVERT_CACHE_BYTES)
    try:
        for comp in conversion.components:
            out = work / comp.name
            out.mkdir(exist_ok=True)
            comp_dtype = comp.dtype or dtype
            shards = _shards(comp.items, shard_bytes)
            weight_map = {}
            for i, items in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                tensors = [o for item in items for o in item.outputs]
                weight_map.update({o.name: name for o in tensors})
                path = out / name
                if shard_is_complete(path, tensors):
                    done += len(items)
                    if progress:
                        progress(comp.name, done, total)
                    continue
                writer = ShardWriter(path, tensors, metadata={"format": "mlx"})
                try:
                    for item in items:
                        produce(item, comp.source, comp.keymap.transforms, comp_dtype, group_size, writer.write)
                        mx.clear_cache()
                        done += 1
                        if progress:
                            progress(comp.name, done, total)
                    writer.commit()
                except BaseException:
                    writer.abort()
                    raise
            _write_json(out / INDEX, {"metadata": {"mlxvid_version": __version__}, "weight_map": weight_map})
            _write_json(out / "config.json", comp.config)
            record = _quantization_record(comp, quantize, group_size)
            if record is not None:
                _write_json(out / QUANTIZATION_FILE, record)
            elif (out / QUANTIZATION_FILE).exists():
                (out / QUANTIZATION_FILE).unlink()
    finally:
        mx.set_cache_limit(previous_cache)


def _write_manifest(conversion: ConversionPlan, work: Path, src, dtype, quantize, group_size) -> None:
    for folder, files in conversion.copy_files.items():
        (work / folder).mkdir(exist_ok=True)
        for f, name in files:
            tmp = work / folder / (name + ".tmp")
            try:
                if isinstance(f, bytes):
                    tmp.write_bytes(f)
                else:
                    shutil.copyfile(f, tmp)
                os.replace(tmp, work / folder / name)
            finally:
                tmp.unlink(missing_ok=True)
    manifest = dict(conversion.manifest)
    manifest.update(
        dtype=DTYPE_NAMES[DTYPES[dtype]],
        quantization=None if quantize is None else (
            {"mode": quantize, "group_size": group_size} if MODES[quantize][0] == "affine" else {"mode": quantize}
        ),
        components=list(dict.fromkeys([c.name for c in conversion.components] + list(conversion.copy_files))),
        source={"path": str(Path(src).resolve()) if src is not None else None, "format": conversion.source_format,
                "files": [str(p.resolve()) for p in conversion.source_files]},
        mlxvid_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _write_json(work / MANIFEST, manifest)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_names(comp: ComponentPlan, shard_bytes: int) -> list[str]:
    n = len(_shards(comp.items, shard_bytes))
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _planned_files(conversion: ConversionPlan, shard_bytes: int) -> list[str]:
    """Every path (relative to DST.part) this conversion may write, temporary names included: what a later run
    may remove when it cannot resume this one."""
    files = [STAMP, MANIFEST]
    for comp in conversion.components:
        names = _shard_names(comp, shard_bytes) + [INDEX, "config.json", QUANTIZATION_FILE]
        files += [f"{comp.name}/{n}" for n in names]
    for folder, copied in conversion.copy_files.items():
        files += [f"{folder}/{name}" for _, name in copied]
    return sorted(set(files) | {f + ".tmp" for f in files})


def _planned_bytes(conversion: ConversionPlan) -> int:
    total = sum(item_nbytes(i) for c in conversion.components for i in c.items)
    for copied in conversion.copy_files.values():
        total += sum(len(f) if isinstance(f, bytes) else f.stat().st_size for f, _ in copied)
    return total
