"""Every checkpoint layout and precision `mlxvid convert` reads, checked against a reference.

Tiny random reference checkpoints are written here in each format from one tiny diffusers
`WanTransformer3DModel` (plus a tiny UMT5 encoder and Wan 2.1-style VAE): the diffusers layout, the official
release layout (sharded experts with a WanModel config, torch.save'd .pth files for the T5 and the VAE, the
google/umt5-xxl tokenizer folder), ComfyUI single files in bf16, ComfyUI fp8 "scaled" files (legacy
`scaled_fp8` + `scale_weight`/`scale_input`, and the newer `weight_scale` + `comfy_quant`), and plain fp8
casts (e4m3fn and e5m2, no scales). fp8 files are made the way ComfyUI makes them: `encode_e4m3fn`-equivalent
torch casts of W / s with s = max|W| / 448 per tensor.

Each converted transformer must give the output of the reference model whose weights were dequantized the
same way: within fp32 rounding (1e-5) for every format, bit-identical between fp8 storage (--quantize fp8,
decoded when a layer runs) and the same weights dequantized at conversion, and within the documented bounds
for q8/q4 (QUANT_BOUNDS: the error against the unquantized model; against the model whose weights are the
dequantized q8/q4 weights it is again fp32 rounding).
"""

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

from mlx_video.cli import main  # noqa: E402
from mlx_video.model_folder import ModelFolder  # noqa: E402
from mlx_video.models.wan.config import WanTransformerConfig  # noqa: E402
from mlx_video.registry import MODELS, ModelSpec  # noqa: E402
from tiny_wan import randomize_, train_spiece  # noqa: E402

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)  # fmt: skip
TINY_CONFIG = WanTransformerConfig(
    dim=32, ffn_dim=64, freq_dim=16, text_dim=32, num_heads=2, num_layers=2, in_channels=16, out_channels=16
)
# Relative output error against the unquantized model, measured on this tiny model with group size 32: q8 gives
# 8.8e-4, q4 1.6e-2. The bounds leave a margin of about 5x.
QUANT_BOUNDS = {"q8": 5e-3, "q4": 8e-2}
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


@pytest.fixture
def tiny_registry(monkeypatch):
    """Registry entries with the tiny model's dimensions, so that `--base` can name them."""
    for name, spec in tiny_specs().items():
        monkeypatch.setitem(MODELS, name, spec)


# ---------------------------------------------------------------------------------------------------
# renaming diffusers state dicts to the official names (huggingface/diffusers scripts/convert_wan_to_diffusers.py, inverted)

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


# ---------------------------------------------------------------------------------------------------
# fp8 the way ComfyUI stores it

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


# ---------------------------------------------------------------------------------------------------
# the tiny models and their files


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
        from mlx_video.models.wan.transformer import WanTransformer

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


def convert(*args):
    main(["convert", *map(str, args)])


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def load_all(folder: Path, component: str) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = Tiny(tmp_path_factory.mktemp("formats"))
    t.official_folder()
    return t


@pytest.fixture(scope="module")
def from_diffusers(tiny):
    out = tiny.root / "mlx_diffusers"
    convert(tiny.diffusers_folder(), out, "--dtype", "fp32")
    return out


# ---------------------------------------------------------------------------------------------------


def test_diffusers_layout_matches_reference(tiny, from_diffusers):
    ref = tiny.reference()
    err = rel_err(tiny.ours(from_diffusers), ref)
    assert err < 1e-5, err
    manifest = json.loads((from_diffusers / "mlxvid.json").read_text())
    assert manifest["source"]["format"] == "diffusers" and manifest["quantization"] is None


def test_official_layout_gives_the_diffusers_conversion(tiny, from_diffusers, capsys):
    out = tiny.root / "mlx_official"
    convert(tiny.official_folder(), out, "--dtype", "fp32")
    log = capsys.readouterr().out
    assert "official Wan release layout" in log
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-t2v-a14b" and manifest["defaults"]["boundary"] == 0.875
    assert set(manifest["components"]) == {"transformer", "transformer_2", "text_encoder", "vae", "tokenizer"}
    # the same weights as the diffusers conversion, tensor for tensor: transformer, T5 (.pth) and VAE (.pth)
    for component in ("transformer", "text_encoder", "vae"):
        ours, want = load_all(out, component), load_all(from_diffusers, component)
        assert ours.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(ours[k], want[k], err_msg=f"{component} {k}")
        assert json.loads((out / component / "config.json").read_text()) == json.loads(
            (from_diffusers / component / "config.json").read_text()
        ), component
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(dict(tiny.transformer_2.state_dict()))) < 1e-5
    assert (out / "tokenizer" / "spiece.model").read_bytes() == tiny.spiece.read_bytes()


@pytest.mark.parametrize("kind", ["bf16", "legacy", "new", "e4m3fn", "e5m2"])
def test_single_files_match_dequantized_reference(tiny, tiny_registry, kind, capsys):
    """ComfyUI bf16 and fp8-scaled files (legacy and new), and plain fp8 casts: dequantized at conversion, and
    kept as fp8 codes (--quantize fp8), both give the reference whose weights were dequantized the same way;
    the two conversions agree bit for bit."""
    path, reference = tiny.comfy(kind)
    official = tiny.official_folder()
    common = ["--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
              "--vae", official / "Wan2.1_VAE.pth", "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32"]
    plain = tiny.root / f"mlx_{kind}"
    convert(plain, *common)
    log = capsys.readouterr().out
    assert "prefix 'model.diffusion_model.' removed" in log
    expected_scheme = {"bf16": "bf16", "legacy": "legacy: scaled_fp8", "new": "comfy_quant", "e4m3fn": "plain fp8 cast",
                       "e5m2": "plain fp8 cast"}[kind]
    assert expected_scheme in log
    ref = tiny.reference(reference)
    ours = tiny.ours(plain)
    assert rel_err(ours, ref) < 1e-5
    if kind == "bf16":
        return
    stored = tiny.root / f"mlx_{kind}_fp8"
    convert(stored, *common, "--quantize", "fp8")
    record = json.loads((stored / "transformer" / "quantization.json").read_text())
    assert record["mode"] == "fp8" and len(record["layers"]) == 2 * 10
    fmt = "e5m2" if kind == "e5m2" else "e4m3fn"
    assert set(record["layers"].values()) == {fmt}
    # the codes are the file's, byte for byte
    weights = load_all(stored, "transformer")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        codes = f.get_tensor("model.diffusion_model.blocks.1.ffn.2.weight").view(torch.uint8).numpy()
    np.testing.assert_array_equal(weights["blocks.1.ffn.fc2.weight"], codes)
    np.testing.assert_array_equal(tiny.ours(stored), ours)


def test_fp8_storage_from_float_weights(tiny, tiny_registry):
    """--quantize fp8 of a bf16 checkpoint: codes of W / s with s = max|W| / 448, as ComfyUI encodes."""
    path, reference = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / "mlx_bf16_to_fp8"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32", "--quantize", "fp8")
    weights = load_all(out, "transformer")
    dequantized = dict(reference)
    for key in reference:
        if re.fullmatch(r"blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net\.(0\.proj|2))\.weight", key):
            codes, scale, deq = scaled_fp8(reference[key])
            target = key.replace("attn1.to_out.0", "self_attn.o").replace("attn2.to_out.0", "cross_attn.o")
            target = re.sub(r"attn1\.to_", "self_attn.", re.sub(r"attn2\.to_", "cross_attn.", target))
            target = target.replace("ffn.net.0.proj", "ffn.fc1").replace("ffn.net.2", "ffn.fc2")
            np.testing.assert_array_equal(weights[target], codes.view(torch.uint8).numpy())
            assert weights[target[: -len("weight")] + "weight_scale"] == scale.item()
            dequantized[key] = deq
    assert rel_err(tiny.ours(out), tiny.reference(dequantized)) < 1e-5
    assert not (out / "vae").exists()  # a folder without a VAE: latents only


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_affine_quantization_within_bounds(tiny, tiny_registry, mode):
    path, reference = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / f"mlx_{mode}"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32", "--quantize", mode, "--group-size", "32")
    record = json.loads((out / "transformer" / "quantization.json").read_text())
    bits = {"q8": 8, "q4": 4}[mode]
    assert record == {"mode": "affine", "bits": bits, "group_size": 32, "layers": record["layers"]} and len(record["layers"]) == 20
    weights = {k: mx.array(v) for k, v in load_all(out, "transformer").items()}
    # the reference with the dequantized weights: fp32 rounding apart, the same output
    dequantized = dict(reference)
    names = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
             "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
             "cross_attn.o": "attn2.to_out.0", "ffn.fc1": "ffn.net.0.proj", "ffn.fc2": "ffn.net.2"}
    for layer in record["layers"]:
        n, rest = re.fullmatch(r"blocks\.(\d+)\.(.*)", layer).groups()
        w = mx.dequantize(weights[f"{layer}.weight"], weights[f"{layer}.scales"], weights[f"{layer}.biases"], group_size=32, bits=bits)
        dequantized[f"blocks.{n}.{names[rest]}.weight"] = torch.from_numpy(np.array(w))
    ours = tiny.ours(out)
    assert rel_err(ours, tiny.reference(dequantized)) < 1e-4
    err = rel_err(ours, tiny.reference(reference))
    print(f"{mode}: relative error against the unquantized model {err:.2e}")
    assert err < QUANT_BOUNDS[mode]
    assert weights["blocks.0.self_attn.q.weight"].dtype == mx.uint32
    assert weights["head.linear.weight"].dtype == mx.float32  # the head stays in --dtype


def test_two_experts_and_comfy_text_encoder_and_vae(tiny, tiny_registry, capsys):
    """An A14B-style model from ComfyUI files only: both experts fp8-scaled, a UMT5 file in transformers names
    stored as scaled fp8 with its SentencePiece model embedded, and a bf16 VAE safetensors in official names."""
    high, ref_high = tiny.comfy("legacy")
    low, ref_low = tiny.comfy("legacy", model="transformer_2")
    te = {k: v for k, v in tiny.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    stored = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "spiece_model": torch.frombuffer(bytearray(tiny.spiece.read_bytes()), dtype=torch.uint8)}
    expected_te = {}
    for k, w in te.items():
        if re.search(r"(SelfAttention\.[qkvo]|DenseReluDense\.w[io](_[01])?)\.weight$", k):
            codes, scale, deq = scaled_fp8(w)
            stored[k], stored[k[: -len("weight")] + "scale_weight"] = codes, scale
            expected_te[k] = deq
        else:
            stored[k] = w.to(torch.float16)
            expected_te[k] = stored[k].float()
    te_path = tiny.root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(te_path))
    vae_path = tiny.root / "wan_2.1_vae.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in official_vae21(tiny.vae.state_dict(), 1).items()}, str(vae_path))

    out = tiny.root / "mlx_comfy_a14b"
    convert(out, "--base", "tiny-wan-a14b", "--transformer", high, "--transformer-2", low, "--text-encoder", te_path,
            "--vae", vae_path, "--dtype", "fp32")
    log = capsys.readouterr().out
    assert "tokenizer: the SentencePiece model embedded" in log
    assert (out / "tokenizer" / "spiece.model").read_bytes() == tiny.spiece.read_bytes()
    assert rel_err(tiny.ours(out), tiny.reference(ref_high)) < 1e-5
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(ref_low)) < 1e-5
    te_ours = load_all(out, "text_encoder")
    np.testing.assert_array_equal(te_ours["blocks.1.ffn.fc2.weight"], expected_te["encoder.block.1.layer.1.DenseReluDense.wo.weight"].numpy())
    np.testing.assert_array_equal(te_ours["token_embedding.weight"], expected_te["shared.weight"].numpy())
    vae_ours = load_all(out, "vae")
    np.testing.assert_array_equal(
        vae_ours["decoder.up.1.resnets.0.shortcut.weight"],
        tiny.vae.state_dict()["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].to(torch.bfloat16).float().permute(0, 2, 3, 4, 1).numpy(),
    )
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "tiny-wan-a14b" and manifest["defaults"]["boundary"] == 0.875 and manifest["vae_stride"] == [4, 8, 8]


def test_folder_of_single_files_is_classified_by_keys(tiny, tiny_registry, capsys):
    """A folder of loose files: which is the transformer, the text encoder and the VAE is read from the keys."""
    folder = tiny.root / "loose"
    folder.mkdir()
    path, reference = tiny.comfy("new")
    (folder / "diffusion_model.safetensors").write_bytes(path.read_bytes())
    official = tiny.official_folder()
    (folder / "text_encoder.pth").write_bytes((official / "models_t5_umt5-xxl-enc-bf16.pth").read_bytes())
    (folder / "vae.pth").write_bytes((official / "Wan2.1_VAE.pth").read_bytes())
    (folder / "spiece.model").write_bytes(tiny.spiece.read_bytes())
    out = tiny.root / "mlx_loose"
    convert(folder, out, "--base", "tiny-wan", "--dtype", "fp32")
    assert "single-file checkpoints" in capsys.readouterr().out
    assert rel_err(tiny.ours(out), tiny.reference(reference)) < 1e-5
    assert set(json.loads((out / "mlxvid.json").read_text())["components"]) == {"transformer", "text_encoder", "vae", "tokenizer"}


@pytest.mark.parametrize("mode", ["q4", "fp8"])
def test_quantized_folder_runs_in_the_pipeline(tiny, tiny_registry, mode):
    """The pipeline loads quantized folders through ModelFolder.load_module and denoises without NaN."""
    from mlx_video.pipelines.wan import WanPipeline, WanSettings

    path, _ = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / f"mlx_pipeline_{mode}"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--quantize", mode, "--group-size", "32")
    pipe = WanPipeline.from_pretrained(str(out))
    result = pipe.generate(WanSettings(prompt="a cat", width=32, height=32, frames=5, steps=2, seed=1))
    assert np.isfinite(result.latents).all() and result.latents.shape == (1, 16, 2, 4, 4)


def test_header_written_by_the_streaming_writer_reads_everywhere(tiny, from_diffusers):
    """Our hand-written shards: 8-byte aligned header, readable by safetensors, MLX and our strict reader."""
    from safetensors.numpy import load_file

    from mlx_video.io.safetensors import SafetensorsFile

    shard = next((from_diffusers / "transformer").glob("model-*.safetensors"))
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert (8 + n) % 8 == 0
    a, b = load_file(str(shard)), mx.load(str(shard))
    assert a.keys() == b.keys() == set(SafetensorsFile(shard).keys())


def test_official_single_model_layout(tiny, from_diffusers):
    """TI2V-5B's release layout: the model shards and their WanModel config.json at the top of the folder."""
    import shutil

    official = tiny.official_folder()
    root = tiny.root / "official_5b"
    shutil.copytree(official / "high_noise_model", root)
    shutil.copytree(official / "google", root / "google")
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copyfile(official / name, root / name)
    out = tiny.root / "mlx_official_5b"
    convert(root, out, "--dtype", "fp32")
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-ti2v-5b" and manifest["defaults"]["boundary"] is None and manifest["defaults"]["per_frame_timesteps"]
    ours, want = load_all(out, "transformer"), load_all(from_diffusers, "transformer")
    assert ours.keys() == want.keys() and all(np.array_equal(ours[k], want[k]) for k in want)


def test_folder_of_comfy_files_with_two_experts(tiny, tiny_registry):
    """ComfyUI's file names say which expert is which."""
    import shutil

    folder = tiny.root / "loose_a14b"
    (folder / "google").mkdir(parents=True)
    high, ref_high = tiny.comfy("legacy")
    low, ref_low = tiny.comfy("e4m3fn", model="transformer_2")
    shutil.copyfile(high, folder / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    shutil.copyfile(low, folder / "wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors")
    official = tiny.official_folder()
    shutil.copyfile(official / "models_t5_umt5-xxl-enc-bf16.pth", folder / "umt5.pth")
    shutil.copytree(official / "google" / "umt5-xxl", folder / "google" / "umt5-xxl")
    out = tiny.root / "mlx_loose_a14b"
    convert(folder, out, "--base", "tiny-wan-a14b", "--dtype", "fp32")
    assert rel_err(tiny.ours(out), tiny.reference(ref_high)) < 1e-5
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(ref_low)) < 1e-5


def test_component_file_replaces_a_folder_component(tiny, capsys):
    """The official layout with its high-noise expert replaced by a ComfyUI fp8 file (no config.json: its head
    count comes from the other expert's)."""
    path, reference = tiny.comfy("new")
    out = tiny.root / "mlx_official_replaced"
    convert(tiny.official_folder(), out, "--transformer", path, "--dtype", "fp32", "--quantize", "fp8")
    assert "official Wan release layout + --transformer" in capsys.readouterr().out
    assert rel_err(tiny.ours(out), tiny.reference(reference)) < 1e-5  # the file's fp8 codes, kept
    # the low-noise expert came in fp32 and was encoded to fp8 here: close to its reference, not equal
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(dict(tiny.transformer_2.state_dict()))) < 2e-2


def test_quantized_text_encoder_stays_close(a14b):
    """q8 applies to UMT5's linear layers too; its embeddings stay within a small bound of the fp32 ones."""
    from mlx_video.cli import main as cli_main
    from mlx_video.pipelines.wan import WanPipeline

    root, _ = a14b
    out = root / "mlx_q8"
    if not out.exists():
        cli_main(["convert", str(root / "diffusers"), str(out), "--dtype", "fp32", "--quantize", "q8", "--group-size", "32"])
    quant = json.loads((out / "text_encoder" / "quantization.json").read_text())
    assert quant, "no text-encoder layer was quantized"
    prompts = ["a corgi surfs a wave at sunset", "static, blurry"]
    want = np.array(WanPipeline.from_pretrained(str(root / "mlx")).encode_text(prompts))
    got = np.array(WanPipeline.from_pretrained(str(out)).encode_text(prompts))
    err = rel_err(got, want)
    bf16 = root / "mlx_bf16"
    if not bf16.exists():
        cli_main(["convert", str(root / "diffusers"), str(bf16), "--dtype", "bf16"])
    bf16_err = rel_err(np.array(WanPipeline.from_pretrained(str(bf16)).encode_text(prompts).astype(mx.float32)), want)
    print(f"text encoder: q8 relative error {err:.2e}, bf16 {bf16_err:.2e}")
    # T5 attention has no 1/sqrt(d) scaling, so this random tiny model is sensitive to any rounding: q8 is judged
    # against what plain bf16 storage of the same weights costs (measured: q8 2.9e-2, bf16 2.3e-2).
    assert 0 < err < 2 * bf16_err


def test_official_layout_with_legacy_format_vae(tiny, from_diffusers, capsys):
    """The official Wan2.1_VAE.pth / Wan2.2_VAE.pth may be in torch.save's legacy (pre-1.6, non-zip) format: such a
    folder converts to the same VAE, read without torch and without unpickling anything but tensor records."""
    import shutil

    root = tiny.root / "official_legacy_vae"
    if not root.exists():
        shutil.copytree(tiny.official_folder(), root)
    vae = root / "Wan2.1_VAE.pth"
    torch.save(official_vae21(tiny.vae.state_dict(), 1), vae, _use_new_zipfile_serialization=False)
    assert not vae.read_bytes().startswith(b"PK")
    out = tiny.root / "mlx_official_legacy_vae"
    convert(root, out, "--dtype", "fp32")
    assert "official Wan release layout" in capsys.readouterr().out
    ours, want = load_all(out, "vae"), load_all(from_diffusers, "vae")
    assert ours.keys() == want.keys() and ours
    for k in want:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=f"vae {k}")
    assert json.loads((out / "vae" / "config.json").read_text()) == json.loads((from_diffusers / "vae" / "config.json").read_text())
