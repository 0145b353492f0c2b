"""ComfyUI's single files for HunyuanVideo and Mochi, read through the component options on top of a diffusers folder.

Tiny: files written in ComfyUI's names from the tiny references (HunyuanVideo: `llava_llama3_fp16` /
`llava_llama3_fp8_scaled`, `clip_l`, `hunyuan_video_vae_bf16`, the bf16 / fp8-scaled transformer; Mochi:
`mochi_preview_bf16` / `mochi_preview_fp8_scaled`, `t5xxl_fp16` / `t5xxl_fp8_e4m3fn_scaled`, `mochi_vae` with both
halves or the decoder only) convert to the diffusers route's tensors: bit for bit after the file's rounding (fp16 /
bf16, or fp8 codes times their per-tensor scale, computed here with torch).

Full size: header-only files of the real names and shapes (references on torch's meta device) plan with nothing
missing, unknown or misshapen. The ComfyUI names written here follow ComfyUI's modules (see the key tables'
comments in mlx_video/families/hunyuan/keys.py, mlx_video/families/hunyuan/planner.py and mlx_video/families/mochi/planner.py).
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_video.convert.convert import plan
from mlx_video.errors import MlxVideoError
from support.hunyuan import build_tiny_hunyuan_pipeline, official_state
from support.mochi import build_tiny_mochi_pipeline, official_state_dict, official_vae_state_dicts
from support.arrays import meta_shapes
from support.plans import assert_same, components, converted
from support.tensor_files import save_torch, write_description

F8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------
# ComfyUI's names, written from the references' state dicts


def comfy_hunyuan_vae_name(key: str, levels: int) -> str:
    """A diffusers HunyuanVideo VAE key in ComfyUI's AutoencoderKL (conv3d) names."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
                 key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
    key = re.sub(r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1.", key)
    return key.replace("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out.")


def comfy_hunyuan_vae(sd: dict, levels: int) -> dict:
    """Renamed, the attention's linear weights as 1x1x1 convs (as ComfyUI's module holds them)."""
    out = {}
    for key, value in sd.items():
        name = comfy_hunyuan_vae_name(key, levels)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value.reshape(*value.shape, 1, 1, 1)
        out[name] = value
    return out


def fp8_scaled(sd: dict, is_fp8, rest=torch.float16) -> dict:
    """ComfyUI's legacy scaled fp8: the `scaled_fp8` marker, fp8 codes of W / scale with `scale_weight` (max|W| / 448)
    and `scale_input`; every other tensor in `rest`."""
    out = {"scaled_fp8": torch.empty(0, dtype=F8)}
    for key, value in sd.items():
        if is_fp8(key, value):
            scale = value.float().abs().max() / 448.0
            out[key] = (value.float() / scale).to(F8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[key[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        else:
            out[key] = value.to(rest)
    return out


def cast(sd: dict, dtype) -> dict:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# what a plan converts to, and what the file's rounding makes of the diffusers route


def rounded_like(reference: dict[str, np.ndarray], comp) -> dict[str, np.ndarray]:
    """The diffusers route's tensors as the ComfyUI file stores them: fp8 weights as decode(codes) * scale (the scale
    from the whole tensor, which the transforms only permute), the rest cast to the stored dtype."""
    out = {}
    for target, (key, _, _) in comp.tensors.items():
        value = torch.from_numpy(reference[target])
        if comp.source.fp8_format(key) == "e4m3fn":
            scale = value.abs().max() / 448.0
            value = (value / scale).to(F8).float() * scale
        else:
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[comp.source.code(key)]
            value = value.to(dtype).float()
        out[target] = value.numpy()
    return out


def _block_linear(key, value) -> bool:
    return value.ndim == 2 and key.endswith(".weight")


# ---------------------------------------------------------------------------------------------------
# HunyuanVideo, tiny


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy")
    pipe = build_tiny_hunyuan_pipeline(root / "pipe")
    reference = {name: converted(c) for name, c in components(plan(root / "pipe")).items()}
    return root, pipe, reference


def test_hunyuan_comfy_files_match_the_diffusers_route(hunyuan):
    root, pipe, reference = hunyuan
    llama = {f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    clip = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in pipe.text_encoder_2.state_dict().items()}
    clip["text_projection.weight"] = torch.eye(clip["text_model.final_layer_norm.weight"].shape[0])  # ComfyUI's module has it
    levels = len(pipe.vae.config.block_out_channels)
    official = {f"model.diffusion_model.{k}": v for k, v in official_state(pipe.transformer.state_dict()).items()}
    in_blocks = lambda k, v: _block_linear(k, v) and re.search(r"\.(double|single)_blocks\.", k) is not None  # noqa: E731
    variants = {
        "fp16 / bf16": {
            "text_encoder": save_torch(root / "llava_llama3_fp16.safetensors", cast(llama, torch.float16)),
            "text_encoder_2": save_torch(root / "clip_l.safetensors", cast(clip, torch.float16)),
            "vae": save_torch(root / "hunyuan_video_vae_bf16.safetensors",
                              cast(comfy_hunyuan_vae(pipe.vae.state_dict(), levels), torch.bfloat16)),
            "transformer": save_torch(root / "hunyuan_video_t2v_720p_bf16.safetensors", cast(official, torch.bfloat16)),
        },
        "fp8 scaled": {
            "text_encoder": save_torch(root / "llava_llama3_fp8_scaled.safetensors",
                                       fp8_scaled(llama, lambda k, v: _block_linear(k, v) and ".layers." in k)),
            "transformer": save_torch(root / "hunyuan_video_t2v_720p_fp8_scaled.safetensors",
                                      fp8_scaled(official, in_blocks, torch.bfloat16)),
        },
    }
    for variant, files in variants.items():
        conversion = plan(root / "pipe", components=files)
        comps = components(conversion)
        assert conversion.manifest["family"] == "hunyuan"
        for name in files:
            comp = comps[name]
            assert not comp.skipped
            if variant == "fp8 scaled":
                assert any(comp.source.fp8_format(k) for k, _, _ in comp.tensors.values()), name
            assert_same(converted(comp), rounded_like(reference[name], comp), f"{variant} {name}")
        if "text_encoder_2" in files:
            assert "--text-encoder-2" in conversion.source_format


def test_cli_text_encoder_2_option_writes_the_comfy_clip(hunyuan):
    from mlx_video.cli import main

    root, pipe, reference = hunyuan
    clip = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.to(torch.float16)
            for k, v in pipe.text_encoder_2.state_dict().items()}
    path = save_torch(root / "clip_l_cli.safetensors", clip)
    main(["convert", str(root / "pipe"), str(root / "cli_out"), "--dtype", "fp32", "--text-encoder-2", str(path)])
    manifest = json.loads((root / "cli_out" / "mlxvid.json").read_text())
    assert "--text-encoder-2" in manifest["source"]["format"]
    written = {}
    for shard in sorted((root / "cli_out" / "text_encoder_2").glob("*.safetensors")):
        written.update({k: np.array(v) for k, v in mx.load(str(shard)).items()})
    expected = {k: v.astype(np.float16).astype(np.float32) for k, v in reference["text_encoder_2"].items()}
    assert_same(written, expected, "mlxvid convert --text-encoder-2")


def test_hunyuan_comfy_vae_is_named_and_refused_where_it_does_not_fit(hunyuan):
    from mlx_video.convert.formats import classify

    root, pipe, _ = hunyuan
    levels = len(pipe.vae.config.block_out_channels)
    kind = classify(comfy_hunyuan_vae(pipe.vae.state_dict(), levels))
    assert (kind.family, kind.kind, kind.naming) == ("hunyuan", "vae", "comfyui")
    # ComfyUI's CLIP file given as the Llama encoder is named for what it is
    clip = {f"text_model.{k}" if not k.startswith("text_model.") else k: v
            for k, v in pipe.text_encoder_2.state_dict().items()}
    path = save_torch(root / "clip_as_llama.safetensors", cast(clip, torch.float16))
    with pytest.raises(MlxVideoError, match="CLIP text encoder"):
        plan(root / "pipe", components={"text_encoder": path})


# ---------------------------------------------------------------------------------------------------
# Mochi, tiny

# a VAE in the published layout (the official names number modules by their place in it), at tiny widths
MOCHI_VAE = dict(encoder_block_out_channels=(32, 64, 64, 96), decoder_block_out_channels=(32, 32, 64, 64),
                 latent_channels=12, layers_per_block=(3, 3, 4, 6, 3), scaling_factor=1.25)


@pytest.fixture(scope="module")
def mochi(tmp_path_factory):
    from diffusers import AutoencoderKLMochi
    from support.mochi import randomize_

    root = tmp_path_factory.mktemp("mochi")
    pipe = build_tiny_mochi_pipeline(root / "pipe")
    vae = AutoencoderKLMochi(**MOCHI_VAE).eval()
    randomize_(vae, 7)
    shutil.rmtree(root / "pipe" / "vae")
    vae.save_pretrained(root / "pipe" / "vae")
    reference = {name: converted(c) for name, c in components(plan(root / "pipe")).items()}
    return root, pipe, vae, reference


def test_mochi_comfy_files_match_the_diffusers_route(mochi):
    root, pipe, vae, reference = mochi
    official = official_state_dict(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    comfy_dit = {f"model.diffusion_model.{k}": v for k, v in official.items()}
    t5 = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    decoder, encoder = official_vae_state_dicts(vae.state_dict())
    both = {**{f"decoder.{k}": v for k, v in decoder.items()}, **{f"encoder.{k}": v for k, v in encoder.items()}}
    (root / "decoder_only").mkdir()
    save_torch(root / "decoder_only" / "encoder.safetensors", encoder)  # the official encoder half beside ComfyUI's decoder
    in_blocks = lambda k, v: _block_linear(k, v) and ".blocks." in k  # noqa: E731
    t5_blocks = lambda k, v: _block_linear(k, v) and k.startswith("encoder.block.") and "relative" not in k  # noqa: E731
    variants = {
        "bf16 / fp16": {
            "transformer": save_torch(root / "mochi_preview_bf16.safetensors", cast(comfy_dit, torch.bfloat16)),
            "text_encoder": save_torch(root / "t5xxl_fp16.safetensors", cast(t5, torch.float16)),
            "vae": save_torch(root / "mochi_vae.safetensors", cast(both, torch.bfloat16)),
        },
        "fp8 scaled": {
            "transformer": save_torch(root / "mochi_preview_fp8_scaled.safetensors", fp8_scaled(comfy_dit, in_blocks)),
            "text_encoder": save_torch(root / "t5xxl_fp8_e4m3fn_scaled.safetensors", fp8_scaled(t5, t5_blocks)),
            "vae": save_torch(root / "decoder_only" / "mochi_vae.safetensors",
                              {f"decoder.{k}": v for k, v in cast(decoder, torch.bfloat16).items()}),
        },
    }
    for variant, files in variants.items():
        comps = components(plan(root / "pipe", components=files))
        for name in files:
            comp = comps[name]
            if variant == "fp8 scaled" and name != "vae":
                assert any(comp.source.fp8_format(k) for k, _, _ in comp.tensors.values()), name
            ours, expected = converted(comp), rounded_like(reference[name], comp)
            if name == "vae" and variant == "fp8 scaled":  # the encoder half comes from the float32 official file
                assert all(comp.source.code(k) == ("F32" if k.startswith("encoder.") else "BF16")
                           for k, _, _ in comp.tensors.values())
            assert_same(ours, expected, f"{variant} {name}")

    # ComfyUI's decoder-only VAE without the official encoder beside it: refused, saying what to add
    (root / "alone").mkdir()
    shutil.copy(root / "decoder_only" / "mochi_vae.safetensors", root / "alone" / "mochi_vae.safetensors")
    with pytest.raises(MlxVideoError, match="encoder.safetensors beside it"):
        plan(root / "pipe", components={"vae": root / "alone" / "mochi_vae.safetensors"})


# ---------------------------------------------------------------------------------------------------
# full size, header-only

SCALE = struct.pack("<f", 0.01)
ONE = struct.pack("<f", 1.0)


def header_only(path, shapes: dict, dtype: str, fp8=lambda k, s: False):
    """A header-only file of these names and shapes; `fp8` names the weights stored as ComfyUI's scaled fp8."""
    entries = {}
    if any(fp8(k, s) for k, s in shapes.items()):
        entries["scaled_fp8"] = ("F8_E4M3", (0,), None)
    for key, shape in shapes.items():
        if fp8(key, shape):
            entries[key] = ("F8_E4M3", shape, None)
            entries[key[: -len("weight")] + "scale_weight"] = ("F32", (), SCALE)
            entries[key[: -len("weight")] + "scale_input"] = ("F32", (), ONE)
        else:
            entries[key] = (dtype, shape, None)
    return write_description(path, entries)


def write_config(folder, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def assert_covers(conversion, names) -> None:
    for comp in conversion.components:
        if comp.name in names:
            expected = {k: tuple(v.shape) for k, v in tree_flatten(comp.module.parameters())}
            assert {k: v[1] for k, v in comp.tensors.items()} == expected and not comp.skipped, comp.name


def _linear_2d(key, shape) -> bool:
    return len(shape) == 2 and key.endswith(".weight")


def test_hunyuan_full_size_comfy_files_plan(hunyuan):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from support.hunyuan import CLIP_L, LLAMA_8B, PUBLISHED_TRANSFORMER

    root, _, _ = hunyuan
    full = root / "full"
    (full / "files").mkdir(parents=True)
    with torch.device("meta"):
        transformer = HunyuanVideoTransformer3DModel(**PUBLISHED_TRANSFORMER)
        llama = LlamaModel(LlamaConfig(**LLAMA_8B))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        vae = AutoencoderKLHunyuanVideo()
        official = {f"model.diffusion_model.{k}": tuple(v.shape)
                    for k, v in official_state(transformer.state_dict()).items()}
        vae_shapes = {k: tuple(v.shape) for k, v in comfy_hunyuan_vae(vae.state_dict(), 4).items()}
    shutil.copy(root / "pipe" / "model_index.json", full / "model_index.json")
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(root / "pipe" / tok, full / tok)
    write_config(full / "transformer", {"_class_name": "HunyuanVideoTransformer3DModel", **PUBLISHED_TRANSFORMER})
    write_config(full / "text_encoder", LlamaConfig(**LLAMA_8B).to_dict())
    write_config(full / "text_encoder_2", CLIPTextConfig(**CLIP_L).to_dict())
    write_config(full / "vae", {"_class_name": "AutoencoderKLHunyuanVideo", **dict(vae.config)})

    llama_names = {f"model.{k}": s for k, s in meta_shapes(llama).items()}
    clip_names = {(k if k.startswith("text_model.") else f"text_model.{k}"): s for k, s in meta_shapes(clip).items()}
    clip_names["text_projection.weight"] = (768, 768)
    files = {
        "transformer": header_only(full / "files" / "hunyuan_video_t2v_720p_bf16.safetensors", official, "BF16"),
        "text_encoder": header_only(full / "files" / "llava_llama3_fp8_scaled.safetensors", llama_names, "F16",
                                    lambda k, s: _linear_2d(k, s) and ".layers." in k),
        "text_encoder_2": header_only(full / "files" / "clip_l.safetensors", clip_names, "F16"),
        "vae": header_only(full / "files" / "hunyuan_video_vae_bf16.safetensors", vae_shapes, "BF16"),
    }
    assert "encoder.mid.attn_1.q.weight" in vae_shapes and vae_shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1, 1)
    conversion = plan(full, components=files)
    assert_covers(conversion, set(files))
    comps = components(conversion)
    # the Llama layers after the hidden state the encoder takes (30, 31) and the final norm are left out on purpose
    assert len(comps["text_encoder"].tensors) == 1 + 30 * 9
    assert len(comps["vae"].tensors) == len(vae_shapes)
    llava_fp16 = header_only(full / "files" / "llava_llama3_fp16.safetensors", llama_names, "F16")
    assert_covers(plan(full, components={**files, "text_encoder": llava_fp16}), {"text_encoder"})


def test_mochi_full_size_comfy_files_plan(mochi):
    from diffusers import AutoencoderKLMochi, MochiTransformer3DModel
    from transformers import T5Config as HFT5Config, T5EncoderModel

    from support.mochi import T5_XXL

    root, _, _, _ = mochi
    full = root / "full"
    (full / "files").mkdir(parents=True)
    with torch.device("meta"):
        transformer = MochiTransformer3DModel()
        t5 = T5EncoderModel(HFT5Config(**T5_XXL))
        vae = AutoencoderKLMochi()
        official = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in
                    official_state_dict(transformer.state_dict(), transformer.config.num_layers).items()}
        decoder, encoder = official_vae_state_dicts(vae.state_dict())
    shutil.copy(root / "pipe" / "model_index.json", full / "model_index.json")
    shutil.copytree(root / "pipe" / "tokenizer", full / "tokenizer")
    write_config(full / "transformer", {"_class_name": "MochiTransformer3DModel", **dict(transformer.config)})
    write_config(full / "text_encoder", HFT5Config(**T5_XXL).to_dict())
    write_config(full / "vae", {"_class_name": "AutoencoderKLMochi", **dict(vae.config)})

    t5_names = {k: s for k, s in meta_shapes(t5).items() if k != "encoder.embed_tokens.weight"}
    decoder_names = {f"decoder.{k}": tuple(v.shape) for k, v in decoder.items()}
    both = {**decoder_names, **{f"encoder.{k}": tuple(v.shape) for k, v in encoder.items()}}
    files = {
        "transformer": header_only(full / "files" / "mochi_preview_fp8_scaled.safetensors", official, "BF16",
                                   lambda k, s: _linear_2d(k, s) and ".blocks." in k),
        "text_encoder": header_only(full / "files" / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5_names, "F16",
                                    lambda k, s: _linear_2d(k, s) and k.startswith("encoder.block.") and "relative" not in k),
        "vae": header_only(full / "files" / "mochi_vae.safetensors", both, "BF16"),
    }
    conversion = plan(full, components=files)
    assert_covers(conversion, set(files))
    assert len(components(conversion)["transformer"].tensors) == len(official)
    # the decoder-only file, with the official encoder.safetensors beside it; and the bf16 / fp16 files
    (full / "decoder_only").mkdir()
    header_only(full / "decoder_only" / "encoder.safetensors", {k: tuple(v.shape) for k, v in encoder.items()}, "BF16")
    more = {
        "transformer": header_only(full / "files" / "mochi_preview_bf16.safetensors", official, "BF16"),
        "text_encoder": header_only(full / "files" / "t5xxl_fp16.safetensors", t5_names, "F16"),
        "vae": header_only(full / "decoder_only" / "mochi_vae.safetensors", decoder_names, "BF16"),
    }
    assert_covers(plan(full, components=more), set(more))
