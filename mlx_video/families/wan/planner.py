"""Wan 2.2 conversion: the layouts Wan is published in, how each component is recognised and configured,
which registry model a checkpoint is, and the manifest. The machinery (sources, key maps, the plan check,
shards, quantization, resume) is shared: `mlx_video.convert.convert`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from mlx_video.errors import MlxVideoError
from mlx_video.model_folder import MANIFEST
from mlx_video.registry import MODELS

from mlx_video.convert.convert import (
    COMPONENTS,
    KIND_OF,
    KIND_WORDS,
    OPTION_OF,
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    ComponentInput,
    ComponentPlan,
    ConversionPlan,
    component_input,
    config_errors,
    diffusers_pipeline_class,
    finish_plan,
    model_manifest,
    read_json,
    replace_components,
    tokenizer_files,
)
from mlx_video.families.wan.config_from_shapes import (
    describe_transformer,
    infer_umt5_config,
    same_size,
    size_differences,
    which_wan,
)
from mlx_video.convert.formats import ComponentSource, Kind, classify, lookalike, open_tensors, split_all_in_one
from mlx_video.families.wan.vace_keys import is_vace



OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAES = ("Wan2.2_VAE.pth", "Wan2.1_VAE.pth")
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"
# Wan2.2-S2V ships its voice encoder (a transformers wav2vec2 checkpoint) in this folder of the release.
OFFICIAL_WAV2VEC2 = "wav2vec2-large-xlsr-53-english"
S2V_MODEL = "wan2.2-s2v-14b"
# A VACE checkpoint's model in a published layout: by its experts (2) or its width.
VACE_MODELS = {2: "wan2.2-vace-fun-a14b", 1536: "wan2.1-vace-1.3b", 5120: "wan2.1-vace-14b"}

# The files of a diffusers-layout Wan repository that `mlxvid download` fetches.
DOWNLOAD_PATTERNS = ["model_index.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*",
                     "scheduler/*",
                     # Wan2.2-S2V is published in the official layout only
                     "config.json", "diffusion_pytorch_model*", "Wan2.1_VAE.pth", OFFICIAL_T5, "google/umt5-xxl/*",
                     f"{OFFICIAL_WAV2VEC2}/*",
                     # Wan2.2-VACE-Fun-A14B (alibaba-pai): the official two-expert layout
                     "high_noise_model/*", "low_noise_model/*"]
# and, per model, what only that model's repository needs: Wan2.2-Animate's CLIP image encoder
EXTRA_DOWNLOAD_PATTERNS = {name: ["image_encoder/*", "image_processor/*"] for name in (
    "wan2.2-animate-14b", "wan2.1-i2v-14b-720p", "wan2.1-i2v-14b-480p", "wan2.1-flf2v-14b")}


# (family, kind, naming, description, required keys) for `formats.classify`. kind is our component name; naming
# selects the key map.
SIGNATURES = [
    ("wan", "transformer", "official", "a Wan transformer (official / ComfyUI names)", ("patch_embedding.weight", "head.modulation", "blocks.0.self_attn.q.weight")),
    ("wan", "transformer", "diffusers", "a Wan transformer (diffusers names)", ("patch_embedding.weight", "scale_shift_table", "blocks.0.attn1.to_q.weight")),
    ("wan", "text_encoder", "official", "a UMT5 text encoder (official Wan names)", ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight")),
    ("wan", "text_encoder", "transformers", "a UMT5 text encoder (transformers names)", ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight")),
    ("wan", "vae", "official", "a Wan VAE (official / ComfyUI names)", ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")),
    ("wan", "vae", "diffusers", "a Wan VAE (diffusers names)", ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight", "encoder.mid_block.attentions.0.to_qkv.weight")),
]

# Wan checkpoints this planner does not convert: (description, any of these keys or key patterns).
LOOKALIKES = [
    ("a Wan 2.1 I2V / FLF2V transformer (it has the CLIP image embedding img_emb, which Wan 2.2 does not use)", (r"img_emb\..*", r"blocks\.\d+\.cross_attn\.k_img\..*")),
    ("a Wan 2.2 S2V transformer (audio conditioning)", (r"casual_audio_encoder\..*", r"audio_injector\..*")),
]


def refine_kind(kind: Kind, names: set) -> Kind:
    """A transformers-named T5 encoder matches the UMT5 signature: UMT5 keeps one relative-position table per
    block, T5 v1.1 one shared table (in block 0)."""
    if kind.kind == "text_encoder" and kind.naming == "transformers":
        per_block = [k for k in names if re.fullmatch(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", k)]
        blocks = {k.split(".")[2] for k in names if k.startswith("encoder.block.")}
        if len(blocks) > 1 and len(per_block) == 1:
            return Kind(None, None, "a T5 v1.1 encoder (one shared relative-position table, e.g. t5xxl), not UMT5")
    return kind


def claims(src, components: dict) -> bool:
    """Whether `src` (a folder or file, or None with component files) is a Wan checkpoint."""
    if src is None:
        return False
    src = Path(src)
    if not src.exists() or src.is_file():
        return False
    pipeline_class = diffusers_pipeline_class(src)
    if pipeline_class is not None:
        return pipeline_class.startswith("Wan")
    return (src / "high_noise_model").is_dir() or (src / "low_noise_model").is_dir() or _is_official_model_dir(src) \
        or _official_parts(src)


def _is_official_model_dir(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file() or not any(folder.glob("*.safetensors")):
        return False
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and (data.get("_class_name") == "WanModel" or "in_dim" in data)


def _official_parts(src: Path) -> bool:
    return (src / OFFICIAL_T5).is_file() or any((src / v).is_file() for v in OFFICIAL_VAES) or (src / OFFICIAL_TOKENIZER).is_dir()


def detect_format(src: Path) -> str:
    """"diffusers", "official", "files" (a folder of single-file checkpoints) or "file" (one checkpoint file)."""
    src = Path(src)
    if not src.exists():
        raise MlxVideoError(f"source {src} does not exist")
    if src.is_file():
        return "file"
    if (src / MANIFEST).is_file():
        raise MlxVideoError(f"{src} is already an mlxvid model folder; nothing to convert")
    if (src / "model_index.json").is_file():
        return "diffusers"
    if (src / "high_noise_model").is_dir() or (src / "low_noise_model").is_dir() or _is_official_model_dir(src):
        return "official"
    if _official_parts(src) or any(p.suffix in WEIGHT_SUFFIXES for p in src.iterdir() if p.is_file()):
        return "files"
    raise MlxVideoError(
        f"cannot tell what {src} holds: expected a diffusers folder (model_index.json, transformer/, text_encoder/, "
        "tokenizer/, vae/), the official release layout (high_noise_model/, low_noise_model/ or the TI2V-5B shards, "
        f"{OFFICIAL_T5}, Wan2.x_VAE.pth, google/umt5-xxl/) or single-file checkpoints"
    )


def _layout_diffusers(src: Path) -> tuple[dict, list, dict]:
    index = read_json(src / "model_index.json", "the diffusers pipeline description")
    pipeline_class = index.get("_class_name", "")
    if not str(pipeline_class).startswith("Wan"):
        raise MlxVideoError(f"{src} holds a {pipeline_class or 'unknown'} pipeline; mlxvid converts Wan 2.2 pipelines")
    inputs = {}
    two_experts = isinstance(index.get("transformer_2"), list) and index["transformer_2"][0] is not None
    for name in ["transformer", "transformer_2", "text_encoder", "vae"]:
        if name == "transformer_2" and not two_experts:
            continue
        folder = src / name
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise MlxVideoError(f"missing {folder / 'config.json'} (the {name} config)")
            inputs[name] = component_input(name, folder, f"{src.name}/{name}")
        elif name != "vae":
            inputs[name] = None  # required; may still come from an option
    tokenizer = tokenizer_files(src / "tokenizer", "tokenizer", OFFICIAL_TOKENIZER) if (src / "tokenizer").is_dir() else []
    return inputs, tokenizer, {"index": index, "two_experts": two_experts}


def _layout_official(src: Path) -> tuple[dict, list, dict]:
    inputs: dict = {}
    if (src / "high_noise_model").is_dir() or (src / "low_noise_model").is_dir():
        for name, folder in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
            if not (src / folder).is_dir():
                raise MlxVideoError(f"{src} has {'low' if folder == 'high_noise_model' else 'high'}_noise_model/ but no {folder}/")
            inputs[name] = component_input(name, src / folder, f"{src.name}/{folder}")
        two_experts = True
    else:
        inputs["transformer"] = component_input("transformer", src, f"{src.name}/ (the model shards)")
        two_experts = False
    inputs["text_encoder"] = component_input("text_encoder", src / OFFICIAL_T5, OFFICIAL_T5) if (src / OFFICIAL_T5).is_file() else None
    for vae in OFFICIAL_VAES:
        if (src / vae).is_file():
            inputs["vae"] = component_input("vae", src / vae, vae)
            break
    tokenizer = tokenizer_files(src / OFFICIAL_TOKENIZER, "tokenizer", OFFICIAL_TOKENIZER) if (src / OFFICIAL_TOKENIZER).is_dir() else []
    hints = {"two_experts": two_experts}
    if (src / OFFICIAL_WAV2VEC2).is_dir():
        hints["audio_encoder"] = src / OFFICIAL_WAV2VEC2
    return inputs, tokenizer, hints


def _layout_files(src: Path, log) -> tuple[dict, list, dict]:
    """A folder of single-file checkpoints: each is classified by its keys."""
    found, ignored = _classify_files(src)
    if ignored:
        log("ignored: " + "; ".join(ignored))
    inputs = _transformer_files(src, [p for p, _ in found["transformer"]])
    for kind in ("text_encoder", "vae"):
        if len(found[kind]) > 1:
            raise MlxVideoError(f"{src} holds several {kind.replace('_', ' ')}s ({', '.join(p.name for p, _ in found[kind])}); pass one with {OPTION_OF[kind]}")
        if found[kind]:
            inputs[kind] = component_input(kind, found[kind][0][0], found[kind][0][0].name)
    if not any(inputs.values()):
        raise MlxVideoError(f"{src} holds no checkpoint mlxvid knows" + (f": {'; '.join(ignored)}" if ignored else ""))
    tokenizer = []
    for candidate in (src / OFFICIAL_TOKENIZER, src / "tokenizer", src):
        if candidate.is_dir() and any((candidate / n).is_file() for n in TOKENIZER_FILES):
            tokenizer = tokenizer_files(candidate, "tokenizer", OFFICIAL_TOKENIZER)
            break
    return inputs, tokenizer, {"two_experts": "transformer_2" in inputs}


def _classify_files(src: Path) -> tuple[dict[str, list[tuple[Path, str]]], list[str]]:
    """The folder's checkpoint files by the component their keys say they are, and those left out (why)."""
    found: dict[str, list[tuple[Path, str]]] = {"transformer": [], "text_encoder": [], "vae": []}
    ignored = []
    for path in sorted(p for p in src.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        tensors = open_tensors(path, path.name)
        split = split_all_in_one(tensors)
        if split is not None:  # a ComfyUI all-in-one checkpoint: `_all_in_one` splits it
            for kind in split[0]:
                found[kind].append((path, f"the {kind.replace('_', ' ')} of an all-in-one checkpoint"))
            continue
        source = ComponentSource(tensors, path.name)
        kind = classify(source.keys(), "wan")
        if kind.kind is None or kind.family != "wan":
            ignored.append(f"{path.name} ({kind.description})")
            continue
        found[kind.kind].append((path, kind.description))
    return found, ignored


def _transformer_files(src: Path, transformers: list[Path]) -> dict:
    """One transformer, or two whose names say which is the high-noise expert."""
    if len(transformers) > 2:
        raise MlxVideoError(f"{src} holds {len(transformers)} transformers; pass the ones to use with --transformer/--transformer-2")
    if len(transformers) == 1:
        return {"transformer": component_input("transformer", transformers[0], transformers[0].name)}
    if not transformers:
        return {}
    high = [p for p in transformers if "high" in p.name.lower()]
    low = [p for p in transformers if "low" in p.name.lower()]
    if len(high) != 1 or len(low) != 1 or high[0] == low[0]:
        raise MlxVideoError(
            f"{src} holds two transformers ({', '.join(p.name for p in transformers)}) whose names do not say which "
            "is the high-noise expert; pass them as --transformer (high noise) and --transformer-2 (low noise)"
        )
    return {"transformer": component_input("transformer", high[0], high[0].name),
            "transformer_2": component_input("transformer_2", low[0], low[0].name)}


# ---------------------------------------------------------------------------------------------------
# components


def _all_in_one(inputs: dict, log) -> dict:
    """Components inside ComfyUI all-in-one files (formats.ALL_IN_ONE): such a file supplies the component it was
    given for and fills in the others that nothing else supplies. Returns {component: its view of the file}."""
    views = {}
    for name, inp in list(inputs.items()):
        if inp is None or not inp.path.is_file():
            continue
        split = split_all_in_one(open_tensors(inp.path, inp.origin))
        if split is None:
            continue
        parts, rest = split
        if KIND_OF[name] not in parts:
            raise MlxVideoError(
                f"{inp.origin}: {inp.path.name} is an all-in-one checkpoint without {KIND_WORDS[KIND_OF[name]]} "
                f"(it holds {', '.join(f'{k} under {v.label}' for k, v in parts.items())})"
            )
        views[name] = parts[KIND_OF[name]]
        for kind, view in parts.items():
            if kind != KIND_OF[name] and inputs.get(kind) is None:
                inputs[kind] = ComponentInput(kind, inp.path, inp.path.name)
                views[kind] = view
        log(f"{inp.path.name}: an all-in-one checkpoint holding " + ", ".join(f"the {k.replace('_', ' ')} ({v.label})" for k, v in parts.items())
            + (f"; {len(rest)} other keys left out ({', '.join(rest[:3])})" if rest else ""))
    return views


def _open_component(inp: ComponentInput) -> ComponentSource:
    what = f"{inp.origin}" if str(inp.path).endswith(inp.origin) else f"{inp.origin} ({inp.path})"
    return ComponentSource(open_tensors(inp.path, what), what)


def _check_kind(inp: ComponentInput, source: ComponentSource) -> str:
    """The naming of a component's keys; refuses a checkpoint of another kind or family."""
    kind = classify(source.keys(), "wan")
    want = KIND_OF[inp.name]
    if kind.kind != want or kind.family != "wan":
        raise MlxVideoError(
            f"{source.what} should be {KIND_WORDS[want]} for {inp.name}, but it looks like {kind.description}"
        )
    return kind.naming


def _shapes(source: ComponentSource) -> dict[str, tuple[int, ...]]:
    return {k: source.shape(k) for k in source.keys()}


def _transformer_config(inp: ComponentInput, source: ComponentSource, naming: str, spec):
    from mlx_video.families.wan.config_from_shapes import infer_transformer_config, transformer_config_from_official
    from mlx_video.families.wan.keys import transformer_config_from_diffusers

    from mlx_video.families.wan.vace_keys import backbone_config_json

    if inp.config_json is not None:
        from mlx_video.families.wan import image_planner

        config_json = image_planner.backbone_config_json(backbone_config_json(inp.config_json))
        cls = config_json.get("_class_name")
        try:
            if cls == "WanTransformer3DModel" or (cls is None and "num_attention_heads" in config_json):
                return transformer_config_from_diffusers(config_json), "config.json"
            return transformer_config_from_official(config_json), "config.json"
        except ValueError as e:
            raise MlxVideoError(f"{inp.path / 'config.json'}: {e}") from None
    # The head count is not in the shapes: the config of the component this file replaces when the width
    # matches, else the registry model's when the width matches, else dim / 128.
    cfg = infer_transformer_config(_shapes(source), naming)
    if inp.config_hint is not None:
        try:
            hint = _transformer_config(replace(inp, config_json=inp.config_hint, config_hint=None), source, naming, None)[0]
        except MlxVideoError:
            hint = None
        if hint is not None and hint.dim == cfg.dim:
            return replace(cfg, num_heads=hint.num_heads), "config.json"
    if spec is not None and cfg.dim == spec.transformer.dim:
        cfg = replace(cfg, num_heads=spec.transformer.num_heads)
    return cfg, "shapes"


def _is_s2v(source: ComponentSource) -> bool:
    """Whether a transformer checkpoint is Wan2.2-S2V's (the backbone plus the audio encoder and injectors)."""
    return "casual_audio_encoder.weights" in source


def _s2v_config(backbone, inp: ComponentInput, source: ComponentSource):
    """The S2V config: config.json's S2V fields (the official `WanModel_S2V` arguments) with the backbone read
    like any Wan transformer's; the wav2vec2 layer count is the shape of the audio encoder's layer weights."""
    from mlx_video.families.wan.s2v_keys import s2v_config_from_official

    try:
        cfg = s2v_config_from_official(inp.config_json or {})
    except ValueError as e:
        raise MlxVideoError(f"{source.what}: {e}") from None
    return replace(cfg, **backbone.to_dict(), audio_layers=source.shape("casual_audio_encoder.weights")[1])


def _audio_encoder_plan(folder: Path | None, src) -> ComponentPlan:
    from mlx_video.audio.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    from mlx_video.families.wan.wav2vec2_keys import TRANSFORMERS_WAV2VEC2, WeightNormFolded

    if folder is None:
        raise MlxVideoError(
            f"Wan2.2-S2V needs its voice encoder: {src or 'the source'} has no {OFFICIAL_WAV2VEC2}/ folder (the "
            "transformers wav2vec2 checkpoint of the release)"
        )
    inp = component_input("audio_encoder", folder, f"{OFFICIAL_WAV2VEC2}/")
    if inp.config_json is None:
        raise MlxVideoError(f"{folder} has no config.json (the wav2vec2 config)")
    try:
        cfg = Wav2Vec2Config.from_transformers(inp.config_json)
    except (ValueError, KeyError) as e:
        raise MlxVideoError(f"{folder / 'config.json'}: {e}") from None
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise MlxVideoError(f"{folder} holds no model.safetensors or pytorch_model.bin")
    path = folder if weights[0].suffix == ".safetensors" else weights[0]
    what = f"{OFFICIAL_WAV2VEC2}/ ({path})"
    source = ComponentSource(WeightNormFolded(open_tensors(path, what)), what)
    # the official pipeline runs wav2vec2 in float32
    return ComponentPlan("audio_encoder", source, TRANSFORMERS_WAV2VEC2, cfg.to_dict(), Wav2Vec2Model(cfg), "fp32",
                         origin=inp.origin)


def _transformer_hint(source: ComponentSource, naming: str) -> Callable[[], str]:
    def hint() -> str:
        from mlx_video.families.wan.config_from_shapes import describe_transformer, infer_transformer_config, which_wan

        try:
            cfg = infer_transformer_config(_shapes(source), naming, num_heads=1)
        except MlxVideoError:
            return ""
        like = which_wan(cfg, MODELS)
        return f". Its tensors are those of a transformer with {describe_transformer(cfg)}" + (f", the size of {like}" if like else "")

    return hint


def _pick_model(fmt: str, base: str | None, cfg, two_experts: bool, hints: dict) -> tuple[object, bool]:
    """The registry spec, and whether the checkpoint's size must equal the spec's."""
    from mlx_video.registry import get_spec

    if base is not None:
        return get_spec(base), True
    if hints.get("s2v"):
        return MODELS[S2V_MODEL], False
    if hints.get("animate"):
        from mlx_video.families.wan.animate_planner import ANIMATE_MODEL

        return MODELS[ANIMATE_MODEL], False
    if hints.get("image_context"):  # Wan2.1 I2V / FLF2V (480p or 720p: the same weights; --base names which)
        from mlx_video.families.wan.image_planner import I2V_MODELS

        return MODELS[I2V_MODELS[cfg.image_positions is not None]], False
    if fmt in ("diffusers", "official"):
        return MODELS[_model_of_layout(cfg, two_experts, hints)], False
    # S2V has the 14B backbone's shapes too, but is recognised by its audio tensors (hints["s2v"]), not its size;
    # VACE by its context branch (hints["vace"])
    matches = [s for s in MODELS.values() if s.family == "wan" and s.task != "s2v" and (s.experts == 2) == two_experts
               and (s.task == "vace") == bool(hints.get("vace")) and same_size(cfg, s.transformer)]
    if len(matches) == 1:
        return matches[0], True
    _refuse_one_expert_of_two(cfg, two_experts, hints)
    like = which_wan(cfg, MODELS)
    raise MlxVideoError(
        f"the transformer ({describe_transformer(cfg)}{', two experts' if two_experts else ''}) matches no registry model"
        + (f"; it looks like {like}" if like else "")
        + f". Known models: {', '.join(MODELS)}; pass --base MODEL_ID to name the one it is"
    )


def _model_of_layout(cfg, two_experts: bool, hints: dict) -> str:
    """A published layout's model: by its experts and (I2V) its image channels or pipeline class."""
    image_pipeline = hints.get("index", {}).get("_class_name") == "WanImageToVideoPipeline"
    if hints.get("vace"):
        # one expert: by its width (another width, a fine-tune of either: the nearer published one)
        return VACE_MODELS[2] if two_experts else VACE_MODELS.get(cfg.dim) or VACE_MODELS[1536 if cfg.dim < 5120 else 5120]
    if two_experts and (cfg.in_channels == 36 or image_pipeline):
        return "wan2.2-i2v-a14b"
    return "wan2.2-t2v-a14b" if two_experts else "wan2.2-ti2v-5b"


def _refuse_one_expert_of_two(cfg, two_experts: bool, hints: dict) -> None:
    """One file of a two-expert model's size: say which expert it is and that the other is missing."""
    pairs = [s for s in MODELS.values() if s.family == "wan" and s.experts == 2 and same_size(cfg, s.transformer)]
    if not pairs or two_experts:
        return
    name = str(hints.get("transformer_file", "")).lower()
    have, missing = ("high", "low") if "high" in name else ("low", "high") if "low" in name else (None, None)
    raise MlxVideoError(
        f"the transformer{' ' + hints['transformer_file'] if hints.get('transformer_file') else ''} is "
        + (f"the {have}-noise expert" if have else "one expert")
        + f" of {' or '.join(s.id for s in pairs)}, which needs two: the high-noise and the low-noise expert. "
        + (f"The {missing}-noise expert is missing" if have else "The other expert is missing")
        + ": put its file beside it (named ..._high_noise... / ..._low_noise...) or pass it with "
        + ("--transformer-2 (the low-noise expert)" if have != "low" else "--transformer (the high-noise expert) and this one as --transformer-2")
    )


def plan(
    src: str | Path | None,
    components: dict[str, str | Path] | None = None,
    tokenizer: str | Path | None = None,
    base: str | None = None,
    allow_unknown_keys: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> ConversionPlan:
    """A Wan source (a diffusers folder, the official release layout, a folder of single files or one file, with
    components replaced by option), in named steps: where each component comes from, the transformer(s) and the
    registry model, the text encoder, the VAE, the voice encoder (S2V), the tokenizer, the manifest."""
    components = _checked_components(src, components)
    layout = _layout(src, components, tokenizer, log)
    sources, namings = _open_sources(layout)
    spec, configs = _transformer_configs(layout, sources, namings, base, log)
    cfg = configs["transformer"]
    planned = _transformer_plans(layout, sources, namings, configs, log)
    planned.append(_text_encoder_plan(layout.inputs["text_encoder"], sources["text_encoder"], namings["text_encoder"], cfg))
    vae_cfg = None
    if layout.inputs.get("vae") is not None:  # optional: without it the pipeline stops at latents
        vae, vae_cfg = _vae_plan(layout.inputs["vae"], sources["vae"], namings["vae"], cfg)
        planned.append(vae)
    if layout.hints["s2v"]:
        planned.append(_audio_encoder_plan(layout.hints.get("audio_encoder"), layout.src))
    if layout.hints["animate"] or layout.hints["image_context"]:
        from mlx_video.families.wan.animate_planner import image_encoder_plan

        planned.append(image_encoder_plan(layout.src, layout.fmt, spec.id))
    copy_files = {"tokenizer": _tokenizer_to_copy(layout.tokenizer_files, sources["text_encoder"], log)}
    manifest = _manifest(layout, spec, cfg, vae_cfg)
    return finish_plan(_source_format(layout.fmt, components), manifest, planned, copy_files, allow_unknown_keys, log)


@dataclass
class _Layout:
    """Where each component comes from: the source's format, its component inputs (and the views of all-in-one
    files among them), the tokenizer files found, and what the layout says (experts, model_index.json, S2V)."""

    src: Path | None
    fmt: str
    inputs: dict
    views: dict
    tokenizer_files: list
    hints: dict

    @property
    def two_experts(self) -> bool:
        return self.inputs.get("transformer_2") is not None


def _checked_components(src, components) -> dict:
    components = {k: v for k, v in (components or {}).items() if v is not None}
    for name in components:
        if name not in COMPONENTS:
            raise MlxVideoError(f"unknown component {name!r}; components are {', '.join(COMPONENTS)}")
    if src is None and not components:
        raise MlxVideoError("nothing to convert: give a source folder SRC, or component files (--transformer ...) with --base")
    return components


def _source_layout(src: Path | None, components: dict, log) -> tuple[str, dict, list, dict, dict]:
    """(format, inputs, tokenizer files, hints, components) as the source itself lays them out."""
    if src is None:
        return "files", {}, [], {"two_experts": False}, components
    fmt = detect_format(src)
    if fmt == "file":
        return "files", {}, [], {"two_experts": False}, {"transformer": src, **components}
    layout = {"diffusers": _layout_diffusers, "official": _layout_official}.get(fmt)
    inputs, found, hints = layout(src) if layout is not None else _layout_files(src, log)
    return fmt, inputs, found, hints, components


def _layout(src, components: dict, tokenizer, log) -> _Layout:
    src = Path(src) if src is not None else None
    fmt, inputs, found_tokenizer, hints, components = _source_layout(src, components, log)
    # a single file on top of a diffusers folder: the folder's config still says what the shapes cannot
    replace_components(inputs, components, OPTION_OF, carry="config_hint")
    views = _all_in_one(inputs, log)
    if tokenizer is not None:
        found_tokenizer = tokenizer_files(Path(tokenizer), "--tokenizer", OFFICIAL_TOKENIZER)
    for name in ("transformer", "text_encoder"):
        if inputs.get(name) is None:
            where = {"diffusers": f"{name}/", "official": "high_noise_model/ or the model shards" if name == "transformer" else OFFICIAL_T5}.get(fmt, "")
            raise MlxVideoError(
                f"no {name.replace('_', ' ')}: {('SRC has no ' + where + '; ') if where and src is not None else ''}"
                f"pass {OPTION_OF[name]} FILE"
            )
    if fmt == "diffusers" and hints["two_experts"] and inputs.get("transformer_2") is None:
        raise MlxVideoError(f"{src} is a two-expert pipeline but has no transformer_2/; pass --transformer-2 FILE")
    transformer = inputs["transformer"]
    hints = dict(hints, transformer_file=transformer.path.name if transformer.path.is_file() else None)
    return _Layout(src, fmt, inputs, views, found_tokenizer, hints)


def _source_format(fmt: str, components: dict) -> str:
    source_format = {"diffusers": "diffusers", "official": "official Wan release layout", "files": "single-file checkpoints"}[fmt]
    if components and fmt != "files":
        source_format += " + " + ", ".join(OPTION_OF[n] for n in components)
    return source_format


def _open_sources(layout: _Layout) -> tuple[dict, dict]:
    """Each component's tensors, and its naming (official or diffusers/transformers), checked to be what it should."""
    views = layout.views
    sources = {
        name: ComponentSource(views[name], f"{inp.origin} [{views[name].label}]") if name in views else _open_component(inp)
        for name, inp in layout.inputs.items()
        if inp is not None
    }
    for name in ("transformer", "transformer_2"):
        _check_gguf_patch_embedding(sources.get(name))
    namings = {name: _check_kind(layout.inputs[name], source) for name, source in sources.items()}
    layout.hints["s2v"] = _is_s2v(sources["transformer"])
    layout.hints["vace"] = is_vace(sources["transformer"].keys())
    if "transformer_2" in sources and is_vace(sources["transformer_2"].keys()) != layout.hints["vace"]:
        raise MlxVideoError(f"one expert has the VACE context branch (vace_blocks) and the other not: "
                            f"{sources['transformer'].what}, {sources['transformer_2'].what}")
    from mlx_video.families.wan.animate_planner import is_animate

    layout.hints["animate"] = is_animate(sources["transformer"])
    from mlx_video.families.wan.image_planner import has_image_context

    layout.hints["image_context"] = not layout.hints["animate"] and has_image_context(sources["transformer"])
    return sources, namings


def _check_gguf_patch_embedding(source) -> None:
    if source is not None and source.keys() and source.ggml_type(source.keys()[0]) is not None \
            and "patch_embedding.weight" not in source \
            and "head.modulation" in source:
        raise MlxVideoError(
            f"{source.what} lacks patch_embedding.weight: ComfyUI-GGUF's convert.py leaves this 5-D tensor out and "
            "its fix_5d_tensors.py puts it back after quantizing; run that step on the file"
        )


def _transformer_configs(layout: _Layout, sources: dict, namings: dict, base, log) -> tuple[object, dict]:
    """The registry model and each transformer's config (from config.json, else from the shapes)."""
    inputs, two_experts = layout.inputs, layout.two_experts
    if layout.hints["animate"]:  # Wan2.2-Animate: its own config and key tables (animate_planner.py)
        from mlx_video.families.wan.animate_planner import transformer_plan

        layout.hints["animate_plan"], cfg = transformer_plan(inputs["transformer"], sources["transformer"],
                                                             namings["transformer"])
        spec, strict = _pick_model(layout.fmt, base, cfg, two_experts, layout.hints)
        _check_model_size(cfg, spec, strict, sources["transformer"], log)
        _check_expert_count(spec, two_experts, inputs)
        return spec, {"transformer": cfg}
    base_spec = None
    if base is not None:
        from mlx_video.registry import get_spec

        base_spec = get_spec(base)
    cfg, cfg_from = _transformer_config(inputs["transformer"], sources["transformer"], namings["transformer"], base_spec)
    cfg2 = cfg2_from = None
    if two_experts:
        cfg2, cfg2_from = _transformer_config(inputs["transformer_2"], sources["transformer_2"], namings["transformer_2"], base_spec)
        if cfg_from == "shapes" and cfg2_from == "config.json" and cfg2.dim == cfg.dim:
            cfg = replace(cfg, num_heads=cfg2.num_heads)  # a replaced expert: its sibling's config tells the heads
    cfg, cfg2 = _variant_configs(layout, sources, cfg, cfg2)
    spec, strict = _pick_model(layout.fmt, base, cfg, two_experts, layout.hints)
    _check_model_size(cfg, spec, strict, sources["transformer"], log)
    _check_expert_count(spec, two_experts, inputs)
    if cfg_from == "shapes" and cfg2_from != "config.json" and spec.transformer.dim == cfg.dim:
        cfg = replace(cfg, num_heads=spec.transformer.num_heads)
    if cfg.num_heads == 0 or cfg.dim % cfg.num_heads:
        raise MlxVideoError(
            f"cannot tell the number of attention heads of the {cfg.dim}-wide transformer {sources['transformer'].what}; "
            "pass --base MODEL_ID or give it a config.json"
        )
    configs = {"transformer": cfg}
    if two_experts:
        if not same_size(cfg2, cfg):
            raise MlxVideoError(
                f"the two experts differ: {sources['transformer_2'].what} has {describe_transformer(cfg2)}, "
                f"{sources['transformer'].what} has {describe_transformer(cfg)}"
            )
        # shapes do not tell the head count: a second expert without a config.json takes the first one's
        configs["transformer_2"] = cfg2 if cfg2_from == "config.json" else cfg
    return spec, configs


def _variant_configs(layout: _Layout, sources: dict, cfg, cfg2):
    """The backbone configs made S2V's or VACE's where the checkpoint has their parts."""
    inputs = layout.inputs
    if layout.hints["s2v"]:
        cfg = _s2v_config(cfg, inputs["transformer"], sources["transformer"])
    if layout.hints["image_context"]:
        from mlx_video.families.wan.image_planner import image_config

        cfg = image_config(cfg, sources["transformer"], inputs["transformer"].config_json)
    if layout.hints["vace"]:
        cfg = _vace_config(cfg, inputs["transformer"], sources["transformer"])
        if layout.two_experts:
            cfg2 = _vace_config(cfg2, inputs["transformer_2"], sources["transformer_2"])
    return cfg, cfg2


def _check_model_size(cfg, spec, strict: bool, source, log) -> None:
    if same_size(cfg, spec.transformer):
        return
    like = which_wan(cfg, MODELS)
    message = (
        f"{source.what} is a transformer with {describe_transformer(cfg)}"
        + (f", the size of {like}" if like else "")
        + f"; {spec.id} has {describe_transformer(spec.transformer)} ({size_differences(cfg, spec.transformer)})"
    )
    if strict:
        raise MlxVideoError(message)
    log(f"note: {message}; converting with the checkpoint's own configuration")


def _check_expert_count(spec, two_experts: bool, inputs: dict) -> None:
    if (spec.experts == 2) == two_experts:
        return
    if two_experts:
        raise MlxVideoError(f"{spec.id} has one transformer, but a second one was given ({inputs['transformer_2'].origin})")
    raise MlxVideoError(
        f"{spec.id} has two experts: the high-noise one and the low-noise one; only one transformer was given. "
        "Pass the low-noise expert with --transformer-2"
    )


def _transformer_plans(layout: _Layout, sources: dict, namings: dict, configs: dict, log) -> list[ComponentPlan]:
    from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER
    from mlx_video.families.wan.transformer import WanTransformer

    if layout.hints["animate"]:
        return [layout.hints["animate_plan"]]
    planned = []
    for name in configs:
        source = sources[name]
        extra = None if layout.hints["image_context"] else lookalike(source.keys())
        if extra:
            log(f"warning: {source.what} looks like {extra}")
        keymap = OFFICIAL_TRANSFORMER if namings[name] == "official" else DIFFUSERS_TRANSFORMER
        module, low_precision = None, None
        if layout.hints["image_context"]:
            from mlx_video.families.wan.image_planner import image_transformer

            keymap, module = image_transformer(namings[name], configs[name])
        elif layout.hints["s2v"]:
            keymap, module = _s2v_transformer(source, namings[name], configs[name])
        elif layout.hints["vace"]:
            keymap, module, low_precision = _vace_transformer(namings[name], configs[name])
        planned.append(ComponentPlan(
            name, source, keymap, configs[name].to_dict(), module or WanTransformer(configs[name]),
            origin=layout.inputs[name].origin, size_hint=_transformer_hint(source, namings[name]),
            low_precision=low_precision,
        ))
    _warn_expert_names(layout, log)
    return planned


def _vace_config(backbone, inp: ComponentInput, source: ComponentSource):
    from mlx_video.families.wan.vace_keys import vace_config

    try:
        return vace_config(backbone, inp.config_json, _shapes(source))
    except ValueError as e:
        raise MlxVideoError(f"{source.what}: {e}") from None


def _vace_transformer(naming: str, cfg):
    from mlx_video.families.wan.vace_keys import DIFFUSERS_VACE_TRANSFORMER, LOW_PRECISION_VACE, OFFICIAL_VACE_TRANSFORMER
    from mlx_video.families.wan.vace_model import WanVACETransformer

    keymap = OFFICIAL_VACE_TRANSFORMER if naming == "official" else DIFFUSERS_VACE_TRANSFORMER
    return keymap, WanVACETransformer(cfg), LOW_PRECISION_VACE


def _s2v_transformer(source, naming: str, cfg):
    from mlx_video.families.wan.s2v_keys import OFFICIAL_S2V_TRANSFORMER
    from mlx_video.families.wan.s2v_model import WanS2VTransformer

    if naming != "official":
        raise MlxVideoError(f"{source.what}: Wan2.2-S2V converts from the official release's names only")
    return OFFICIAL_S2V_TRANSFORMER, WanS2VTransformer(cfg)


def _warn_expert_names(layout: _Layout, log) -> None:
    """A file named like the other expert than the one it is used as."""
    for name in ("transformer", "transformer_2"):
        inp = layout.inputs.get(name)
        if inp is None or not inp.path.is_file() or not layout.two_experts:
            continue
        wrong = "low_noise" if name == "transformer" else "high_noise"
        if wrong in inp.path.name.lower():
            log(f"warning: {inp.path.name} is named like the {wrong.split('_')[0]}-noise expert but is used as {name} "
                f"({'high' if name == 'transformer' else 'low'}-noise)")


def _text_encoder_plan(inp, source, naming: str, cfg) -> ComponentPlan:
    from mlx_video.families.wan.umt5_keys import OFFICIAL_UMT5, TRANSFORMERS_UMT5
    from mlx_video.text_encoders.umt5 import UMT5Config, UMT5Encoder

    if inp.config_json is not None:
        with config_errors(inp, ValueError, KeyError):
            te_cfg = UMT5Config.from_transformers(inp.config_json)
    else:
        te_cfg = infer_umt5_config(_shapes(source), naming)
    if te_cfg.dim != cfg.text_dim:
        raise MlxVideoError(
            f"{source.what} produces {te_cfg.dim}-wide text embeddings but the transformer takes {cfg.text_dim}: "
            "they do not belong to the same model"
        )
    te_map = OFFICIAL_UMT5 if naming == "official" else TRANSFORMERS_UMT5
    return ComponentPlan("text_encoder", source, te_map, te_cfg.to_dict(), UMT5Encoder(te_cfg), origin=inp.origin)


def _vae_plan(inp, source, naming: str, cfg) -> tuple[ComponentPlan, object]:
    from mlx_video.families.wan.official_vae import infer_official_vae_config, official_vae_keymap
    from mlx_video.families.wan.vae import WanVAE, WanVAEConfig
    from mlx_video.families.wan.vae_keys import DIFFUSERS_VAE

    if naming == "official":
        vae_cfg = infer_official_vae_config(_shapes(source))
        vae_map = official_vae_keymap(source.keys())
    else:
        if inp.config_json is None:
            raise MlxVideoError(
                f"{source.what} is a VAE in diffusers names without its config.json; pass the diffusers vae/ folder"
            )
        with config_errors(inp, ValueError):
            vae_cfg = WanVAEConfig.from_diffusers(inp.config_json)
        vae_map = DIFFUSERS_VAE
    if vae_cfg.z_dim != cfg.out_channels:
        which = {16: "the Wan 2.1 VAE", 48: "the Wan 2.2 VAE"}
        raise MlxVideoError(
            f"{source.what} has {vae_cfg.z_dim} latent channels ({which.get(vae_cfg.z_dim, 'an unknown VAE')}), but "
            f"the transformer works on {cfg.out_channels} ({which.get(cfg.out_channels, 'another VAE')})"
        )
    return ComponentPlan("vae", source, vae_map, vae_cfg.to_dict(), WanVAE(vae_cfg), "fp32", origin=inp.origin), vae_cfg


def _tokenizer_to_copy(found: list, te_source, log) -> list:
    """The tokenizer files found, else the SentencePiece model a ComfyUI text encoder file embeds."""
    if found:
        return found
    from mlx_video.convert.formats import embedded_spiece

    embedded = embedded_spiece(te_source)
    if embedded is None:
        raise MlxVideoError(
            "no tokenizer: pass --tokenizer PATH (the google/umt5-xxl folder, or its spiece.model or tokenizer.json)"
        )
    log(f"tokenizer: the SentencePiece model embedded in {te_source.what}")
    return [(embedded, "spiece.model")]


def _manifest(layout: _Layout, spec, cfg, vae_cfg) -> dict:
    fmt, hints = layout.fmt, layout.hints
    boundary = None
    if layout.two_experts:
        boundary = hints.get("index", {}).get("boundary_ratio") if fmt == "diffusers" else spec.default("boundary")
        if boundary is None:
            raise MlxVideoError(f"{layout.src / 'model_index.json'} has two transformers but no boundary_ratio")
    per_frame = bool(hints["index"].get("expand_timesteps", False)) if fmt == "diffusers" else spec.default("per_frame_timesteps", False)
    vae_stride = list(spec.vae_stride)
    if vae_cfg is not None:
        vae_stride = [vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial, vae_cfg.scale_factor_spatial]
    # Self-describing: the published defaults travel with the folder, so a renamed or fine-tuned copy runs.
    defaults = dict(spec.defaults, boundary=boundary, per_frame_timesteps=per_frame)
    size_multiple = max(vae_stride[1] * cfg.patch_size[1], spec.size_multiple if hints["s2v"] else 1)
    return model_manifest("wan", spec, vae_stride, size_multiple, defaults, experts=2 if layout.two_experts else 1,
                          frame_offset=spec.frame_offset)
