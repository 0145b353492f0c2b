"""The ByT5 glyph path (HunyuanVideo 1.5): diffusers' own `_get_byt5_prompt_embeds` with transformers'
`ByT5Tokenizer` (Glyph-SDXL-v2's added tokens) and a tiny `T5EncoderModel`, against our glyph extraction,
tokenizer and T5Encoder; the Glyph-SDXL-v2 `byt5_model.pt` layouts through our pickle reader; full-size keys."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts
from mlx.utils import tree_flatten
from transformers import ByT5Tokenizer as HFByT5Tokenizer, T5Config as HFT5Config, T5EncoderModel
from transformers import T5ForConditionalGeneration

from mlx_video.errors import MlxVideoError
from mlx_video.text_encoders.byt5 import (
    BYT5_KEYS,
    ByT5Tokenizer,
    byt5_config,
    convert_byt5_weights,
    encode_glyphs,
    glyph_text,
    glyph_tokens_from_folder,
    read_glyph_checkpoint,
    read_glyph_release,
)
from mlx_video.text_encoders.t5 import T5Encoder
from support.arrays import rel_err

PARITY_RTOL = 1e-5
COLORS = {"white": 0, "black": 1, "darkslategray": 2}
FONTS = {"en-Montserrat-Bold": 0, "zh-SourceHanSans": 1, "ja-NotoSerif": 2, "en-Roboto": 3}
PROMPTS = [
    'A neon sign that reads "OPEN 24h" above a door.',
    "A chalkboard with “Café del Mar” and “Menü” written on it, and again “Café del Mar”.",
    "A quiet street at night, no text anywhere.",
    'A poster: "<color-1>SALE</s>" and "" and "Ünïcödé 字".',
    'Repeated "A" and "A" and "B"',
]


@pytest.fixture(scope="module")
def glyph_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("Glyph-SDXL-v2")
    (root / "assets").mkdir()
    (root / "assets" / "color_idx.json").write_text(json.dumps(COLORS))
    (root / "assets" / "multilingual_10-lang_idx.json").write_text(json.dumps(FONTS))
    return root


@pytest.fixture(scope="module")
def byt5(glyph_assets):
    hf_tokenizer = HFByT5Tokenizer()
    added = glyph_tokens_from_folder(glyph_assets)
    hf_tokenizer.add_tokens(added, special_tokens=True)
    torch.manual_seed(0)
    config = HFT5Config(vocab_size=len(hf_tokenizer), d_model=40, d_kv=12, num_heads=3, d_ff=56, num_layers=3,
                        relative_attention_num_buckets=16, relative_attention_max_distance=40,
                        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False)
    reference = T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            elif "shared" not in name and "embed" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    state = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    weights = convert_byt5_weights(state)
    ours = T5Encoder(byt5_config(config.to_dict(), weights))
    ours.load_weights(list(weights.items()), strict=True)
    return reference, ours, hf_tokenizer, ByT5Tokenizer(added)


def test_glyph_text_matches_diffusers():
    for prompt in [*PROMPTS, 'Only "" empty', 'Mixed “curly" and "straight”']:
        assert glyph_text(prompt) == extract_glyph_texts(prompt), prompt
    assert glyph_text(PROMPTS[2]) is None


def test_glyph_tokens_follow_the_official_naming(glyph_assets):
    assert glyph_tokens_from_folder(glyph_assets) == [
        "<color-0>", "<color-1>", "<color-2>", "<en-font-0>", "<zh-font-1>", "<ja-font-2>", "<en-font-3>"]
    (glyph_assets / "bad").mkdir()
    with pytest.raises(MlxVideoError, match="color_idx.json"):
        glyph_tokens_from_folder(glyph_assets / "bad")


def test_tokenizer_matches_transformers(byt5):
    _, _, hf_tokenizer, ours = byt5
    texts = [glyph_text(p) for p in PROMPTS if glyph_text(p)] + [
        "x" * 50, " </s> a <pad>b<unk> ", "<en-font-3><extra_id_7> <color-0> end</s>"]
    for max_length in (12, 64):
        expected = hf_tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True)
        ids, mask = ours(texts, max_length)
        np.testing.assert_array_equal(ids, np.array(expected.input_ids))
        np.testing.assert_array_equal(mask, np.array(expected.attention_mask))
    assert ours.vocab_size == len(hf_tokenizer)


def test_tokenizer_reads_saved_added_tokens(byt5, tmp_path):
    _, _, hf_tokenizer, ours = byt5
    hf_tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    loaded = ByT5Tokenizer.from_folder(tmp_path / "tokenizer_2")
    assert loaded.ids == ours.ids
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "added_tokens.json").write_text(json.dumps({"<color-0>": 384, "<color-1>": 386}))
    with pytest.raises(MlxVideoError, match="ids 384 on"):
        ByT5Tokenizer.from_folder(tmp_path / "gap")


def test_glyph_path_matches_diffusers(byt5):
    reference, ours, hf_tokenizer, tokenizer = byt5
    with torch.no_grad():
        expected, expected_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
            hf_tokenizer, reference, PROMPTS, device="cpu", tokenizer_max_length=48)
    got, mask = encode_glyphs(ours, tokenizer, PROMPTS, max_length=48)
    assert got.shape == tuple(expected.shape) == (5, 48, 40)
    np.testing.assert_array_equal(np.array(mask), expected_mask.numpy())
    assert not np.array(got)[2].any() and np.array(mask)[2].sum() == 0  # no quotes: zeros
    rel = rel_err(np.array(got), expected.numpy())
    print(f"ByT5 glyph path parity: rel {rel:.2e}")
    assert rel < PARITY_RTOL


@pytest.mark.parametrize("layout", ["bare", "training"])
def test_glyph_checkpoint_read_without_torch_load(byt5, tmp_path, layout):
    """byt5_model.pt as the official loader takes it: a T5Stack state dict, bare or under `state_dict` with the
    `module.text_tower.encoder.` prefix beside other modules' tensors (which it drops)."""
    reference, ours, _, _ = byt5
    stack = reference.encoder.state_dict()
    saved = stack if layout == "bare" else {"state_dict": {
        **{f"module.text_tower.encoder.{k}": v for k, v in stack.items()},
        "module.byt5_mapper.fc1.weight": torch.zeros(3, 4)}, "epoch": 3}
    torch.save(saved, tmp_path / "byt5_model.pt")
    weights = read_glyph_checkpoint(tmp_path / "byt5_model.pt")
    expected = dict(tree_flatten(ours.parameters()))
    assert sorted(weights) == sorted(expected)
    for key, value in weights.items():
        np.testing.assert_array_equal(np.array(value), np.array(expected[key]), err_msg=key)


def test_glyph_release_layout(byt5, glyph_assets, tmp_path):
    """text_encoder/byt5-small/config.json + Glyph-SDXL-v2/{checkpoints/byt5_model.pt, assets/}: the vocabulary
    grown by the assets' tokens must match the checkpoint's embedding."""
    reference, ours, _, tokenizer = byt5
    (tmp_path / "byt5-small").mkdir()
    (tmp_path / "byt5-small" / "config.json").write_text(json.dumps({**reference.config.to_dict(), "vocab_size": 384}))
    with pytest.raises(MlxVideoError, match="byt5_model.pt"):
        read_glyph_release(tmp_path)
    glyph = tmp_path / "Glyph-SDXL-v2"
    (glyph / "checkpoints").mkdir(parents=True)
    (glyph / "assets").symlink_to(glyph_assets / "assets")
    torch.save(reference.encoder.state_dict(), glyph / "checkpoints" / "byt5_model.pt")
    config, weights, added = read_glyph_release(tmp_path)
    assert config == ours.config and list(ByT5Tokenizer(added).ids) == list(tokenizer.ids)
    (glyph / "assets").unlink()
    (glyph / "assets").mkdir()
    (glyph / "assets" / "color_idx.json").write_text(json.dumps(COLORS))
    (glyph / "assets" / "multilingual_10-lang_idx.json").write_text(json.dumps({"en-Roboto": 0}))
    with pytest.raises(MlxVideoError, match="embeds 391 tokens"):
        read_glyph_release(tmp_path)


def test_glyph_checkpoint_with_foreign_keys_refused(tmp_path):
    torch.save({"vision.proj.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(MlxVideoError, match="not a ByT5 encoder"):
        read_glyph_checkpoint(tmp_path / "other.pt")


def test_full_size_keys_and_shapes():
    """google/byt5-small (T5ForConditionalGeneration, encoder-decoder) and its encoder grown by Glyph tokens."""
    small = dict(vocab_size=384, d_model=1472, d_kv=64, num_heads=6, d_ff=3584, num_layers=12,
                 num_decoder_layers=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        full = T5ForConditionalGeneration(HFT5Config(**small))
        grown = T5EncoderModel(HFT5Config(**{**small, "vocab_size": 384 + 1000}))
    for model in (full, grown):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert BYT5_KEYS.unknown_keys(shapes) == []
        converted = convert_byt5_weights({k: mx.zeros(s) for k, s in shapes.items()})
        encoder = T5Encoder(byt5_config(small, converted))
        ours = {k: tuple(v.shape) for k, v in tree_flatten(encoder.parameters())}
        mapped = {k: tuple(v.shape) for k, v in converted.items()}
        assert mapped == ours
    assert ours["token_embedding.weight"] == (1384, 1472)
    print(f"ByT5-small encoder parameters: {sum(map(math.prod, ours.values())) / 1e6:.1f}M")
