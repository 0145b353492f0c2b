"""Wan checkpoints for the conversion tests: tiny models and their state dicts in the official, ComfyUI and fp8
layouts, full-size files described without their weights, a converted tiny TI2V."""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402
from support.tensor_files import meta_state, write_description  # noqa: E402
from support.wan import randomize_, train_spiece  # noqa: E402

from mlx_video.model_folder import ModelFolder  # noqa: E402
from mlx_video.families.wan.config import WanTransformerConfig  # noqa: E402
from mlx_video.registry import MODELS, ModelSpec  # noqa: E402


# ---- Wan: tiny models and their files in the official, ComfyUI and fp8 layouts ----
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)  # fmt: skip

TINY_CONFIG = WanTransformerConfig(
    dim=32, ffn_dim=64, freq_dim=16, text_dim=32, num_heads=2, num_layers=2, in_channels=16, out_channels=16
)

E4M3_MAX = 448.0


def tiny_specs() -> dict[str, ModelSpec]:
    """Registry entries like the published ones, with the tiny model's dimensions."""
    from dataclasses import replace

    a14b = MODELS["wan2.2-t2v-a14b"]
    small = dict(transformer=TINY_CONFIG, sizes=((64, 64),), hf_repo="none/tiny")
    one = {k: v for k, v in a14b.defaults.items() if k not in ("boundary", "guidance_2")}
    return {
        "tiny-wan": replace(a14b, id="tiny-wan", experts=1, defaults=dict(one, steps=2, frames=5), **small),
        "tiny-wan-a14b": replace(a14b, id="tiny-wan-a14b", defaults=dict(a14b.defaults, steps=2, frames=5), **small),
    }

_TRANSFORMER_NAMES = [
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.(norm_[qk])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.(norm_[qk])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.norm2", r"blocks.\1.norm3"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"proj_out", "head.head"),
    (r"scale_shift_table", "head.modulation"),
    (r"patch_embedding", "patch_embedding"),
]


def official_transformer_name(key: str) -> str:
    """A diffusers transformer key (or a side tensor `<layer>.scale_weight` etc.) in official names."""
    for pattern, repl in _TRANSFORMER_NAMES:
        m = re.match(pattern + r"(?=\.|$)", key)
        if m:
            return m.expand(repl) + key[m.end() :]
    raise KeyError(key)


def official_umt5(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue
        for pattern, repl in [
            (r"shared\.weight", "token_embedding.weight"),
            (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
            (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
            (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", r"blocks.\1.pos_embedding.embedding.weight"),
            (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
            (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
            (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
            (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
            (r"encoder\.final_layer_norm\.weight", "norm.weight"),
        ]:
            m = re.fullmatch(pattern, k)
            if m:
                out[m.expand(repl)] = v
                break
        else:
            raise KeyError(k)
    return out


def official_clip(state_dict) -> dict:
    """transformers' CLIP vision weights under the official open-clip file's names, as Wan-Video/Wan2.2
    wan/modules/animate/clip.py names its `visual` tower (q, k, v fused in that order in `to_qkv`), plus a text
    tower, a head and the logit scale that the conversion leaves out."""
    import re

    sd = {re.sub(r"^vision_model\.", "", k): v for k, v in state_dict.items()}
    out = {"visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": sd["embeddings.class_embedding"].reshape(1, 1, -1),
           "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
           "visual.head": torch.zeros(sd["post_layernorm.weight"].shape[0], 8), "log_scale": torch.tensor(2.6),
           "textual.token_embedding.weight": torch.zeros(10, 8)}
    for p in ("weight", "bias"):
        out[f"visual.pre_norm.{p}"] = sd[f"pre_layrnorm.{p}"]
        out[f"visual.post_norm.{p}"] = sd[f"post_layernorm.{p}"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for i in layers:
        layer, to = f"encoder.layers.{i}", f"visual.transformer.{i}"
        for p in ("weight", "bias"):
            out[f"{to}.norm1.{p}"], out[f"{to}.norm2.{p}"] = sd[f"{layer}.layer_norm1.{p}"], sd[f"{layer}.layer_norm2.{p}"]
            out[f"{to}.attn.to_qkv.{p}"] = torch.cat([sd[f"{layer}.self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[f"{to}.attn.proj.{p}"] = sd[f"{layer}.self_attn.out_proj.{p}"]
            out[f"{to}.mlp.0.{p}"], out[f"{to}.mlp.2.{p}"] = sd[f"{layer}.mlp.fc1.{p}"], sd[f"{layer}.mlp.fc2.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def official_vae21(sd: dict, num_res_blocks: int) -> dict:
    """A diffusers AutoencoderKLWan (Wan 2.1 layout) state dict in the official Wan2.1_VAE.pth names."""
    per_level = num_res_blocks + 2  # residual blocks + the upsample, in the decoder's flat list

    def block(rest: str) -> str:
        for a, b in [("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                     ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]:
            if rest.startswith(a):
                return b + rest[len(a):]
        return rest

    out = {}
    for k, v in sd.items():
        if k.startswith("quant_conv."):
            name = "conv1." + k[len("quant_conv."):]
        elif k.startswith("post_quant_conv."):
            name = "conv2." + k[len("post_quant_conv."):]
        elif m := re.match(r"(encoder|decoder)\.conv_in\.(.*)", k):
            name = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.gamma", k):
            name = f"{m[1]}.head.0.gamma"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.*)", k):
            name = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
            name = f"{m[1]}.middle.{2 * int(m[2])}.{block(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k):
            name = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", k):
            name = f"encoder.downsamples.{m[1]}.{block(m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            name = f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{block(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            name = f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
        else:
            raise KeyError(k)
        out[name] = v
    return out

FP8_LAYERS = re.compile(
    r"(blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net\.(0\.proj|2))|condition_embedder\.(text_embedder|time_embedder)\.linear_[12]"
    r"|condition_embedder\.time_proj|proj_out)\.weight"
)

KJ_KEEP = ("norm", "head", "bias", "modulation", "patch_embedding", "time_", "img_emb")

TORCH_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def scaled_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, per-tensor scale, dequantized) with scale = max|W| / 448."""
    w = w.float()
    scale = (w.abs().max() / E4M3_MAX).reshape(())
    codes = (w / scale).to(torch.float8_e4m3fn)
    return codes, scale, codes.float() * scale


def comfy_file(sd: dict, kind: str, prefix: str = "model.diffusion_model.") -> tuple[dict, dict]:
    """(tensors to store under official names, dequantized reference weights under diffusers names)."""
    stored, reference = {}, {}
    if kind == "legacy":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for key, w in sd.items():
        name = prefix + official_transformer_name(key)
        layer = name[: -len(".weight")]
        if kind == "bf16":
            stored[name] = w.to(torch.bfloat16)
            reference[key] = stored[name].float()
        elif kind in ("legacy", "new") and FP8_LAYERS.fullmatch(key) and (kind == "legacy" or ".blocks." in "." + key):
            codes, scale, deq = scaled_fp8(w)
            stored[name] = codes
            if kind == "legacy":
                stored[layer + ".scale_weight"] = scale
                stored[layer + ".scale_input"] = torch.tensor(1.0)
            else:
                stored[layer + ".weight_scale"] = scale
                stored[layer + ".input_scale"] = torch.tensor(1.0)
                stored[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
            reference[key] = deq
        elif kind in ("e4m3fn", "e5m2") and not any(s in official_transformer_name(key) for s in KJ_KEEP):
            stored[name] = w.to(TORCH_FP8[kind])
            reference[key] = stored[name].float()
        else:
            low = torch.float16 if kind == "legacy" else torch.bfloat16
            stored[name] = w.to(low)
            reference[key] = stored[name].float()
    return stored, reference


class Tiny:
    def __init__(self, root: Path):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        self.root = root
        torch.manual_seed(0)
        self.transformer = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
        randomize_(self.transformer, 2)
        self.transformer_2 = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
        randomize_(self.transformer_2, 3)
        self.text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )).eval()  # fmt: skip
        randomize_(self.text_encoder, 1, scale=0.5)
        self.vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
        (root / "tok").mkdir(parents=True, exist_ok=True)
        self.spiece = train_spiece(root / "tok" / "spiece.model")
        self.sd = {k: v.detach().clone() for k, v in self.transformer.state_dict().items()}
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(1, 16, 2, 4, 6, generator=g)
        self.t = torch.tensor([700.0])
        self.ctx = torch.randn(1, 7, 32, generator=g)

    # reference and ours

    def reference(self, weights: dict | None = None) -> np.ndarray:
        model = self.transformer
        if weights is not None:
            model = copy.deepcopy(self.transformer)
            model.load_state_dict(weights)
        with torch.no_grad():
            return model(self.x, self.t, self.ctx, return_dict=False)[0].numpy()

    def ours(self, folder: Path, component: str = "transformer") -> np.ndarray:
        from mlx_video.families.wan.transformer import WanTransformer

        mf = ModelFolder.open(folder)
        model = WanTransformer(WanTransformerConfig.from_dict(mf.config(component)))
        mf.load_module(component, model)
        out = model(mx.array(self.x.numpy()).transpose(0, 2, 3, 4, 1), mx.array(self.t.numpy()), mx.array(self.ctx.numpy()))
        return np.array(out.transpose(0, 4, 1, 2, 3))

    # files

    def diffusers_folder(self) -> Path:
        from diffusers import UniPCMultistepScheduler, WanPipeline
        from transformers import T5Tokenizer

        folder = self.root / "diffusers"
        if not folder.exists():
            tokenizer = T5Tokenizer.from_pretrained(str(self.root / "tok"), extra_ids=0)
            scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
            WanPipeline(tokenizer=tokenizer, text_encoder=self.text_encoder, vae=self.vae, scheduler=scheduler,
                        transformer=self.transformer, expand_timesteps=True).save_pretrained(folder)
        return folder

    def official_folder(self) -> Path:
        folder = self.root / "official"
        if folder.exists():
            return folder
        config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "patch_size": [1, 2, 2],
                  "text_len": 512, "in_dim": 16, "dim": 32, "ffn_dim": 64, "freq_dim": 16, "text_dim": 32, "out_dim": 16,
                  "num_heads": 2, "num_layers": 2, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
                  "eps": 1e-6}  # fmt: skip
        for sub, model in (("high_noise_model", self.transformer), ("low_noise_model", self.transformer_2)):
            d = folder / sub
            d.mkdir(parents=True)
            sd = {official_transformer_name(k): v.contiguous() for k, v in model.state_dict().items()}
            keys = sorted(sd)
            halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
            weight_map = {}
            for i, part in enumerate(halves):
                name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
                save_file({k: sd[k] for k in part}, str(d / name))
                weight_map.update({k: name for k in part})
            (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            (d / "config.json").write_text(json.dumps(config))
        te = {k: v for k, v in self.text_encoder.state_dict().items()}
        torch.save(official_umt5(te), folder / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(official_vae21(self.vae.state_dict(), 1), folder / "Wan2.1_VAE.pth")
        (folder / "google" / "umt5-xxl").mkdir(parents=True)
        (folder / "google" / "umt5-xxl" / "spiece.model").write_bytes(self.spiece.read_bytes())
        return folder

    def comfy(self, kind: str, model: str = "transformer", prefix: str = "model.diffusion_model.") -> tuple[Path, dict]:
        path = self.root / f"wan_{model}_{kind}.safetensors"
        sd = self.sd if model == "transformer" else dict(self.transformer_2.state_dict())
        stored, reference = comfy_file(sd, kind, prefix)
        if not path.exists():
            save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
        return path, reference


# ---- Wan: full-size checkpoint files described without their weights ----
COMFY_QUANT = json.dumps({"format": "float8_e4m3fn"}).encode()


WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6)  # fmt: skip

TRANSFORMERS = {
    "wan2.2-t2v-a14b": dict(WAN, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.2-i2v-a14b": dict(WAN, num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.2-ti2v-5b": dict(WAN, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
}


def transformer_file(path: Path, model_id: str, fmt: str) -> Path:
    from diffusers import WanTransformer3DModel

    sd = meta_state(WanTransformer3DModel, **TRANSFORMERS[model_id])
    prefix = "model.diffusion_model." if fmt.startswith("comfy") else ""
    out: dict = {}
    if fmt == "comfy_fp8_legacy":
        out["scaled_fp8"] = ("F8_E4M3", (0,), None)
    for key, t in sd.items():
        name = prefix + official_transformer_name(key)
        layer = name[: -len(".weight")]
        if fmt in ("comfy_fp8_legacy", "comfy_fp8_new") and FP8_LAYERS.fullmatch(key):
            out[name] = ("F8_E4M3", tuple(t.shape), None)
            if fmt == "comfy_fp8_legacy":
                out[layer + ".scale_weight"] = ("F32", (), struct.pack("<f", 0.01))
                out[layer + ".scale_input"] = ("F32", (), struct.pack("<f", 1.0))
            else:
                out[layer + ".weight_scale"] = ("F32", (), struct.pack("<f", 0.01))
                out[layer + ".comfy_quant"] = ("U8", (len(COMFY_QUANT),), COMFY_QUANT)
        elif fmt == "plain_e4m3fn" and key.endswith(".weight") and t.ndim == 2 and ".blocks." in "." + key:
            out[name] = ("F8_E4M3", tuple(t.shape), None)
        else:
            out[name] = ("F16" if fmt.startswith("comfy") else "BF16", tuple(t.shape), None)
    return write_description(path, out)


def umt5_file(path: Path, fmt: str, spiece: bytes | None = None) -> Path:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu")  # fmt: skip
    sd = meta_state(UMT5EncoderModel, config=config)
    out: dict = {}
    if fmt == "transformers":
        out = {k: ("BF16", tuple(v.shape), None) for k, v in sd.items()}
    elif fmt == "comfy_fp8_scaled":
        # Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled: transformers names, per-tensor scale_weight, the tokenizer embedded
        out["scaled_fp8"] = ("F8_E4M3", (0,), None)
        for k, v in sd.items():
            if k == "encoder.embed_tokens.weight":
                continue
            if k.endswith(".weight") and v.ndim == 2 and k.startswith("encoder.block.") and "relative_attention" not in k:
                out[k] = ("F8_E4M3", tuple(v.shape), None)
                out[k[: -len("weight")] + "scale_weight"] = ("F32", (), struct.pack("<f", 0.01))
            else:
                out[k] = ("BF16", tuple(v.shape), None)
        if spiece is not None:
            out["spiece_model"] = ("U8", (len(spiece),), spiece)
    else:
        out = {k: ("BF16", tuple(v.shape), None) for k, v in official_umt5(sd).items()}
    return write_description(path, out)


def vae_file(path: Path, version: str) -> Path:
    from diffusers import AutoencoderKLWan

    if version == "2.1":  # the official Wan2.1_VAE names, as a single file
        sd = official_vae21(meta_state(AutoencoderKLWan), num_res_blocks=2)
        return write_description(path, {k: ("F32", tuple(v.shape), None) for k, v in sd.items()})
    # Wan 2.2 in diffusers names: a vae/ folder with its config.json
    from mlx_video.families.wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    with torch.device("meta"):
        vae = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16,
                               latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))  # fmt: skip
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(vae.config, _class_name="AutoencoderKLWan")))
    write_description(path / "diffusion_pytorch_model.safetensors",
                      {k: ("F32", tuple(v.shape), None) for k, v in vae.state_dict().items()})
    return path


def converted_tiny_ti2v(root: Path, name: str = "mlx") -> Path:
    """A tiny TI2V-5B-style pipeline (Wan 2.2 VAE, one transformer) in the diffusers layout under `root`,
    converted to fp32 at `root/name`; returns the converted folder."""
    from support.wan import build_tiny_wan_pipeline

    from mlx_video.cli import main

    build_tiny_wan_pipeline(root / "diffusers", two_experts=False, shift=5.0, wan22_vae=True)
    main(["convert", str(root / "diffusers"), str(root / name), "--dtype", "fp32"])
    return root / name
