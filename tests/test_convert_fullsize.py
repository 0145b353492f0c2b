"""Full-size coverage of every checkpoint format, without the weights.

For each published model and each format a user can have, a synthetic header-only file is written: the real
names, dtypes and shapes (taken from the reference models built on torch's meta device, renamed as each format
names them) over sparse, empty data. The converter then plans the conversion: every key must map onto our
model, none may be missing or unknown, and every shape must match. Nothing is evaluated or written, so a
28 GB expert costs a few kilobytes of disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mlx_video.convert.convert import plan  # noqa: E402
from test_convert_formats import FP8_LAYERS, official_transformer_name, official_umt5, official_vae21  # noqa: E402
from tiny_wan import train_spiece  # noqa: E402

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}
COMFY_QUANT = json.dumps({"format": "float8_e4m3fn"}).encode()


def write_description(path: Path, tensors: dict[str, tuple[str, tuple, bytes | None]]) -> Path:
    """A safetensors file with these (dtype, shape, data) entries; `None` data is left as a sparse hole."""
    header, offset, blobs = {}, 0, []
    for name, (code, shape, data) in tensors.items():
        n = SIZES[code]
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        if data is not None:
            assert len(data) == n
            blobs.append((offset, data))
        offset += n
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for at, data in blobs:
            f.seek(8 + len(body) + at)
            f.write(data)
        f.truncate(8 + len(body) + offset)
    return path


def meta_state(cls, **config) -> dict:
    with torch.device("meta"):
        return dict(cls(**config).state_dict())


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
    from mlx_video.models.wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    with torch.device("meta"):
        vae = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16,
                               latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))  # fmt: skip
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(vae.config, _class_name="AutoencoderKLWan")))
    write_description(path / "diffusion_pytorch_model.safetensors",
                      {k: ("F32", tuple(v.shape), None) for k, v in vae.state_dict().items()})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fullsize")
    (root / "tok").mkdir()
    train_spiece(root / "tok" / "spiece.model")
    return root


def planned(conversion) -> dict[str, int]:
    return {c.name: len(c.tensors) for c in conversion.components}


@pytest.mark.parametrize("fmt", ["official_bf16", "comfy_fp16", "comfy_fp8_legacy", "comfy_fp8_new", "plain_e4m3fn"])
def test_a14b_t2v_every_transformer_format(files, fmt):
    expert = transformer_file(files / f"t2v_{fmt}.safetensors", "wan2.2-t2v-a14b", fmt)
    conversion = plan(None, components={"transformer": expert, "transformer_2": expert,
                                        "text_encoder": umt5_file(files / "umt5_official.safetensors", "official"),
                                        "vae": vae_file(files / "vae21.safetensors", "2.1")},
                      tokenizer=files / "tok" / "spiece.model", base="wan2.2-t2v-a14b")  # fmt: skip
    counts = planned(conversion)
    # 27 tensors per block (modulation; q, k, v, o with biases and the q/k norms, twice; the cross-attention norm;
    # the FFN) and 15 outside the blocks, in every format: scales fold into their weight
    assert counts["transformer"] == counts["transformer_2"] == 40 * 27 + 15
    assert counts["text_encoder"] == 24 * 10 + 2
    assert conversion.manifest["model"] == "wan2.2-t2v-a14b"


@pytest.mark.parametrize("fmt", ["comfy_fp8_scaled", "transformers"])
def test_umt5_xxl_formats(files, fmt):
    expert = transformer_file(files / "5b_official_bf16.safetensors", "wan2.2-ti2v-5b", "official_bf16")
    spiece = (files / "tok" / "spiece.model").read_bytes()
    embedded = fmt == "comfy_fp8_scaled"  # the Comfy file carries its SentencePiece model: no --tokenizer
    conversion = plan(None, components={"transformer": expert,
                                        "text_encoder": umt5_file(files / f"umt5_{fmt}.safetensors", fmt, spiece),
                                        "vae": vae_file(files / "vae22", "2.2")},
                      tokenizer=None if embedded else files / "tok" / "spiece.model", base="wan2.2-ti2v-5b")  # fmt: skip
    if embedded:
        assert conversion.copy_files["tokenizer"] == [(spiece, "spiece.model")]
    counts = planned(conversion)
    assert counts["text_encoder"] == 24 * 10 + 2
    assert counts["transformer"] == 30 * 27 + 15
    assert counts["vae"] > 0


def test_i2v_a14b_is_recognised_from_its_shapes(files):
    expert = transformer_file(files / "i2v_comfy_fp8_legacy.safetensors", "wan2.2-i2v-a14b", "comfy_fp8_legacy")
    conversion = plan(None, components={"transformer": expert, "transformer_2": expert,
                                        "text_encoder": umt5_file(files / "umt5_official.safetensors", "official"),
                                        "vae": vae_file(files / "vae21.safetensors", "2.1")},
                      tokenizer=files / "tok" / "spiece.model")  # fmt: skip
    assert conversion.manifest["model"] == "wan2.2-i2v-a14b"


def test_s2v_official_release_layout(files):
    """Wan2.2-S2V-14B as the release lays it out: the sharded transformer with its config.json (the published
    S2V numbers; keys and shapes recorded from the official `WanModel_S2V` on the meta device) and the
    wav2vec2-large-xlsr-53-english folder (transformers' `Wav2Vec2ForCTC` on the meta device, the weight-norm
    pair of its positional convolution as torch >= 2.1 saves it). The UMT5 and VAE come as single files."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    src = files / "Wan2.2-S2V-14B"
    src.mkdir()
    keys = json.loads((Path(__file__).parent / "fixtures" / "s2v" / "s2v_14b_keys.json").read_text())
    names = sorted(keys)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        write_description(src / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors",
                          {k: ("BF16", tuple(keys[k]), None) for k in part})
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel_S2V", "model_type": "s2v", "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
        "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16, "text_dim": 4096, "text_len": 512,
        "patch_size": [1, 2, 2], "eps": 1e-6, "qk_norm": True, "cross_attn_norm": True, "audio_dim": 1024,
        "num_audio_token": 4, "enable_adain": True, "adain_mode": "attn_norm", "zero_timestep": True,
        "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39], "cond_dim": 16,
        "enable_framepack": True, "framepack_drop_mode": "padd", "enable_motioner": False, "add_last_motion": True,
    }))
    w2v = src / "wav2vec2-large-xlsr-53-english"
    w2v.mkdir()
    config = Wav2Vec2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33, do_stable_layer_norm=True,
        feat_extract_norm="layer")
    (w2v / "config.json").write_text(config.to_json_string())
    write_description(w2v / "model.safetensors",
                      {k: ("F32", tuple(v.shape), None) for k, v in meta_state(Wav2Vec2ForCTC, config=config).items()})
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    (src / "google" / "umt5-xxl" / "spiece.model").write_bytes((files / "tok" / "spiece.model").read_bytes())

    conversion = plan(src, components={"text_encoder": umt5_file(files / "umt5_official.safetensors", "official"),
                                       "vae": vae_file(files / "vae21.safetensors", "2.1")})
    counts = planned(conversion)
    assert conversion.manifest["model"] == "wan2.2-s2v-14b" and conversion.manifest["task"] == "s2v"
    assert counts["transformer"] == len(keys) == 1260  # every tensor of the release, the published count
    # the feature encoder (7 convs, 3 layer-norms... as stored), projection, positional conv (folded), 24 layers
    assert counts["audio_encoder"] == sum(1 for k in meta_state(Wav2Vec2ForCTC, config=config)
                                          if not k.startswith(("lm_head", "wav2vec2.masked_spec_embed"))) - 1
    assert conversion.manifest["size_multiple"] == 64 and conversion.manifest["frame_offset"] == 0
