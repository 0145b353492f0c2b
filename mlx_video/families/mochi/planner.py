"""Mochi 1 preview conversion: the diffusers layout (`MochiPipeline`), its components recognised and configured,
the manifest. The key tables live in `mlx_video/families/mochi/keys.py`; the machinery (sources, the plan check, shards,
quantization, resume) is shared: `mlx_video.convert.convert`.

diffusers splits the q|k|v projections our transformer keeps fused (as the official checkpoint does); they are
presented to the shared writer as one virtual tensor per fused parameter (`FusedParts` of the HunyuanVideo
planner, `fused:<our name>`); so are the VAE encoder's attention q/k/v.

On top of the folder, `--transformer` may replace the transformer with a checkpoint in the official names (the
release's `dit.safetensors`, or ComfyUI's `mochi_preview_*.safetensors` under `model.diffusion_model.`) or in
diffusers names, and `--text-encoder` the T5 encoder (transformers names, e.g. ComfyUI's `t5xxl_fp16`, or its
`t5xxl_fp8_e4m3fn_scaled` whose `scaled_fp8` marker and per-layer `scale_weight` ComponentSource folds in; both are
the state dict of comfy/text_encoders/t5.py `T5`, whose module names are transformers'); a single file takes the
configuration of the folder's component it replaces. `--vae` takes the official release's VAE, which comes in two
halves: `decoder.safetensors` (the encoder, `encoder.safetensors`, is then read from beside it) or the folder
holding both; our VAE module holds both halves (`OfficialVAE` presents them as one source). `--vae` also takes
ComfyUI's `mochi_vae.safetensors` (`comfyui_vae_source`): the official halves' names under `decoder.` /
`encoder.`; a file with the decoder only is completed by the official `encoder.safetensors` beside it.
Not read yet: the official folder as a whole (without a diffusers folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from mlx_video.errors import MlxVideoError
from mlx_video.model_folder import MANIFEST

from mlx_video.convert.convert import (
    ComponentPlan,
    ConversionPlan,
    check_component_names,
    check_diffusers_folder,
    config_errors,
    diffusers_component_inputs,
    diffusers_pipeline_class,
    finish_plan,
    model_manifest,
    replace_components,
    tokenizer_files,
    with_overrides,
)
from mlx_video.convert.formats import ComponentSource, PrefixView, TensorFile, classify, open_tensors
from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.convert.formats import FusedParts, fused_keymap

MODEL_ID = "mochi-1-preview"
COMPONENTS = ("transformer", "text_encoder", "vae")
# What `mlxvid download` fetches from genmo/mochi-1-preview: its diffusers layout in the default (float32)
# files; the bf16 variant files (`*.bf16*`) and the official release files at the top level are left out.
DOWNLOAD_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*",
                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
                     "transformer/diffusion_pytorch_model-*.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                     "text_encoder/model-*.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
OVERRIDES = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae"}
OFFICIAL_VAE_FILES = {"decoder": "decoder.safetensors", "encoder": "encoder.safetensors"}
# The block linears --quantize stores in low precision (the same pattern as the cost model's).
LOW_PRECISION_TRANSFORMER = re.compile(
    r"blocks\.\d+\.(attn\.(qkv_x|qkv_y|proj_x|proj_y)|mlp_[xy]\.w[12]|mod_[xy])\.weight")
# What the official code keeps in float32 whatever the rest is stored in: the learned RoPE frequencies and the
# q/k RMSNorm gains (the model computes both in float32 and takes them in the dtype they are stored in).
KEEP_FP32_TRANSFORMER = re.compile(r"pos_frequencies|blocks\.\d+\.attn\.norm_[qk]_[xy]\.weight")

# (family, kind, naming, description, required keys) for `formats.classify`; a key written "!key" must be absent.
# T5 v1.1 keeps one relative-position table (in block 0); UMT5 (Wan's) one per block, which block 1's tells apart.
SIGNATURES = [
    ("mochi", "transformer", "diffusers", "a Mochi transformer (diffusers names)",
     ("patch_embed.proj.weight", "time_embed.pooler.to_kv.weight", "transformer_blocks.0.attn1.add_q_proj.weight",
      "pos_frequencies")),
    ("mochi", "transformer", "official", "a Mochi transformer (official / ComfyUI names)",
     ("x_embedder.proj.weight", "t5_y_embedder.to_kv.weight", "blocks.0.mod_x.weight", "pos_frequencies")),
    ("mochi", "vae", "diffusers", "a Mochi VAE",
     ("encoder.proj_in.weight", "decoder.conv_in.weight", "decoder.block_in.resnets.0.conv1.conv.weight")),
    ("mochi", "vae_decoder", "official", "the decoder half of the official Mochi VAE (decoder.safetensors)",
     ("blocks.0.0.weight", "blocks.0.1.stack.2.weight", "blocks.1.proj.weight", "output_proj.weight")),
    # ComfyUI's mochi_vae.safetensors: the state dict of comfy/ldm/genmo/vae/model.py `VideoVAE`, whose `decoder` /
    # `encoder` keep genmo's module names (comfyanonymous/ComfyUI comfy/sd.py detects it by `decoder.blocks.2.blocks.3.stack.5.weight`
    # or `encoder.layers.4.layers.1.attn_block.attn.qkv.weight`, and prefixes a bare official half with `decoder.` /
    # `encoder.`). The ComfyUI VideoVAE of late 2024 had no encoder (`self.encoder = None`), so the repackaged file
    # probably holds the decoder only (inferred, not read from the file).
    ("mochi", "vae", "comfyui", "a Mochi VAE (ComfyUI names: the official halves under decoder. / encoder.)",
     ("decoder.blocks.0.0.weight", "decoder.blocks.0.1.stack.2.weight", "decoder.blocks.1.proj.weight",
      "decoder.output_proj.weight")),
    ("mochi", "vae_encoder", "official", "the encoder half of the official Mochi VAE (encoder.safetensors)",
     ("layers.0.weight", "layers.1.stack.2.weight", "output_norm.weight", "output_proj.weight")),
    ("mochi", "text_encoder", "transformers",
     "a T5 v1.1 encoder (transformers names, one shared relative-position table, e.g. t5xxl), not UMT5",
     ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight",
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.block.1.layer.0.SelfAttention.q.weight",
      "!encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")),
]

# Checkpoints of the family this planner does not convert (or not under these names): (description, patterns).
LOOKALIKES = [
    ("a Mochi transformer", (r"t5_y_embedder\..*", r"blocks\.\d+\.mod_x\..*")),
]


def claims(src, components: dict) -> bool:
    """A diffusers folder whose pipeline is a Mochi one."""
    if src is None:
        return False
    return (diffusers_pipeline_class(src) or "").startswith("Mochi")


class OfficialVAE(TensorFile):
    """The official release's two VAE files as one source: each half's keys under `decoder.` / `encoder.`."""

    def __init__(self, halves: dict[str, TensorFile]):
        self.halves = halves
        self.paths = [p for t in halves.values() for p in t.paths]
        self.metadata = {}
        self._shapes, self._codes = {}, {}
        for prefix, tensors in halves.items():
            for key in tensors.keys():
                self._shapes[f"{prefix}.{key}"] = tensors.shape(key)
                self._codes[f"{prefix}.{key}"] = tensors.code(key)

    def read(self, key, start=None, stop=None):
        prefix, _, inner = key.partition(".")
        return self.halves[prefix].read(inner, start, stop)


def official_vae_keymap() -> KeyMap:
    """`mlx_video/families/mochi/keys.py`'s maps of the two official halves, each under its prefix."""
    from mlx_video.families.mochi.keys import MOCHI_TRANSFORMS, OFFICIAL_VAE_DECODER, OFFICIAL_VAE_ENCODER

    rules = [Rule(rf"{prefix}\.{rule.source}", rule.target, rule.transform)
             for prefix, keymap in (("decoder", OFFICIAL_VAE_DECODER), ("encoder", OFFICIAL_VAE_ENCODER))
             for _, rule in keymap.rules]
    return KeyMap(rules, transforms=MOCHI_TRANSFORMS)


def _official_vae_halves(path: Path) -> dict[str, Path] | None:
    """The two official VAE files `--vae PATH` designates (a folder holding both, or one of them with the other
    beside it); None when PATH is not the official VAE."""
    if path.is_dir():
        found = {half: path / name for half, name in OFFICIAL_VAE_FILES.items() if (path / name).is_file()}
        if not found:
            return None
    else:
        kind = classify(ComponentSource(open_tensors(path, path.name), path.name).keys(), "mochi")
        if kind.family != "mochi" or kind.kind not in ("vae_decoder", "vae_encoder"):
            return None
        given = kind.kind.removeprefix("vae_")
        other = "encoder" if given == "decoder" else "decoder"
        found = {given: path, other: path.parent / OFFICIAL_VAE_FILES[other]}
    missing = [str(p) for p in found.values() if not p.is_file()]
    missing += [str(path / OFFICIAL_VAE_FILES[h]) for h in OFFICIAL_VAE_FILES if h not in found]
    if missing:
        raise MlxVideoError(f"--vae: the official Mochi VAE comes in two files and {', '.join(missing)} is missing "
                            "(mlxvid's VAE holds the decoder and the encoder)")
    return found


def comfyui_vae_source(path: Path, what: str) -> ComponentSource | None:
    """ComfyUI's Mochi VAE file at `path` as one source in `official_vae_keymap`'s names (`decoder.<official>`,
    `encoder.<official>`), None when `path` is not that file. Without the encoder half, the official
    `encoder.safetensors` beside the file supplies it (our VAE module holds both halves)."""
    if Path(path).is_dir():
        return None
    tensors = open_tensors(path, what)
    source = ComponentSource(tensors, what)
    kind = classify(source.keys(), "mochi")
    if kind.family != "mochi" or kind.naming != "comfyui":
        return None
    if any(name.startswith("encoder.") for name in source.keys()):
        return source
    beside = Path(path).parent / OFFICIAL_VAE_FILES["encoder"]
    if not beside.is_file():
        raise MlxVideoError(f"{what}: {Path(path).name} holds only the decoder of the Mochi VAE (ComfyUI's file); mlxvid's "
                            f"VAE also holds the encoder: put the official {OFFICIAL_VAE_FILES['encoder']} beside it")
    decoder = {name[len("decoder."):]: source._raw_key[name] for name in source.keys() if name.startswith("decoder.")}
    halves = {"decoder": PrefixView(tensors, decoder, "decoder"), "encoder": open_tensors(beside, beside.name)}
    return ComponentSource(OfficialVAE(halves), what)


def _open(inp, name: str, want: str) -> tuple[ComponentSource, str]:
    tensors = open_tensors(inp.path, inp.origin)
    source = ComponentSource(tensors, inp.origin)
    kind = classify(source.keys(), "mochi")  # the names without a wrapper prefix
    if kind.kind != want or kind.family != "mochi":
        raise MlxVideoError(f"{inp.origin} should be the Mochi {name}, but it looks like {kind.description}")
    return source, kind.naming


def _config_json(inp, name: str) -> dict:
    if inp.config_json is None:
        raise MlxVideoError(f"{inp.origin}: the {name} has no config.json beside its weights")
    return inp.config_json


def plan(src, components=None, tokenizer=None, base=None, allow_unknown_keys: bool = False,
         log: Callable[[str], None] = lambda s: None) -> ConversionPlan:
    """A diffusers MochiPipeline folder (its components replaceable by option), in named steps: the source, the
    tokenizer, the transformer, the T5 encoder, the VAE, the manifest."""
    from mlx_video.registry import get_spec

    components = {k: v for k, v in (components or {}).items() if v is not None}
    src, index = _checked_source(src, components)
    spec = get_spec(base or MODEL_ID)
    inputs = diffusers_component_inputs(src, COMPONENTS)
    replace_components(inputs, components, OVERRIDES)
    # the tokenizer first (cheap, and the most likely to be missing)
    copy_files = {"tokenizer": tokenizer_files(Path(tokenizer) if tokenizer else src / "tokenizer", "tokenizer")}

    transformer, cfg = _transformer_plan(inputs["transformer"], spec, log)
    planned = [transformer, _text_encoder_plan(inputs["text_encoder"], cfg)]
    vae_cfg = None
    if "vae" in inputs:  # float32, as the reference runs it
        vae, vae_cfg = _vae_plan(inputs["vae"], "vae" in components, cfg)
        planned.append(vae)

    vae_stride = list(spec.vae_stride) if vae_cfg is None else [
        vae_cfg.temporal_compression, vae_cfg.spatial_compression, vae_cfg.spatial_compression]
    defaults = dict(spec.defaults, zero_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
    manifest = model_manifest("mochi", spec, vae_stride, vae_stride[1] * cfg.patch_size, defaults)
    conversion = finish_plan("diffusers (Mochi)", manifest, planned, copy_files, allow_unknown_keys, log)
    conversion.source_format = with_overrides(conversion.source_format, components, planned, OVERRIDES)
    return conversion


def _checked_source(src, components: dict) -> tuple[Path, dict]:
    if src is None:
        raise MlxVideoError("Mochi converts from a diffusers folder (model_index.json, transformer/, text_encoder/, "
                            "tokenizer/, vae/), optionally with --transformer or --text-encoder replacing its component")
    check_component_names(components, OVERRIDES, "Mochi")
    src = Path(src)
    if (src / MANIFEST).is_file():
        raise MlxVideoError(f"{src} is already an mlxvid model folder; nothing to convert")
    return src, check_diffusers_folder(src, "MochiPipeline", "MochiTransformer3DModel")


def _transformer_plan(inp, spec, log) -> tuple[ComponentPlan, object]:
    from mlx_video.families.mochi.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER, transformer_config_from_diffusers
    from mlx_video.families.mochi.transformer import MochiTransformer

    source, naming = _open(inp, "transformer", "transformer")
    with config_errors(inp, ValueError):
        cfg = transformer_config_from_diffusers(_config_json(inp, "transformer"))
    if naming == "diffusers":
        source = ComponentSource(FusedParts(source.tensors, DIFFUSERS_TRANSFORMER, inp.origin), inp.origin)
        keymap = fused_keymap(DIFFUSERS_TRANSFORMER)
    else:  # official names (also ComfyUI's, whose prefix ComponentSource removes): fused already
        keymap = OFFICIAL_TRANSFORMER
    if cfg != spec.transformer:
        log(f"note: the transformer's configuration differs from {spec.id}'s published one; converting it as it is")
    return ComponentPlan("transformer", source, keymap, cfg.to_dict(), MochiTransformer(cfg), origin=inp.origin,
                         low_precision=LOW_PRECISION_TRANSFORMER, keep_fp32=KEEP_FP32_TRANSFORMER), cfg


def _text_encoder_plan(inp, cfg) -> ComponentPlan:
    from mlx_video.families.mochi.keys import TRANSFORMERS_T5
    from mlx_video.text_encoders.t5 import T5Config, T5Encoder

    source, _ = _open(inp, "text encoder (T5 v1.1)", "text_encoder")
    with config_errors(inp, ValueError, KeyError):
        t5_cfg = T5Config.from_transformers(_config_json(inp, "text encoder"))
    if t5_cfg.dim != cfg.t5_dim:
        raise MlxVideoError(f"{inp.origin} gives {t5_cfg.dim}-wide states but the transformer takes {cfg.t5_dim}")
    return ComponentPlan("text_encoder", source, TRANSFORMERS_T5, t5_cfg.to_dict(), T5Encoder(t5_cfg), origin=inp.origin)


def _vae_source(inp, replaced: bool) -> tuple[ComponentSource, KeyMap]:
    """A replaced VAE may be ComfyUI's file or the official halves; the folder's is in diffusers names."""
    from mlx_video.families.mochi.keys import DIFFUSERS_VAE

    comfy = comfyui_vae_source(inp.path, inp.origin) if replaced else None
    halves = _official_vae_halves(inp.path) if replaced and comfy is None else None
    if comfy is not None:
        return comfy, official_vae_keymap()
    if halves is not None:
        source = ComponentSource(OfficialVAE({h: open_tensors(p, p.name) for h, p in halves.items()}), inp.origin)
        return source, official_vae_keymap()
    source, _ = _open(inp, "VAE", "vae")
    # the encoder's attention q/k/v are split in diffusers too
    return ComponentSource(FusedParts(source.tensors, DIFFUSERS_VAE, inp.origin), inp.origin), fused_keymap(DIFFUSERS_VAE)


def _vae_plan(inp, replaced: bool, cfg) -> tuple[ComponentPlan, object]:
    from mlx_video.families.mochi.config import MochiVAEConfig
    from mlx_video.families.mochi.keys import vae_config_from_diffusers
    from mlx_video.families.mochi.vae import MochiVAE

    source, vae_keymap = _vae_source(inp, replaced)
    with config_errors(inp, ValueError):  # a single file without a folder's config.json: the published VAE
        vae_cfg = vae_config_from_diffusers(inp.config_json) if inp.config_json is not None else MochiVAEConfig()
    if vae_cfg.latent_channels != cfg.in_channels:
        raise MlxVideoError(f"{inp.origin} has {vae_cfg.latent_channels} latent channels; the transformer takes {cfg.in_channels}")
    return ComponentPlan("vae", source, vae_keymap, vae_cfg.to_dict(), MochiVAE(vae_cfg), "fp32", origin=inp.origin), vae_cfg
