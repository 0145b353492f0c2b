"""HunyuanVideo 1.5 conversion: the diffusers layout (`HunyuanVideo15Pipeline` /
`HunyuanVideo15ImageToVideoPipeline`, the hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-* repositories) and
the official release layout (tencent/HunyuanVideo-1.5: `transformer/<variant>/` holding config.json and
`diffusion_pytorch_model*.safetensors` in the official names). The key tables are in `keys.py`; the machinery
(sources, plan check, shards, quantization, resume) is shared: `mlx_video.convert.convert`.

Which published model a folder is: `--base` when given; else, for the official layout, its one variant folder
(several: refused unless `--base` picks one); for a diffusers folder, the pipeline class (T2V / I2V), the
transformer's `target_size` (640: 480p, 960: 720p) and `use_meanflow`, and the guider's guidance scale (`guider/guider_config.json`,
as diffusers saves it; 1: the CFG-distilled models).

Beside the transformer, a diffusers folder's encoders are converted when it has them: `text_encoder/` (Qwen2.5-VL's
language model, without the two decoder layers after the hidden state it gives and the final norm) with
`tokenizer/` (its tokenizer.json, checked to split the chat template's system turn into the 108 tokens the crop
assumes), `text_encoder_2/` (the ByT5 glyph encoder) with `tokenizer_2/`, and for I2V `image_encoder/` (SigLIP)
with `feature_extractor/`, and `vae/` (kept in float32, as the reference runs it). The official layout's
`vae/` (official names, `vae_keys.py`) converts with its transformer, as do its encoders where it holds them
(`text_encoder/llm`, `text_encoder/byt5-small` + `Glyph-SDXL-v2`, whose `byt5_model.pt` the restricted pickle reader
reads, `vision_encoder/siglip`).
A super-resolution model (official layout only) also converts its latent upsampler, `upsampler/<variant>/`.

On top of either layout, `--transformer`, `--text-encoder` (Qwen2.5-VL), `--text-encoder-2` (ByT5) and `--vae` replace
a component with a file or folder, taking the replaced component's config.json: official or diffusers names, or
ComfyUI's single files (Comfy-Org/HunyuanVideo_1.5_repackaged; the transformer's fused q|k|v, keys.py
COMFY_TRANSFORMER_SPLITS; the VAE's `nin_shortcut.conv.`, vae_keys.py; the Qwen file's `model.` names beside its
vision tower, which is left out).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from mlx_video.convert.convert import (
    ComponentPlan,
    ConversionPlan,
    check_component_names,
    component_input,
    config_errors,
    diffusers_pipeline_class,
    finish_plan,
    model_manifest,
    read_json,
    replace_components,
    with_overrides,
)
from mlx_video.convert.formats import ComponentSource, FusedParts, SplitRows, classify, fused_keymap, open_tensors
from mlx_video.errors import MlxVideoError
from mlx_video.model_folder import MANIFEST

FAMILY = "hunyuan15"
PIPELINES = {"HunyuanVideo15Pipeline": "t2v", "HunyuanVideo15ImageToVideoPipeline": "i2v"}
OVERRIDES = {"transformer": "--transformer", "text_encoder": "--text-encoder", "text_encoder_2": "--text-encoder-2",
             "vae": "--vae"}
ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder", "vae")
TOKENIZER_FILES = {"tokenizer": ("tokenizer.json", "tokenizer_config.json"),
                   "tokenizer_2": ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"),
                   "feature_extractor": ("preprocessor_config.json",)}
DOWNLOAD_PATTERNS = ["model_index.json", "transformer/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                     "tokenizer_2/*", "vae/*", "scheduler/*", "guider/*", "image_encoder/*", "feature_extractor/*"]
LOW_PRECISION_TRANSFORMER = re.compile(
    r"double_blocks\.\d+\.(img|txt)\.(mod|attn_[qkv]|attn_proj|mlp\.fc[12])\.weight"
    r"|txt_in\.blocks\.\d+\.(self_attn_qkv|self_attn_proj|mlp\.fc[12]|adaLN_modulation)\.weight"
)

SIGNATURES = [
    (FAMILY, "transformer", "diffusers", "a HunyuanVideo 1.5 transformer (diffusers names)",
     ("x_embedder.proj.weight", "context_embedder_2.linear_1.weight", "cond_type_embed.weight",
      "transformer_blocks.0.attn.add_q_proj.weight")),
    (FAMILY, "transformer", "official", "a HunyuanVideo 1.5 transformer (official names)",
     ("img_in.proj.weight", "byt5_in.fc1.weight", "cond_type_embedding.weight", "double_blocks.0.img_attn_q.weight")),
    # ComfyUI's repackaged files: the official names with the double blocks' q|k|v fused (keys.py COMFY_TRANSFORMER_SPLITS)
    (FAMILY, "transformer", "comfyui", "a HunyuanVideo 1.5 transformer (ComfyUI names)",
     ("img_in.proj.weight", "byt5_in.fc1.weight", "cond_type_embedding.weight", "double_blocks.0.img_attn_qkv.weight")),
]
LOOKALIKES = [
    ("a HunyuanVideo 1.5 transformer", (r"byt5_in\..*", r"double_blocks\.\d+\.img_attn_q\..*")),
]


def official_variants(src: Path) -> list[str]:
    """The variant folders of the official layout under `src` (transformer/<variant>/ with safetensors)."""
    root = Path(src) / "transformer"
    if not root.is_dir() or (Path(src) / "model_index.json").is_file():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("diffusion_pytorch_model*.safetensors")))


def claims(src, components: dict) -> bool:
    if src is None:
        return False
    return diffusers_pipeline_class(src) in PIPELINES or (Path(src).is_dir() and bool(official_variants(Path(src))))


def plan(src, components=None, tokenizer=None, base=None, allow_unknown_keys: bool = False,
         log: Callable[[str], None] = lambda s: None) -> ConversionPlan:
    """The folder's transformer and encoders (each replaceable by its option, OVERRIDES), its model id, the
    manifest."""
    components = {k: v for k, v in (components or {}).items() if v is not None}
    check_component_names(components, OVERRIDES, "HunyuanVideo 1.5")
    if src is None or tokenizer is not None:
        raise MlxVideoError("HunyuanVideo 1.5 converts from a diffusers folder (model_index.json, transformer/, ...) "
                            "or the official layout (transformer/<variant>/), optionally with "
                            + ", ".join(OVERRIDES.values()))
    src = Path(src)
    if (src / MANIFEST).is_file():
        raise MlxVideoError(f"{src} is already an mlxvid model folder; nothing to convert")
    inputs, source_format, variant = _source_inputs(src, base)
    replace_components(inputs, components, OVERRIDES)
    spec = _pick_model(src, inputs["transformer"], variant, base)
    transformer, cfg = _transformer_plan(inputs["transformer"], spec, log)
    planned = [transformer, *_encoder_plans(inputs, cfg), *_upsampler_plans(src, spec)]
    manifest = model_manifest(FAMILY, spec, list(spec.vae_stride), spec.vae_stride[1] * cfg.patch_size[1],
                              dict(spec.defaults))
    copy_files = _tokenizer_files(src, inputs) if variant is None else _official_tokenizer_files(src, inputs)
    conversion = finish_plan(source_format, manifest, planned, copy_files, allow_unknown_keys, log)
    conversion.source_format = with_overrides(source_format, components, planned, OVERRIDES)
    return conversion


def _source_inputs(src: Path, base: str | None) -> tuple[dict, str, str | None]:
    """({"transformer": input}, the source format, the official variant or None)."""
    pipeline = diffusers_pipeline_class(src)
    if pipeline is not None:
        if pipeline not in PIPELINES:
            raise MlxVideoError(f"{src} holds a {pipeline or 'unreadable'} pipeline; HunyuanVideo 1.5 converts "
                                f"{' or '.join(PIPELINES)}")
        if not (src / "transformer").is_dir():
            raise MlxVideoError(f"{src} has no transformer/")
        inputs = {name: component_input(name, src / name, f"{src.name}/{name}")
                  for name in ("transformer", *ENCODERS) if (src / name).is_dir()}
        return inputs, f"diffusers ({pipeline})", None
    variants = official_variants(src)
    variant = _official_variant(src, variants, base)
    folder = src / "transformer" / variant
    inputs = {"transformer": component_input("transformer", folder, f"{src.name}/transformer/{variant}")}
    if (src / "vae").is_dir():
        inputs["vae"] = component_input("vae", src / "vae", f"{src.name}/vae")
    inputs.update(_official_encoder_inputs(src))
    return inputs, f"the official release layout (HunyuanVideo 1.5, {variant})", variant


# The encoders as the release's checkpoints-download.md lays them out beside its transformer/ and vae/:
# text_encoder/llm (Qwen/Qwen2.5-VL-7B-Instruct), text_encoder/byt5-small (google/byt5-small, for its config) with
# text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt (the weights) and .../assets (its added tokens), and
# vision_encoder/siglip (black-forest-labs/FLUX.1-Redux-dev: image_encoder/, feature_extractor/).
OFFICIAL_QWEN = Path("text_encoder/llm")
OFFICIAL_BYT5_CONFIG = Path("text_encoder/byt5-small/config.json")
OFFICIAL_GLYPH = Path("text_encoder/Glyph-SDXL-v2")
OFFICIAL_SIGLIP = Path("vision_encoder/siglip")


def _official_encoder_inputs(src: Path) -> dict:
    """The release's encoders that `src` holds (each optional: without them the folder converts without them)."""
    from mlx_video.convert.convert import ComponentInput

    inputs = {}
    if (src / OFFICIAL_QWEN).is_dir():
        inputs["text_encoder"] = component_input("text_encoder", src / OFFICIAL_QWEN, f"{src.name}/{OFFICIAL_QWEN}")
    glyph = src / OFFICIAL_GLYPH / "checkpoints" / "byt5_model.pt"
    if glyph.is_file():
        if not (src / OFFICIAL_BYT5_CONFIG).is_file():
            raise MlxVideoError(f"{src} holds {glyph.relative_to(src)} but not {OFFICIAL_BYT5_CONFIG} (the ByT5 "
                                "architecture its weights fill)")
        inputs["text_encoder_2"] = ComponentInput("text_encoder_2", glyph, f"{src.name}/{glyph.relative_to(src)}",
                                                  read_json(src / OFFICIAL_BYT5_CONFIG, "the ByT5 config"))
    if (src / OFFICIAL_SIGLIP / "image_encoder").is_dir():
        inputs["image_encoder"] = component_input("image_encoder", src / OFFICIAL_SIGLIP / "image_encoder",
                                                  f"{src.name}/{OFFICIAL_SIGLIP}/image_encoder")
    return inputs


def _official_tokenizer_files(src: Path, inputs: dict) -> dict:
    """The tokenizer and preprocessor files of the release's encoders (see OFFICIAL_QWEN ...)."""
    from mlx_video.text_encoders.byt5 import BASE_VOCAB, ByT5Tokenizer, glyph_tokens_from_folder

    files = {}
    if "text_encoder" in inputs:
        _check_qwen_tokenizer(src / OFFICIAL_QWEN)
        files["tokenizer"] = [(src / OFFICIAL_QWEN / n, n) for n in TOKENIZER_FILES["tokenizer"]
                              if (src / OFFICIAL_QWEN / n).is_file()]
    if "text_encoder_2" in inputs:
        tokenizer = ByT5Tokenizer(glyph_tokens_from_folder(src / OFFICIAL_GLYPH))
        added = {t: i for t, i in tokenizer.ids.items() if i >= BASE_VOCAB}
        files["tokenizer_2"] = [(json.dumps(added).encode(), "added_tokens.json")]
    preprocessor = src / OFFICIAL_SIGLIP / "feature_extractor" / "preprocessor_config.json"
    if "image_encoder" in inputs and preprocessor.is_file():
        files["feature_extractor"] = [(preprocessor, "preprocessor_config.json")]
    return files


def _official_variant(src: Path, variants: list[str], base: str | None) -> str:
    from mlx_video.registry import get_spec

    if not variants:
        raise MlxVideoError(f"{src} holds neither a diffusers HunyuanVideo 1.5 pipeline nor transformer/<variant>/")
    if base is not None:
        wanted = get_spec(base).extra.get("official_variant")
        if wanted not in variants:
            raise MlxVideoError(f"{base} is transformer/{wanted}/ of the release; {src} holds {', '.join(variants)}")
        return wanted
    if len(variants) > 1:
        raise MlxVideoError(f"{src} holds {len(variants)} transformer variants ({', '.join(variants)}): name the "
                            "model to convert with --base (e.g. hunyuanvideo-1.5-480p-t2v)")
    return variants[0]


def _pick_model(src: Path, inp, variant: str | None, base: str | None):
    from mlx_video.registry import MODELS, get_spec

    if base is not None:
        return get_spec(base)
    if variant is None:
        task = PIPELINES[diffusers_pipeline_class(src)]
        config = inp.config_json or {}
        resolution = {640: "480p", 960: "720p"}.get(int(config.get("target_size", 640)), "480p")
        guider = src / "guider" / "guider_config.json"  # diffusers' BaseGuidance.config_name
        scale = float(read_json(guider, "the guider config").get("guidance_scale", 6.0)) if guider.is_file() else 6.0
        suffix = "_step_distilled" if config.get("use_meanflow") else "_distilled" if scale == 1.0 else ""
        variant = f"{resolution}_{task}{suffix}"
    found = [s for s in MODELS.values() if s.family == FAMILY and s.extra.get("official_variant") == variant]
    if not found:
        raise MlxVideoError(f"{src} is HunyuanVideo 1.5 {variant}, which has no published model id here; name one "
                            "with --base")
    return found[0]


def _transformer_plan(inp, spec, log) -> tuple[ComponentPlan, object]:
    from .keys import (
        COMFY_TRANSFORMER_SPLITS,
        DIFFUSERS_TRANSFORMER,
        OFFICIAL_TRANSFORMER,
        config_from_diffusers,
        config_from_shapes,
    )
    from .transformer import Hunyuan15Transformer

    tensors = open_tensors(inp.path, inp.origin)
    source = ComponentSource(tensors, inp.origin)
    kind = classify(source.keys(), FAMILY)
    if kind.kind != "transformer" or kind.family != FAMILY:
        raise MlxVideoError(f"{inp.origin} should be the HunyuanVideo 1.5 transformer, but it looks like "
                            f"{kind.description}")
    if kind.naming == "comfyui":  # the official names once the fused q|k|v are read as q, k, v
        tensors = SplitRows(tensors, COMFY_TRANSFORMER_SPLITS, inp.origin)
        source = ComponentSource(tensors, inp.origin)
    with config_errors(inp, ValueError):
        if kind.naming != "diffusers":
            cfg = config_from_shapes(source.keys(), source.shape, inp.config_json, spec.transformer)
        else:
            cfg = config_from_diffusers(inp.config_json or {})
    if kind.naming == "diffusers":
        source = ComponentSource(FusedParts(tensors, DIFFUSERS_TRANSFORMER, inp.origin), inp.origin)
        keymap = fused_keymap(DIFFUSERS_TRANSFORMER)
    else:
        keymap = OFFICIAL_TRANSFORMER
    if cfg != spec.transformer:
        log(f"note: the transformer's configuration differs from {spec.id}'s published one; converting it as it is")
    return ComponentPlan("transformer", source, keymap, cfg.to_dict(), Hunyuan15Transformer(cfg), origin=inp.origin,
                         low_precision=LOW_PRECISION_TRANSFORMER), cfg


# --- the encoders -----------------------------------------------------------------------------------------


def _tokenizer_files(src: Path, inputs: dict) -> dict:
    """The tokenizer and preprocessor files to copy beside the converted encoders (those the folder has)."""
    files = {}
    for folder, names in TOKENIZER_FILES.items():
        found = [(src / folder / n, n) for n in names if (src / folder / n).is_file()]
        if found:
            files[folder] = found
    if "tokenizer_2" in files and not (src / "tokenizer_2" / "added_tokens.json").is_file():
        files["tokenizer_2"].append((_byt5_added_tokens(src / "tokenizer_2"), "added_tokens.json"))
    if "text_encoder" in inputs:
        _check_qwen_tokenizer(src / "tokenizer")
    return files


def _byt5_added_tokens(folder: Path) -> bytes:
    """ByT5's added tokens as added_tokens.json ({token: id}), which the converted folder always holds (the
    source may list them in tokenizer_config.json only)."""
    from mlx_video.text_encoders.byt5 import BASE_VOCAB, ByT5Tokenizer

    tokenizer = ByT5Tokenizer.from_folder(folder)
    return json.dumps({t: i for t, i in tokenizer.ids.items() if i >= BASE_VOCAB}).encode()


def _check_qwen_tokenizer(folder: Path) -> None:
    from mlx_video.text_encoders.qwen25vl import CROP_START, qwen_tokenizer, template_crop_start

    if not (folder / "tokenizer.json").is_file():
        raise MlxVideoError(f"{folder} has no tokenizer.json (the Qwen2.5-VL tokenizer the text encoder needs)")
    crop = template_crop_start(qwen_tokenizer(folder))
    if crop != CROP_START:
        raise MlxVideoError(f"{folder / 'tokenizer.json'} splits the prompt template's system turn into {crop} "
                            f"tokens, not {CROP_START}: it is not the Qwen2.5-VL tokenizer HunyuanVideo 1.5 uses")


def _encoder_plans(inputs: dict, cfg) -> list[ComponentPlan]:
    builders = {"text_encoder": _qwen_plan, "text_encoder_2": _byt5_plan, "image_encoder": _siglip_plan,
                "vae": _vae_plan}
    return [builders[name](inputs[name], cfg) for name in ENCODERS if name in inputs]


def _qwen_plan(inp, cfg) -> ComponentPlan:
    from mlx_video.convert.rules import DroppingKeyMap
    from mlx_video.text_encoders.qwen25vl import TRANSFORMERS_QWEN25VL_TEXT, Qwen25VLTextEncoder

    config = dict(inp.config_json or {})
    with config_errors(inp, ValueError, KeyError, TypeError):
        encoder = Qwen25VLTextEncoder(config)
    if encoder.args.hidden_size != cfg.text_dim:
        raise MlxVideoError(f"{inp.origin} gives {encoder.args.hidden_size}-wide states; the transformer takes "
                            f"{cfg.text_dim}")
    keymap = DroppingKeyMap(TRANSFORMERS_QWEN25VL_TEXT, encoder.is_unused)
    return ComponentPlan("text_encoder", ComponentSource(open_tensors(inp.path, inp.origin), inp.origin), keymap,
                         config, encoder, origin=inp.origin)


def _byt5_plan(inp, cfg) -> ComponentPlan:
    from mlx_video.convert.rules import KeyMap
    from mlx_video.text_encoders.byt5 import BYT5_KEYS
    from mlx_video.text_encoders.t5 import T5Config, T5Encoder

    source = ComponentSource(open_tensors(inp.path, inp.origin), inp.origin)
    keys = set(source.keys())
    embeddings = sorted(k for k in keys if k == "shared.weight" or k.endswith("embed_tokens.weight"))
    if not embeddings:
        raise MlxVideoError(f"{inp.origin} has no token embedding (shared.weight): is it the ByT5 encoder?")
    embedding = embeddings[-1]  # shared.weight when a T5 model stores it (and the encoder's tied copy) too
    with config_errors(inp, ValueError, KeyError, TypeError):
        config = T5Config.from_transformers(inp.config_json or {})
        config = T5Config.from_dict({**config.to_dict(), "vocab_size": source.shape(embedding)[0]})
    if config.dim != cfg.glyph_dim:
        raise MlxVideoError(f"{inp.origin} gives {config.dim}-wide states; the transformer's byt5_in takes {cfg.glyph_dim}")
    # the tied embedding may be stored twice (shared and encoder.embed_tokens): one is read
    ignore = [p.pattern for p in BYT5_KEYS.ignore] + ([r"encoder\.embed_tokens\.weight"] if embedding == "shared.weight" else [])
    keymap = KeyMap([rule for _, rule in BYT5_KEYS.rules], ignore, BYT5_KEYS.transforms)
    return ComponentPlan("text_encoder_2", source, keymap, config.to_dict(), T5Encoder(config), origin=inp.origin)


def _siglip_plan(inp, cfg) -> ComponentPlan:
    from mlx_video.image_encoders.siglip import SIGLIP_VISION_KEYS, SiglipVisionConfig, SiglipVisionEncoder

    with config_errors(inp, ValueError, KeyError, TypeError):
        config = SiglipVisionConfig.from_transformers(inp.config_json or {})
    if config.hidden_size != cfg.image_dim:
        raise MlxVideoError(f"{inp.origin} gives {config.hidden_size}-wide features; the transformer's vision_in "
                            f"takes {cfg.image_dim}")
    return ComponentPlan("image_encoder", ComponentSource(open_tensors(inp.path, inp.origin), inp.origin),
                         SIGLIP_VISION_KEYS, config.to_dict(), SiglipVisionEncoder(config), origin=inp.origin)


def _vae_plan(inp, cfg) -> ComponentPlan:
    from .vae import Hunyuan15VAE
    from .vae_keys import keymap_for, vae_config_from_json

    source = ComponentSource(open_tensors(inp.path, inp.origin), inp.origin)
    with config_errors(inp, ValueError, KeyError, TypeError):
        config = vae_config_from_json(inp.config_json or {})
    if config.latent_channels != cfg.out_channels:
        raise MlxVideoError(f"{inp.origin} has {config.latent_channels} latent channels; the transformer makes "
                            f"{cfg.out_channels}")
    return ComponentPlan("vae", source, keymap_for(source.keys()), config.to_dict(), Hunyuan15VAE(config), "fp32",
                         origin=inp.origin)


# --- the super-resolution models' upsampler ------------------------------------------------------------


def _upsampler_plans(src: Path, spec) -> list[ComponentPlan]:
    """A super-resolution model's latent upsampler: the official layout's `upsampler/<variant>/` (config.json
    and diffusion_pytorch_model.safetensors, the official names), kept in float32 as the official code runs it."""
    from .upsampler import UpsamplerConfig, build_upsampler, upsampler_keymap

    variant = spec.extra.get("upsampler")
    if variant is None:
        return []
    folder = src / "upsampler" / variant
    if not folder.is_dir():
        raise MlxVideoError(f"{spec.id} needs its latent upsampler, upsampler/{variant}/ of the release, which {src} "
                            "does not have")
    inp = component_input("upsampler", folder, f"{src.name}/upsampler/{variant}")
    with config_errors(inp, ValueError):
        cfg = UpsamplerConfig.from_json(inp.config_json or {})
    source = ComponentSource(open_tensors(inp.path, inp.origin), inp.origin)
    return [ComponentPlan("upsampler", source, upsampler_keymap(), cfg.to_dict(), build_upsampler(cfg), dtype="fp32",
                          origin=inp.origin)]
