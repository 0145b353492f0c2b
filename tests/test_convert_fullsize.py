"""Full-size coverage of every checkpoint format, without the weights.

For each published model and each format a user can have, a synthetic header-only file is written: the real
names, dtypes and shapes (taken from the reference models built on torch's meta device, renamed as each format
names them) over sparse, empty data. The converter then plans the conversion: every key must map onto our
model, none may be missing or unknown, and every shape must match. Nothing is evaluated or written, so a
28 GB expert costs a few kilobytes of disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mlx_video.convert.convert import plan  # noqa: E402
from support.wan import train_spiece  # noqa: E402
from support.tensor_files import meta_state, write_description  # noqa: E402
from support.wan_checkpoints import transformer_file, umt5_file, vae_file  # noqa: E402


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
