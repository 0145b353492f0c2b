"""HunyuanVideo conversion: the diffusers layout (`HunyuanVideoPipeline`), its components recognised and
configured, the manifest. The key tables live in `mlx_video/families/hunyuan/keys.py`; the machinery (sources, the plan
check, shards, quantization, resume) is shared: `mlx_video.convert.convert`.

diffusers splits the projections our transformer keeps fused (q|k|v per stream, q|k|v|mlp in `linear1`). The
shared writer maps keys one to one, so the split tensors are presented to it as one virtual tensor per fused
parameter (`FusedParts`: reads of a row range read the pieces' rows), named `fused:<our name>`. Nothing is
concatenated in memory beyond the rows being written.

On top of the folder, `--transformer` may replace the transformer with a checkpoint in the official names (the
release's `mp_rank_00_model_states.pt`, a state dict under `module`; ComfyUI's single file, under its
`model.diffusion_model.` prefix) or diffusers names, `--text-encoder` the Llama, `--text-encoder-2` CLIP-L and `--vae`
the VAE; a single file takes the configuration of the folder's component it replaces. ComfyUI's single files are
read through these options: `llava_llama3_fp16` / `llava_llama3_fp8_scaled` (the Llama under `model.`, the fp8 one
with ComfyUI's `scaled_fp8` marker and per-layer `scale_weight`, folded in by ComponentSource), `clip_l` (CLIP-L
under `text_model.`) and `hunyuan_video_vae_bf16` (ComfyUI's own VAE names, `mlx_video/families/hunyuan/keys.py comfyui_vae_keymap`).

HunyuanVideo-I2V's diffusers folder (`HunyuanVideoImageToVideoPipeline`) and release layout (RELEASE_I2V_MODEL) add
`image_encoder`: the LLaVA text encoder's CLIP vision tower and projector (`keys.LLAVA_IMAGE`), from the same file.

The official release layout (`ckpts/` as the release's README builds it, see RELEASE_MODEL) converts as a whole:
the transformer's dimensions are read from its shapes (the file has no config), the fp8 variant is read with
its scale map (`Fp8ScaleMap`), the VAE with the release's config.json, the Llama folder and the whole CLIPModel
folder (its vision tower ignored) with the tokenizers beside them.

`--quantize` follows the family's rule (LOW_PRECISION_TRANSFORMER, LOW_PRECISION_LLAMA) set on the plans.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mlx_video.errors import MlxVideoError
from mlx_video.model_folder import MANIFEST

from mlx_video.convert.convert import (
    ComponentPlan,
    ConversionPlan,
    check_component_names,
    check_diffusers_folder,
    component_input,
    config_errors,
    diffusers_component_inputs,
    diffusers_pipeline_class,
    finish_plan,
    model_manifest,
    read_json,
    replace_components,
    with_overrides,
)
from mlx_video.convert.formats import ComponentSource, FusedParts, TensorFile, classify, fused_keymap, open_tensors
from mlx_video.convert.formats import FUSED  # noqa: F401  (re-exported for callers of this module)
from mlx_video.convert.rules import DroppingKeyMap

MODEL_ID = "hunyuanvideo-t2v"
I2V_MODEL_ID = "hunyuanvideo-i2v"  # diffusers HunyuanVideoImageToVideoPipeline with the token-replace transformer
I2V_PIPELINE = "HunyuanVideoImageToVideoPipeline"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
# What `mlxvid download` fetches from the diffusers-layout repository (hunyuanvideo-community/HunyuanVideo).
DOWNLOAD_PATTERNS = ["model_index.json", "transformer/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                     "tokenizer_2/*", "vae/*", "scheduler/*"]
# HunyuanVideo-I2V's folder also has the LLaVA image processor's settings.
EXTRA_DOWNLOAD_PATTERNS = {I2V_MODEL_ID: ["image_processor/*"]}
# The official release (tencent/HunyuanVideo, downloaded into `ckpts/`): hunyuan-video-t2v-720p/transformers/ holds
# the transformer (a torch.save archive, the state dict under "module"; or the fp8 variant with its per-layer scale
# map), hunyuan-video-t2v-720p/vae/ the VAE (config.json + pytorch_model.pt); text_encoder/ is the LLaVA language
# model as the release's preprocessing script saves it (a transformers Llama folder with its tokenizer), and
# text_encoder_2/ is openai/clip-vit-large-patch14 as downloaded (CLIPModel: text and vision towers, tokenizer).
RELEASE_MODEL = "hunyuan-video-t2v-720p"
# tencent/HunyuanVideo-I2V's ckpts/ (its README): hunyuan-video-i2v-720p/transformers/ and vae/ as for T2V,
# text_encoder_i2v/ = xtuner/llava-llama-3-8b-v1_1-transformers as downloaded (the whole LLaVA with its tokenizer and
# CLIP image processor), text_encoder_2/ = openai/clip-vit-large-patch14.
RELEASE_I2V_MODEL = "hunyuan-video-i2v-720p"
RELEASE_I2V_TEXT_ENCODER = "text_encoder_i2v"
RELEASE_TRANSFORMER = "mp_rank_00_model_states.pt"
RELEASE_TRANSFORMER_FP8 = "mp_rank_00_model_states_fp8.pt"
# Components a single file or folder may replace on top of the diffusers folder, and the option that gives it.
OVERRIDES = {"transformer": "--transformer", "text_encoder": "--text-encoder", "text_encoder_2": "--text-encoder-2",
             "vae": "--vae"}

# What `--quantize` stores in low precision (the shared rule, convert/quantize.py, in our names): every linear
# layer's weight inside the repeated blocks (double-stream, single-stream, token-refiner), the modulation
# linears included as in the official fp8 release (a quarter of the transformer's parameters); and the Llama
# encoder's attention and feed-forward layers. The embedders, the final layer, CLIP and the VAE stay in --dtype.
LOW_PRECISION_TRANSFORMER = re.compile(
    r"double_blocks\.\d+\.(img|txt)\.(mod|attn_qkv|attn_proj|mlp\.fc[12])\.weight"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation)\.weight"
    r"|txt_in\.blocks\.\d+\.(self_attn_qkv|self_attn_proj|mlp\.fc[12]|adaLN_modulation)\.weight"
)
LOW_PRECISION_LLAMA = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")

# (family, kind, naming, description, required keys) for `formats.classify`. CLIP is a text encoder by kind
# (its naming, "clip", tells it apart from the Llama one).
SIGNATURES = [
    ("hunyuan", "transformer", "diffusers", "a HunyuanVideo transformer (diffusers names)",
     ("x_embedder.proj.weight", "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight",
      "transformer_blocks.0.attn.add_q_proj.weight")),
    ("hunyuan", "transformer", "official", "a HunyuanVideo transformer (official names)",
     ("img_in.proj.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight", "double_blocks.0.img_attn_qkv.weight")),
    ("hunyuan", "vae", "diffusers", "a HunyuanVideo VAE",
     ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "post_quant_conv.weight",
      "encoder.mid_block.attentions.0.to_q.weight")),
    # ComfyUI's HunyuanVideo VAE: its generic AutoencoderKL (conv3d) names, see mlx_video/families/hunyuan/keys.py comfyui_vae_keymap
    ("hunyuan", "vae", "comfyui", "a HunyuanVideo VAE (ComfyUI names)",
     ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "post_quant_conv.weight",
      "encoder.mid.attn_1.q.weight")),
    # ComfyUI's llava_llama3 files are the state dict of comfy/text_encoders/llama.py `Llama2` (`model.` + the
    # transformers names; ComponentSource removes the `model.` prefix) and its clip_l file that of
    # comfy/clip_model.py `CLIPTextModel` (`text_model.` + the transformers names, `text_projection.weight`).
    ("hunyuan", "text_encoder", "transformers", "a Llama language model (transformers names)",
     ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight")),
    ("hunyuan", "text_encoder", "transformers", "a Llama language model (transformers names, LlamaForCausalLM)",
     ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight")),
    ("hunyuan", "text_encoder", "transformers", "a Llama language model (transformers names, LLaVA)",
     ("language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
      "language_model.model.layers.0.mlp.gate_proj.weight")),
    ("hunyuan", "text_encoder", "transformers", "a Llama language model (transformers names, LLaVA)",
     ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
      "model.language_model.layers.0.mlp.gate_proj.weight")),
    ("hunyuan", "text_encoder", "clip", "a CLIP text encoder (transformers names)",
     ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight",
      "text_model.final_layer_norm.weight")),
    ("hunyuan", "text_encoder", "clip", "a CLIP text encoder (transformers names)",
     ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight", "final_layer_norm.weight")),
]

# Checkpoints of the family this planner does not convert (or not under these names): (description, patterns).
LOOKALIKES = [
    ("a HunyuanVideo transformer", (r"txt_in\.individual_token_refiner\..*", r"double_blocks\.\d+\.img_attn_qkv\..*")),
    ("a HunyuanVideo transformer (diffusers names)", (r"context_embedder\.token_refiner\..*",)),
]


def release_transformer(folder: Path, model: str = RELEASE_MODEL) -> Path | None:
    """The transformer file of the official release layout under `folder` (`model`: the T2V or the I2V release's
    folder): the full-precision `mp_rank_00_model_states.pt`, else the fp8 one (read with its `_map.pt` scale map);
    None if neither is there."""
    for name in (RELEASE_TRANSFORMER, RELEASE_TRANSFORMER_FP8):
        if (folder / model / "transformers" / name).is_file():
            return folder / model / "transformers" / name
    return None


def claims(src, components: dict) -> bool:
    """A diffusers folder whose pipeline is a HunyuanVideo one, or the official release layout (`ckpts/`)."""
    if src is None:
        return False
    if Path(src).is_dir() and (release_transformer(Path(src)) is not None or (Path(src) / RELEASE_I2V_MODEL).is_dir()):
        return True  # an I2V release without its transformer file is refused by name in plan
    name = diffusers_pipeline_class(src) or ""
    return name.startswith("HunyuanVideo") and not name.startswith("HunyuanVideo15")  # 1.5 is its own family


# ---------------------------------------------------------------------------------------------------
# fused views and key maps


class Fp8ScaleMap(TensorFile):
    """The official fp8 transformer (`..._fp8.pt`: the linear layers of the double- and single-stream blocks as
    float8 e4m3fn codes) with its scale map (`..._fp8_map.pt`: {module name: per-tensor scale}) shown as each
    layer's `<module>.scale_weight`, so the shared reader decodes W = codes * scale (and `--quantize fp8` keeps
    the codes and scales as they are)."""

    def __init__(self, weights: TensorFile, scales: TensorFile, what: str):
        self.inner, self.scales = weights, scales
        self.paths, self.metadata = [*weights.paths, *scales.paths], weights.metadata
        self._shapes = {k: weights.shape(k) for k in weights.keys()}
        self._codes = {k: weights.code(k) for k in weights.keys()}
        self._scale_of: dict[str, str] = {}
        for module in scales.keys():
            weight = f"{module}.weight"
            if weight not in self._shapes:
                raise MlxVideoError(f"{what}: the scale map names {module}, which the checkpoint does not have")
            if int(math.prod(scales.shape(module))) != 1:
                raise MlxVideoError(f"{what}: the scale of {module} has shape {list(scales.shape(module))}; "
                                    "the release stores one scale per layer")
            key = f"{module}.scale_weight"
            self._shapes[key], self._codes[key] = (), scales.code(module)
            self._scale_of[key] = module
        unscaled = sorted(k for k, c in self._codes.items() if c.startswith("F8_") and
                          f"{k[: -len('.weight')]}.scale_weight" not in self._shapes)
        if unscaled:
            raise MlxVideoError(f"{what}: {len(unscaled)} fp8 weights have no scale in the map (first: {unscaled[0]})")

    def read(self, key, start=None, stop=None):
        if key in self._scale_of:
            return self.scales.read(self._scale_of[key]).reshape(())
        return self.inner.read(key, start, stop)


def fp8_scale_map(path: Path) -> Path | None:
    """The scale map the release ships beside an fp8 transformer: `X_fp8.pt` -> `X_fp8_map.pt`."""
    path = Path(path)
    candidate = path.with_name(path.stem + "_map" + path.suffix)
    return candidate if path.is_file() and candidate.is_file() else None


def official_transformer_config(keys, shape, published):
    """Our transformer config from the shapes of a checkpoint in the official names, which carries no config: every
    width and count is read from the tensors; RoPE's split of the head (not visible in any shape) and its theta are
    the published ones when the head width is the published one, else the same proportions (for smaller
    checkpoints, e.g. tests' tiny ones)."""
    from mlx_video.families.hunyuan.config import HunyuanTransformerConfig

    from mlx_video.convert.formats import count_blocks

    hidden, in_channels, *patch = shape("img_in.proj.weight")
    head_dim = shape("double_blocks.0.img_attn_q_norm.weight")[0]
    if head_dim == published.head_dim:
        rope_axes = published.rope_axes
    else:
        t = 2 * round(head_dim * published.rope_axes[0] / published.head_dim / 2)
        rope_axes = (t, (head_dim - t) // 2, (head_dim - t) // 2)
    refiner = "txt_in.individual_token_refiner.blocks"
    return HunyuanTransformerConfig(
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        mlp_ratio=shape("double_blocks.0.img_mlp.fc1.weight")[0] / hidden,
        num_double_blocks=count_blocks(keys, r"double_blocks\.(\d+)\."),
        num_single_blocks=count_blocks(keys, r"single_blocks\.(\d+)\."),
        num_refiner_blocks=count_blocks(keys, rf"{refiner}\.(\d+)\."),
        refiner_mlp_ratio=shape(f"{refiner}.0.mlp.fc1.weight")[0] / hidden,
        rope_axes=rope_axes,
        rope_theta=published.rope_theta,
        patch_size=tuple(patch),
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0] // math.prod(patch),
        text_dim=shape("txt_in.input_embedder.weight")[1],
        pooled_dim=shape("vector_in.in_layer.weight")[1],
        freq_dim=shape("time_in.mlp.0.weight")[1],
        guidance_embed="guidance_in.mlp.0.weight" in keys,
    )


def _release_inputs(src: Path, transformer: Path, model: str = RELEASE_MODEL,
                    text_encoder: str = "text_encoder") -> dict:
    """The components of the official release layout under `src` (see RELEASE_MODEL, RELEASE_I2V_MODEL)."""
    from mlx_video.convert.convert import ComponentInput

    inputs = {"transformer": ComponentInput("transformer", transformer, str(transformer.relative_to(src)))}
    vae = src / model / "vae"
    if (vae / "pytorch_model.pt").is_file():
        inputs["vae"] = ComponentInput("vae", vae / "pytorch_model.pt", f"{model}/vae/pytorch_model.pt",
                                       read_json(vae / "config.json", "the VAE config"))
    for name, folder in (("text_encoder", text_encoder), ("text_encoder_2", "text_encoder_2")):
        if not (src / folder).is_dir():
            raise MlxVideoError(f"{src} holds the release's transformer but no {folder}/ (see the release's ckpts/README.md)")
        inputs[name] = component_input(name, src / folder, f"{src.name}/{folder}")
    return inputs


# ---------------------------------------------------------------------------------------------------
# the plan


def _open(inp, name: str, want: str, naming: str | None = None) -> tuple[ComponentSource, str]:
    what = inp.origin
    tensors = open_tensors(inp.path, what)
    scale_map = fp8_scale_map(inp.path) if want == "transformer" else None
    if want == "transformer" and scale_map is None and Path(inp.path).stem.endswith("_fp8"):
        # the release's fp8 codes are W / scale: read without the map they would be wrong by that factor
        raise MlxVideoError(f"{what} is the release's fp8 transformer, whose per-layer scales are in "
                            f"{Path(inp.path).stem}_map{Path(inp.path).suffix} beside it; that file is missing")
    if scale_map is not None:
        tensors = Fp8ScaleMap(tensors, open_tensors(scale_map, f"{what} (scale map)"), what)
    kind = classify(ComponentSource(tensors, what).keys(), "hunyuan")  # the names without a wrapper prefix
    if kind.kind != want or kind.family != "hunyuan" or (naming is not None and kind.naming != naming):
        raise MlxVideoError(f"{what} should be the HunyuanVideo {name}, but it looks like {kind.description}")
    return tensors, kind.naming


def _config_json(inp, name: str) -> dict:
    if inp.config_json is None:
        raise MlxVideoError(f"{inp.origin}: the {name} has no config.json beside its weights")
    return inp.config_json


def clip_tokenizer_json(vocab: Path, merges: Path, bos: str = "<|startoftext|>", eos: str = "<|endoftext|>") -> bytes:
    """A tokenizer.json for CLIP's byte-level BPE (vocab.json + merges.txt, as openai/clip-vit-large-patch14 and
    the HunyuanVideo repository's tokenizer_2/ ship it): NFC, whitespace runs to one space, lower case; split into
    CLIP's pieces (contractions, letter runs, single digits, other symbol runs; the specials kept whole), bytes
    mapped to unicode; BPE with `</w>` marking a word's end; <|startoftext|> ... <|endoftext|> around the ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_map, merge_list = models.BPE.read_file(str(vocab), str(merges))
    for special in (bos, eos):
        if special not in vocab_map:
            raise MlxVideoError(f"{vocab} lacks CLIP's {special}")
    tok = Tokenizer(models.BPE(vocab_map, merge_list, continuing_subword_prefix="", end_of_word_suffix="</w>",
                               fuse_unk=False, unk_token=eos))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    pieces = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pieces), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.RobertaProcessing((eos, vocab_map[eos]), (bos, vocab_map[bos]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok.to_str().encode("utf-8")


def _tokenizer(folder: Path, what: str) -> list[tuple[Path | bytes, str]]:
    if (folder / "tokenizer.json").is_file():
        files = [(folder / "tokenizer.json", "tokenizer.json")]
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        files = [(clip_tokenizer_json(folder / "vocab.json", folder / "merges.txt"), "tokenizer.json")]
    else:
        raise MlxVideoError(f"{what}: {folder} has no tokenizer.json (nor vocab.json and merges.txt)")
    if (folder / "tokenizer_config.json").is_file():
        files.append((folder / "tokenizer_config.json", "tokenizer_config.json"))
    return files


def _diffusers_inputs(src: Path) -> dict:
    """The components of a diffusers HunyuanVideoPipeline (or HunyuanVideoImageToVideoPipeline) folder (vae/
    optional for T2V)."""
    if diffusers_pipeline_class(src) == I2V_PIPELINE:
        check_diffusers_folder(src, I2V_PIPELINE, "HunyuanVideoTransformer3DModel")
        return diffusers_component_inputs(src, COMPONENTS, optional=())
    check_diffusers_folder(src, "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel")
    return diffusers_component_inputs(src, COMPONENTS)


def plan(src, components=None, tokenizer=None, base=None, allow_unknown_keys: bool = False,
         log: Callable[[str], None] = lambda s: None) -> ConversionPlan:
    """A diffusers HunyuanVideoPipeline folder or the official release layout (components replaceable by option),
    in named steps: the source, the tokenizers, the transformer, the two text encoders, the VAE, the manifest."""
    from mlx_video.registry import get_spec

    components = {k: v for k, v in (components or {}).items() if v is not None}
    src = _checked_source(src, components, tokenizer)
    inputs, (llama_tok_dir, clip_tok_dir), source_format, processor = _source_inputs(src)
    image_to_video = processor is not None
    spec = get_spec(base or (I2V_MODEL_ID if image_to_video else MODEL_ID))
    replace_components(inputs, components, OVERRIDES)
    # tokenizers first (cheap, and the most likely to be wrong): Llama's and CLIP's
    llama_tokenizer = _llava_tokenizer(llama_tok_dir, inputs["text_encoder"]) if image_to_video \
        else _llama_tokenizer(llama_tok_dir)
    copy_files = {"tokenizer": llama_tokenizer, "tokenizer_2": _tokenizer(clip_tok_dir, clip_tok_dir.name)}

    transformer, cfg = _transformer_plan(inputs["transformer"], spec, log, image_to_video)
    if (cfg.image_condition is not None) != image_to_video or cfg.image_condition not in (None, "token_replace"):
        raise MlxVideoError(_condition_refusal(src, cfg.image_condition, image_to_video))
    planned = [transformer, _llama_plan(inputs["text_encoder"], cfg), _clip_plan(inputs["text_encoder_2"], cfg)]
    if image_to_video:
        planned.append(_llava_image_plan(inputs["text_encoder"], processor, cfg))
    vae_cfg = None
    if "vae" in inputs:  # float32, as the reference runs it
        vae, vae_cfg = _vae_plan(inputs["vae"], cfg)
        planned.append(vae)

    vae_stride = [4, 8, 8] if vae_cfg is None else [vae_cfg.temporal_compression, vae_cfg.spatial_compression,
                                                      vae_cfg.spatial_compression]
    manifest = model_manifest("hunyuan", spec, vae_stride, vae_stride[1] * cfg.patch_size[1], dict(spec.defaults))
    conversion = finish_plan(source_format, manifest, planned, copy_files, allow_unknown_keys, log)
    conversion.source_format = with_overrides(source_format, components, planned, OVERRIDES)
    return conversion


def _checked_source(src, components: dict, tokenizer) -> Path:
    if src is None or tokenizer is not None:
        raise MlxVideoError("HunyuanVideo converts from a diffusers folder (model_index.json, transformer/, "
                            "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/) or the official release "
                            f"layout ({RELEASE_MODEL}/transformers/, {RELEASE_MODEL}/vae/, text_encoder/, "
                            "text_encoder_2/), optionally with --transformer, --text-encoder, --text-encoder-2 or --vae "
                            "replacing its component")
    check_component_names(components, OVERRIDES, "HunyuanVideo")
    src = Path(src)
    if (src / RELEASE_I2V_MODEL).is_dir() and release_transformer(src, RELEASE_I2V_MODEL) is None:
        raise MlxVideoError(f"{src} looks like HunyuanVideo-I2V's official release layout but has no "
                            f"{RELEASE_I2V_MODEL}/transformers/{RELEASE_TRANSFORMER}")
    if (src / MANIFEST).is_file():
        raise MlxVideoError(f"{src} is already an mlxvid model folder; nothing to convert")
    return src


def _source_inputs(src: Path) -> tuple[dict, tuple[Path, Path], str, Path | None]:
    """(inputs, the Llama and CLIP tokenizer folders, the source format, the LLaVA image processor's settings file
    of an I2V source or None) of a release or diffusers folder."""
    if src.is_dir() and release_transformer(src) is not None:  # the release keeps each tokenizer beside its encoder
        return (_release_inputs(src, release_transformer(src)), (src / "text_encoder", src / "text_encoder_2"),
                "the official release layout (HunyuanVideo)", None)
    if src.is_dir() and release_transformer(src, RELEASE_I2V_MODEL) is not None:
        llava = src / RELEASE_I2V_TEXT_ENCODER
        inputs = _release_inputs(src, release_transformer(src, RELEASE_I2V_MODEL), RELEASE_I2V_MODEL, RELEASE_I2V_TEXT_ENCODER)
        return (inputs, (llava, src / "text_encoder_2"), "the official release layout (HunyuanVideo-I2V)",
                llava / "preprocessor_config.json")
    image_to_video = diffusers_pipeline_class(src) == I2V_PIPELINE
    return (_diffusers_inputs(src), (src / "tokenizer", src / "tokenizer_2"), "diffusers (HunyuanVideo)",
            src / "image_processor" / "preprocessor_config.json" if image_to_video else None)


def _condition_refusal(src: Path, condition: str | None, image_to_video: bool) -> str:
    if condition == "latent_concat":
        return (f"{src}: the transformer concatenates the image's latents (image_condition_type latent_concat, "
                "HunyuanVideo-I2V-33ch); mlxvid runs the token-replace release (hunyuanvideo-community/HunyuanVideo-I2V)")
    if image_to_video:
        return f"{src} holds an image-to-video pipeline whose transformer has no image_condition_type"
    return f"{src} holds a text-to-video pipeline whose transformer has image_condition_type {condition!r}"


def _llava_tokenizer(folder: Path, text_encoder) -> list[tuple[Path | bytes, str]]:
    """The LLaVA tokenizer: the image template must split as the published one (103 tokens before the prompt)
    and `<image>` must be the text encoder's image token."""
    from mlx_video.text_encoders.llama import JsonTokenizer
    from mlx_video.text_encoders.llava import I2V_TEMPLATE_CROP_START, IMAGE_TOKEN, template_crop_start

    if not (folder / "tokenizer.json").is_file():
        raise MlxVideoError(f"{folder} has no tokenizer.json (the LLaVA-Llama-3 tokenizer)")
    files = _tokenizer(folder, folder.name)
    tokenizer = JsonTokenizer(folder, pad_token="<|end_of_text|>")
    crop = template_crop_start(tokenizer)
    if crop != I2V_TEMPLATE_CROP_START:
        raise MlxVideoError(f"{folder / 'tokenizer.json'} splits the image prompt template into {crop} tokens before "
                            f"the prompt, not {I2V_TEMPLATE_CROP_START}: it is not LLaVA-Llama-3's tokenizer")
    config = text_encoder.config_json or {}
    expected = config.get("image_token_index", config.get("image_token_id"))
    found = tokenizer.tokenizer.token_to_id(IMAGE_TOKEN)
    if found is None or found != expected:
        raise MlxVideoError(f"{folder / 'tokenizer.json'} gives {IMAGE_TOKEN} the id {found}, but the text encoder's "
                            f"image token is {expected}")
    return files


def _llava_image_plan(inp, processor: Path, cfg) -> ComponentPlan:
    """LLaVA's CLIP vision tower and projector, from the text encoder's own weights, as `image_encoder`."""
    from mlx_video.families.hunyuan.keys import LLAVA_IMAGE
    from mlx_video.text_encoders.llava import LlavaImageConfig, LlavaImageEncoder

    if not processor.is_file():
        raise MlxVideoError(f"{processor.parent} has no {processor.name} (LLaVA's CLIP image processor settings)")
    with config_errors(inp, ValueError, KeyError, TypeError):
        image_cfg = LlavaImageConfig.from_transformers(_config_json(inp, "text encoder"),
                                                       read_json(processor, "the CLIP image processor"))
    if image_cfg.text_dim != cfg.text_dim:
        raise MlxVideoError(f"{inp.origin} projects the image to {image_cfg.text_dim}, the transformer takes {cfg.text_dim}")
    tensors = open_tensors(inp.path, inp.origin)
    source = ComponentSource(FusedParts(tensors, LLAVA_IMAGE, inp.origin), inp.origin)
    return ComponentPlan("image_encoder", source, fused_keymap(LLAVA_IMAGE), image_cfg.to_dict(),
                         LlavaImageEncoder(image_cfg), origin=f"{inp.origin} (vision tower and projector)")


def _llama_tokenizer(folder: Path) -> list[tuple[Path | bytes, str]]:
    from mlx_video.text_encoders.llama import VIDEO_TEMPLATE_CROP_START, JsonTokenizer, template_crop_start

    if not (folder / "tokenizer.json").is_file():
        raise MlxVideoError(f"{folder} has no tokenizer.json (the Llama 3 tokenizer)")
    files = _tokenizer(folder, folder.name)
    crop = template_crop_start(JsonTokenizer(folder, pad_token="<|end_of_text|>"))
    if crop != VIDEO_TEMPLATE_CROP_START:
        raise MlxVideoError(
            f"{folder / 'tokenizer.json'} splits the prompt template into {crop} tokens before the prompt, "
            f"not {VIDEO_TEMPLATE_CROP_START}: it is not the Llama 3 tokenizer HunyuanVideo was trained with (a "
            "tokenizer.json re-saved by transformers 5 can be rebuilt this way)"
        )
    return files


def _transformer_plan(inp, spec, log, image_to_video: bool = False) -> tuple[ComponentPlan, object]:
    from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER, transformer_config_from_diffusers
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    tensors, naming = _open(inp, "transformer", "transformer")
    with config_errors(inp, ValueError):
        if inp.config_json is None and naming == "official":  # the release's file: its shapes say the dimensions
            shapes = ComponentSource(tensors, inp.origin)
            cfg = official_transformer_config(shapes.keys(), shapes.shape, spec.transformer)
            if image_to_video:  # the I2V release's file: 16 channels in replace the first frame's tokens, 33 concat
                condition = "token_replace" if cfg.in_channels == cfg.out_channels else "latent_concat"
                cfg = replace(cfg, image_condition=condition)
        else:
            cfg = transformer_config_from_diffusers(_config_json(inp, "transformer"))
    if naming == "diffusers":
        source = ComponentSource(FusedParts(tensors, DIFFUSERS_TRANSFORMER, inp.origin), inp.origin)
        keymap = fused_keymap(DIFFUSERS_TRANSFORMER)
    else:  # the official release's names (also ComfyUI's, whose prefix ComponentSource removes): fused already
        source, keymap = ComponentSource(tensors, inp.origin), OFFICIAL_TRANSFORMER
    plan = ComponentPlan("transformer", source, keymap, cfg.to_dict(), HunyuanTransformer(cfg), origin=inp.origin,
                         low_precision=LOW_PRECISION_TRANSFORMER)
    if cfg != spec.transformer:
        log(f"note: the transformer's configuration differs from {spec.id}'s published one; converting it as it is")
    return plan, cfg


def _llama_plan(inp, cfg) -> ComponentPlan:
    """The Llama text encoder: the layers after the hidden state it uses (and the final norm) are left out."""
    from mlx_video.families.hunyuan.keys import TRANSFORMERS_LLAMA
    from mlx_video.text_encoders.llama import LlamaTextEncoder, llama_args

    tensors, _ = _open(inp, "text encoder (Llama)", "text_encoder", "transformers")
    llama_json = dict(_config_json(inp, "text encoder").get("text_config", inp.config_json))
    with config_errors(inp, ValueError, KeyError, TypeError):
        llama = LlamaTextEncoder(llama_args(llama_json))
    if llama.args.hidden_size != cfg.text_dim:
        raise MlxVideoError(f"{inp.origin} gives {llama.args.hidden_size}-wide states but the transformer takes {cfg.text_dim}")
    keymap = DroppingKeyMap(TRANSFORMERS_LLAMA, llama.is_unused)
    return ComponentPlan("text_encoder", ComponentSource(tensors, inp.origin), keymap, llama_json, llama,
                         origin=inp.origin, low_precision=LOW_PRECISION_LLAMA)


def _clip_plan(inp, cfg) -> ComponentPlan:
    from mlx_video.families.hunyuan.keys import TRANSFORMERS_CLIP
    from mlx_video.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder

    tensors, _ = _open(inp, "text encoder 2 (CLIP)", "text_encoder", "clip")
    with config_errors(inp, ValueError):
        clip_cfg = CLIPTextConfig.from_transformers(_config_json(inp, "text encoder 2"))
    if clip_cfg.hidden_size != cfg.pooled_dim:
        raise MlxVideoError(f"{inp.origin} pools {clip_cfg.hidden_size}-wide vectors but the transformer takes {cfg.pooled_dim}")
    return ComponentPlan("text_encoder_2", ComponentSource(tensors, inp.origin), TRANSFORMERS_CLIP,
                         clip_cfg.to_dict(), CLIPTextEncoder(clip_cfg), origin=inp.origin)


def _vae_plan(inp, cfg) -> tuple[ComponentPlan, object]:
    from mlx_video.families.hunyuan.keys import DIFFUSERS_VAE, comfyui_vae_keymap, vae_config_from_diffusers
    from mlx_video.families.hunyuan.vae import HunyuanVAE

    tensors, vae_naming = _open(inp, "VAE", "vae")
    with config_errors(inp, ValueError):
        vae_cfg = vae_config_from_diffusers(_config_json(inp, "VAE"))
    if vae_cfg.latent_channels != cfg.in_channels:
        raise MlxVideoError(f"{inp.origin} has {vae_cfg.latent_channels} latent channels; the transformer takes {cfg.in_channels}")
    vae_keymap = DIFFUSERS_VAE if vae_naming == "diffusers" else comfyui_vae_keymap(len(vae_cfg.block_out_channels))
    return ComponentPlan("vae", ComponentSource(tensors, inp.origin), vae_keymap, vae_cfg.to_dict(),
                         HunyuanVAE(vae_cfg), "fp32", origin=inp.origin), vae_cfg
