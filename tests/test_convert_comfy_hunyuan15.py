"""ComfyUI's single files for HunyuanVideo 1.5 (Comfy-Org/HunyuanVideo_1.5_repackaged): the transformer
(split_files/diffusion_models/hunyuanvideo1.5_*_fp16 / _fp8_scaled.safetensors) given with `--transformer`, the VAE
(split_files/vae/hunyuanvideo15_vae_fp16.safetensors) with `--vae`, on top of a diffusers folder.

Their names, as written here: the transformer's are the official ones with each double-stream attention's q|k|v
fused into `img_attn_qkv` / `txt_attn_qkv` (musubi-tuner's hunyuan_video_1_5_models.py names the key
`double_blocks.0.img_attn_qkv.weight` "ComfyUI repackaged" and splits it in three); the VAE's are the official ones
with ComfyUI's `nin_shortcut.conv.` for `nin_shortcut.` (comfy/ldm/hunyuan_video/vae_refiner.py builds the
shortcut with its VideoConv3d wrapper).

Tiny: the files written from a tiny diffusers folder convert to the diffusers route's tensors bit for bit after the
file's rounding (fp16); the fp8-scaled transformer (ComfyUI's legacy `scaled_fp8` + per-tensor `scale_weight` under
`model.diffusion_model.`, and the newer `weight_scale` + `comfy_quant`) to the official-named file of its decoded
weights (one scale per fused q|k|v, shared by its three parts). Full size: header-only files of the published keys
and shapes plan with nothing missing, unknown or misshapen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx.utils import tree_flatten  # noqa: E402

from mlx_video.convert.convert import plan  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.hunyuan15 import (  # noqa: E402
    official_state, official_vae_state, save_transformer_folder, tiny_encoders, tiny_transformer,
)
from support.plans import assert_same, components, converted  # noqa: E402
from support.tensor_files import save_torch, write_description  # noqa: E402

FUSED = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn)_([qkv])\.(weight|bias)")
BLOCK_LINEAR = re.compile(r"double_blocks\.\d+\.(img|txt)_(attn_qkv|attn_proj|mod\.linear|mlp\.fc[12])\.weight")
QWEN_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
FIXTURES = Path(__file__).parent / "fixtures"
F8 = torch.float8_e4m3fn


def comfy_names(official: dict) -> dict:
    """The official state dict with the double blocks' q, k, v concatenated as ComfyUI's file holds them."""
    out, parts = {}, {}
    for key, value in official.items():
        m = FUSED.fullmatch(key)
        if m is None:
            out[key] = value
        else:
            parts.setdefault(f"{m[1]}_qkv.{m[3]}", {})[m[2]] = value
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[p] for p in "qkv"]) if isinstance(pieces["q"], torch.Tensor) else \
            (sum(pieces[p][0] for p in "qkv"), *pieces["q"][1:])
    return out


def comfy_vae_names(official: dict) -> dict:
    return {k.replace(".nin_shortcut.", ".nin_shortcut.conv."): v for k, v in official.items()}


def fp8_file(sd: dict, layout: str, prefix: str = "", linear=BLOCK_LINEAR) -> tuple[dict, dict]:
    """(ComfyUI's fp8-scaled file: the `linear` weights as e4m3 codes of W / (max|W| / 448) with their scale, the
    rest bf16; the state dict of what it decodes to in float32, a transformer's fused q|k|v split back)."""
    stored, decoded = ({"scaled_fp8": torch.empty(0, dtype=F8)} if layout == "legacy" else {}), {}
    for key, value in sd.items():
        if linear.fullmatch(key):
            scale = value.float().abs().max() / 448.0
            codes = (value.float() / scale).to(F8)
            layer = prefix + key[: -len(".weight")]
            stored[prefix + key] = codes
            if layout == "legacy":
                stored[layer + ".scale_weight"], stored[layer + ".scale_input"] = scale.reshape(()), torch.tensor(1.0)
            else:
                stored[layer + ".weight_scale"] = scale.reshape(())
                stored[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            value = codes.float() * scale
        else:
            stored[prefix + key] = value.to(torch.bfloat16)
            value = stored[prefix + key].float()
        if key.startswith("double_blocks.") and "_attn_qkv." in key:
            for part, rows in zip("qkv", value.chunk(3)):
                decoded[key.replace("_attn_qkv.", f"_attn_{part}.")] = rows.contiguous()
        else:
            decoded[key] = value
    return stored, decoded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers I2V folder (a MeanFlow transformer of 3 heads of 16, a VAE without channel matching at its
    resamplers, so that it has 1x1x1 shortcuts) and what `mlxvid convert` makes of it."""
    from diffusers import AutoencoderKLHunyuanVideo15

    root = tmp_path_factory.mktemp("hy15_comfy")
    transformer = tiny_transformer(3, 16, 2, meanflow=True, seed=12, axes=(4, 6, 6), text_dim=24)
    save_transformer_folder(root / "pipe", transformer, pipeline="HunyuanVideo15ImageToVideoPipeline", guidance=1.0)
    encoders = tiny_encoders(with_vae=False)
    for name, module in encoders.items():
        module.save_pretrained(root / "pipe" / name)
    torch.manual_seed(4)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16, 16, 16), layers_per_block=1,
                                      downsample_match_channel=False, upsample_match_channel=False).eval()
    vae.save_pretrained(root / "pipe" / "vae")
    reference = components(plan(root / "pipe"))
    return root, transformer, vae, reference, encoders


def test_comfy_fp16_files_match_the_diffusers_route(tiny):
    root, transformer, vae, reference, _ = tiny
    dit = comfy_names({k: v.to(torch.float16) for k, v in official_state(transformer.state_dict()).items()})
    assert "double_blocks.1.txt_attn_qkv.bias" in dit and "double_blocks.1.txt_attn_q.weight" not in dit
    vae_sd = comfy_vae_names({k: v.to(torch.float16) for k, v in official_vae_state(vae.state_dict()).items()})
    assert any(".nin_shortcut.conv.weight" in k for k in vae_sd)
    files = {"transformer": save_torch(root / "hunyuanvideo1.5_480p_i2v_step_distilled_fp16.safetensors", dit),
             "vae": save_torch(root / "hunyuanvideo15_vae_fp16.safetensors", vae_sd)}
    conversion = plan(root / "pipe", components=files)
    comps = components(conversion)
    assert "--transformer" in conversion.source_format and "--vae" in conversion.source_format
    assert conversion.manifest["model"] == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    for name in files:
        assert comps[name].config == reference[name].config, name
        expected = {k: v.astype(np.float16).astype(np.float32) for k, v in converted(reference[name]).items()}
        assert_same(converted(comps[name]), expected, f"ComfyUI fp16 {name}")


@pytest.mark.parametrize("layout,prefix", [("legacy", "model.diffusion_model."), ("comfy_quant", "")])
def test_comfy_fp8_scaled_transformer(tiny, layout, prefix):
    """The fused q|k|v's one scale serves its three parts: the same tensors as the official-named file of the
    decoded weights."""
    root, transformer, _, _, _ = tiny
    stored, decoded = fp8_file(comfy_names(official_state(transformer.state_dict())), layout, prefix)
    comfy = save_torch(root / f"hunyuanvideo1.5_480p_i2v_step_distilled_fp8_scaled_{layout}.safetensors", stored)
    official = save_torch(root / f"official_decoded_{layout}.safetensors", decoded)
    comp = components(plan(root / "pipe", components={"transformer": comfy}))["transformer"]
    assert any(comp.source.fp8_format(k) == "e4m3fn" for k, _, _ in comp.tensors.values())
    expected = converted(components(plan(root / "pipe", components={"transformer": official}))["transformer"])
    assert_same(converted(comp), expected, f"ComfyUI fp8 ({layout})")


def test_comfy_text_encoder_files(tiny):
    """ComfyUI's qwen_2.5_vl_7b file (the language model under `model.` beside a vision tower, which is left out;
    fp16, and fp8-scaled) and byt5_small_glyphxl file (transformers' T5 names, fp16) with --text-encoder and
    --text-encoder-2: the diffusers route's tensors after the file's rounding."""
    root, _, _, reference, encoders = tiny
    qwen = {f"model.{k}": v for k, v in encoders["text_encoder"].state_dict().items()}
    qwen["visual.blocks.0.attn.qkv.weight"] = torch.zeros(48, 16)  # ComfyUI's file holds the vision tower too
    byt5 = {k: v.to(torch.float16) for k, v in encoders["text_encoder_2"].state_dict().items()
            if k != "encoder.embed_tokens.weight"}
    files = {"text_encoder": save_torch(root / "qwen_2.5_vl_7b.safetensors",
                                        {k: v.to(torch.float16) for k, v in qwen.items()}),
             "text_encoder_2": save_torch(root / "byt5_small_glyphxl_fp16.safetensors", byt5)}
    conversion = plan(root / "pipe", components=files)
    assert "--text-encoder-2" in conversion.source_format
    comps = components(conversion)
    for name in files:
        expected = {k: v.astype(np.float16).astype(np.float32) for k, v in converted(reference[name]).items()}
        assert_same(converted(comps[name]), expected, f"ComfyUI {name}")

    stored, decoded = fp8_file(qwen, "legacy", linear=QWEN_LINEAR)
    fp8 = save_torch(root / "qwen_2.5_vl_7b_fp8_scaled.safetensors", stored)
    comp = components(plan(root / "pipe", components={"text_encoder": fp8}))["text_encoder"]
    assert any(comp.source.fp8_format(k) == "e4m3fn" for k, _, _ in comp.tensors.values())
    decoded_file = save_torch(root / "qwen_decoded.safetensors", decoded)
    expected = converted(components(plan(root / "pipe", components={"text_encoder": decoded_file}))["text_encoder"])
    assert_same(converted(comp), expected, "ComfyUI fp8-scaled text_encoder")


def test_fused_rows_must_split_in_three(tiny):
    root, transformer, _, _, _ = tiny
    dit = comfy_names(official_state(transformer.state_dict()))
    dit["double_blocks.0.img_attn_qkv.bias"] = dit["double_blocks.0.img_attn_qkv.bias"][:-1]
    path = save_torch(root / "bad_qkv.safetensors", dit)
    with pytest.raises(MlxVideoError, match=r"double_blocks\.0\.img_attn_qkv\.bias .* does not split into the 3"):
        plan(root / "pipe", components={"transformer": path})


def _header_only(path, shapes: dict, code: str = "BF16"):
    return write_description(path, {k: (code, tuple(s), None) for k, s in shapes.items()})


def test_full_size_comfy_files_plan(tmp_path):
    """The published transformer (the official keys recorded from the official class) and VAE as ComfyUI names them,
    header only, over a diffusers folder of the published configs: every key and shape planned onto ours."""
    from mlx_video.families.hunyuan15.config import HUNYUAN15_480P_MEANFLOW

    recorded = json.loads((FIXTURES / "hunyuan15" / "official_transformer_keys.json").read_text())["shapes"]
    vae_recorded = json.loads((FIXTURES / "hy15_vae" / "official_vae_keys.json").read_text())
    dit, vae = comfy_names({k: tuple(v) for k, v in recorded.items()}), comfy_vae_names(vae_recorded["shapes"])
    assert len(dit) == 1797 - 4 * 2 * 54 and dit["double_blocks.53.txt_attn_qkv.weight"] == (6144, 2048)
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "vae").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15ImageToVideoPipeline"}))
    (tmp_path / "pipe" / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideo15Transformer3DModel", "use_meanflow": True}))
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKLConv3D", **vae_recorded["config"]}))
    files = {"transformer": _header_only(tmp_path / "hunyuanvideo1.5_480p_i2v_step_distilled_fp16.safetensors", dit, "F16"),
             "vae": _header_only(tmp_path / "hunyuanvideo15_vae_fp16.safetensors", vae, "F16")}
    conversion = plan(tmp_path / "pipe", components=files)
    for comp in conversion.components:
        ours = {k: tuple(v.shape) for k, v in tree_flatten(comp.module.parameters())}
        assert {k: v[1] for k, v in comp.tensors.items()} == ours and not comp.skipped, comp.name
    comps = components(conversion)
    assert comps["transformer"].config == HUNYUAN15_480P_MEANFLOW.to_dict()
    assert len(comps["vae"].tensors) == len(vae)
