"""UMT5-XXL text encoder, tokenizer and prompt cleaning against transformers / diffusers (CPU, tiny configs)."""

from __future__ import annotations

import copy
import json
import re
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_video.families.wan.umt5_keys import OFFICIAL_UMT5, TRANSFORMERS_UMT5, convert_umt5_weights
from mlx_video.errors import MlxVideoError
from mlx_video.text_encoders.prompt import clean_prompt
from mlx_video.text_encoders.tokenizer import T5Tokenizer
from mlx_video.text_encoders.umt5 import UMT5Config, UMT5Encoder, relative_position_buckets
from support.text import PROMPTS, SENTENCES, train_sentencepiece  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    num_heads=6,  # attention width 48 != d_model, so a transposed projection cannot slip through
    d_ff=40,
    num_layers=3,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    num_heads=64,
    d_ff=10240,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)
# Long enough that offsets reach past max_distance (128): exact, log-spaced and capped buckets all occur.
SEQ_LEN = 160
VALID_LENGTHS = (SEQ_LEN, 37)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny transformers UMT5EncoderModel saved with save_pretrained, plus reference inputs."""
    torch.manual_seed(0)
    config = transformers.UMT5Config(**TINY)
    ref = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(2.0 * torch.randn_like(p))
            elif p.ndim == 2 and "shared" not in name and "embed_tokens" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_umt5")
    ref.save_pretrained(folder)

    rng = np.random.default_rng(0)
    input_ids = rng.integers(2, TINY["vocab_size"], size=(len(VALID_LENGTHS), SEQ_LEN)).astype(np.int32)
    mask = np.zeros_like(input_ids)
    for row, n in enumerate(VALID_LENGTHS):
        mask[row, :n] = 1
        input_ids[row, n - 1] = 1  # EOS
        input_ids[row, n:] = 0  # <pad>
    return ref, folder, input_ids, mask


def reference_output(ref, input_ids, mask, attn_implementation: str) -> np.ndarray:
    ref.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.float().numpy()


def load_ours(folder, keymap=TRANSFORMERS_UMT5, weights=None) -> UMT5Encoder:
    config = UMT5Config.from_transformers(json.loads((folder / "config.json").read_text()))
    model = UMT5Encoder(config)
    if weights is None:
        weights = mx.load(str(folder / "model.safetensors"))
    model.load_weights(list(convert_umt5_weights(weights, keymap).items()), strict=True)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_with_transformers_fp32(tiny_checkpoint, attn_implementation):
    ref, folder, input_ids, mask = tiny_checkpoint
    expected = reference_output(ref, input_ids, mask, attn_implementation)
    model = load_ours(folder)
    out = model(mx.array(input_ids), mx.array(mask))
    assert out.dtype == mx.float32 and out.shape == (2, SEQ_LEN, TINY["d_model"])
    out = np.array(out)

    valid = mask.astype(bool)
    err_valid = relative_error(out[valid], expected[valid])
    # Padded query positions still attend to the valid keys, so they are defined and compared too.
    err_all = relative_error(out, expected)
    print(f"\nUMT5 fp32 vs transformers ({attn_implementation}): worst relative error "
          f"valid {err_valid:.2e}, all positions {err_all:.2e}")
    assert err_valid < 1e-5
    assert err_all < 1e-5


def test_runs_in_bfloat16(tiny_checkpoint):
    """bf16 parameters: no worse than transformers' own bf16 run of the same weights (both against fp32)."""
    ref, folder, input_ids, mask = tiny_checkpoint
    valid = mask.astype(bool)
    expected = reference_output(ref, input_ids, mask, "eager")
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    ref_err = relative_error(reference_output(ref_bf16, input_ids, mask, "eager")[valid], expected[valid])

    model = load_ours(folder)
    model.set_dtype(mx.bfloat16)
    assert model.blocks[0].attn.q.weight.dtype == mx.bfloat16
    out = model(mx.array(input_ids), mx.array(mask))
    assert out.dtype == mx.float32
    out = np.array(out)
    assert np.isfinite(out).all()
    err = relative_error(out[valid], expected[valid])
    print(f"\nUMT5 bf16 vs fp32 transformers: worst relative error {err:.2e} (transformers bf16: {ref_err:.2e})")
    assert err < 1.25 * ref_err


def test_padding_does_not_leak(tiny_checkpoint):
    """A prompt's valid positions do not depend on what the padded positions hold."""
    _, folder, input_ids, mask = tiny_checkpoint
    model = load_ours(folder)
    other = input_ids.copy()
    other[1, VALID_LENGTHS[1]:] = 77
    a = np.array(model(mx.array(input_ids), mx.array(mask)))[1, : VALID_LENGTHS[1]]
    b = np.array(model(mx.array(other), mx.array(mask)))[1, : VALID_LENGTHS[1]]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_trimmed_padding_gives_the_same_valid_positions(tiny_checkpoint):
    """Valid positions are the same whether the batch is padded to L or only to its longest prompt.

    Pipelines can therefore encode ids[:, :longest] instead of all 512 positions.
    """
    _, folder, input_ids, mask = tiny_checkpoint
    model = load_ours(folder)
    n = VALID_LENGTHS[1]
    full = np.array(model(mx.array(input_ids[1:]), mx.array(mask[1:])))[0, :n]
    trimmed = np.array(model(mx.array(input_ids[1:, :n]), mx.array(mask[1:, :n])))[0]
    np.testing.assert_allclose(trimmed, full, rtol=0, atol=1e-5)


def official_name(key: str) -> str:
    """transformers UMT5 name -> official Wan name, from the correspondence documented for wan/modules/t5.py."""
    table = [
        (r"shared\.weight", "token_embedding.weight"),
        (r"encoder\.final_layer_norm\.weight", "norm.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         r"blocks.\1.pos_embedding.embedding.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(\w)\.weight", r"blocks.\1.attn.\2.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    ]
    for pattern, target in table:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    raise KeyError(key)


def test_official_names_load_the_same_model(tiny_checkpoint):
    _, folder, input_ids, mask = tiny_checkpoint
    hf = mx.load(str(folder / "model.safetensors"))
    hf.pop("encoder.embed_tokens.weight", None)
    official = {official_name(k): v for k, v in hf.items()}
    assert "blocks.0.ffn.gate.0.weight" in official and "blocks.2.pos_embedding.embedding.weight" in official
    assert OFFICIAL_UMT5.unknown_keys(official) == []

    via_hf, via_official = load_ours(folder), load_ours(folder, OFFICIAL_UMT5, official)
    params_hf, params_official = tree_flatten(via_hf.parameters()), tree_flatten(via_official.parameters())
    for (name_a, a), (name_b, b) in zip(params_hf, params_official):
        assert name_a == name_b and mx.array_equal(a, b).item(), name_a
    np.testing.assert_array_equal(
        np.array(via_hf(mx.array(input_ids), mx.array(mask))),
        np.array(via_official(mx.array(input_ids), mx.array(mask))),
    )


def test_tied_embedding_stored_once_or_twice(tiny_checkpoint):
    _, folder, _, _ = tiny_checkpoint
    weights = mx.load(str(folder / "model.safetensors"))
    embedding = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    for stored in ({tied[0]}, {tied[1]}, set(tied)):
        variant = {k: v for k, v in weights.items() if k not in tied}
        variant.update({k: embedding for k in stored})
        converted = convert_umt5_weights(variant, TRANSFORMERS_UMT5)
        assert mx.array_equal(converted["token_embedding.weight"], embedding).item()
        assert len(converted) == 3 * 10 + 2


def test_unknown_keys_are_refused(tiny_checkpoint):
    _, folder, _, _ = tiny_checkpoint
    weights = mx.load(str(folder / "model.safetensors"))
    weights["encoder.block.0.layer.0.SelfAttention.q.bias"] = mx.zeros((48,))
    with pytest.raises(KeyError, match="q.bias"):
        convert_umt5_weights(weights, TRANSFORMERS_UMT5)


def test_full_size_key_coverage():
    """UMT5-XXL: every transformers key maps onto a parameter of ours with the same shape, none left over."""
    hf_config = transformers.UMT5Config(**XXL)
    with torch.device("meta"):
        ref = transformers.UMT5EncoderModel(hf_config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    config = UMT5Config.from_transformers(hf_config.to_dict())
    assert config == UMT5Config()
    ours = {k: tuple(v.shape) for k, v in tree_flatten(UMT5Encoder(config).parameters())}  # never evaluated

    assert TRANSFORMERS_UMT5.unknown_keys(ref_shapes) == []
    mapped = {}
    for key, shape in ref_shapes.items():
        target, _ = TRANSFORMERS_UMT5.target(key)
        assert ours.get(target) == shape, (key, target, shape, ours.get(target))
        mapped[target] = shape
    assert set(mapped) == set(ours)

    official = {official_name(k): s for k, s in ref_shapes.items() if k != "encoder.embed_tokens.weight"}
    assert OFFICIAL_UMT5.unknown_keys(official) == []
    assert {OFFICIAL_UMT5.target(k)[0]: s for k, s in official.items()} == ours
    assert sum(np.prod(s) for s in ours.values()) == 5_680_910_336  # 5.681B, worked out from google/umt5-xxl's config.json (the encoder)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 256), (16, 32)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    config = transformers.UMT5Config(
        **{**TINY, "relative_attention_num_buckets": num_buckets, "relative_attention_max_distance": max_distance}
    )
    attention = transformers.models.umt5.modeling_umt5.UMT5Attention(config, has_relative_attention_bias=True)
    length = 600
    positions = torch.arange(length)
    expected = attention._relative_position_bucket(positions[None, :] - positions[:, None]).numpy()
    np.testing.assert_array_equal(np.array(relative_position_buckets(length, num_buckets, max_distance)), expected)


def test_config_from_transformers_and_round_trip():
    config = UMT5Config.from_transformers(transformers.UMT5Config(**TINY).to_dict())
    assert (config.vocab_size, config.dim, config.head_dim, config.num_heads) == (128, 32, 8, 6)
    assert (config.ffn_dim, config.num_layers, config.num_buckets, config.max_distance) == (40, 3, 32, 128)
    assert config.eps == 1e-6
    assert UMT5Config.from_dict(config.to_dict()) == config
    assert UMT5Config().attn_dim == 4096


@pytest.mark.parametrize("kind", ["relu", "gated-silu", "gelu"])
def test_config_refuses_other_feed_forward(kind):
    with pytest.raises(ValueError, match="gated-gelu"):
        UMT5Config.from_transformers({**TINY, "feed_forward_proj": kind})


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """(reference, folder with spiece.model, folder with only tokenizer.json as transformers 5 saves it)."""
    pytest.importorskip("google.protobuf")  # transformers reads spiece.model through protobuf
    root = tmp_path_factory.mktemp("t5_tokenizer")
    spiece_folder = train_sentencepiece(root / "spiece", byte_fallback=False)
    ref = transformers.T5Tokenizer.from_pretrained(str(spiece_folder), extra_ids=0)
    assert (ref.pad_token_id, ref.eos_token_id) == (0, 1)
    json_folder = root / "json"
    ref.save_pretrained(str(json_folder))
    assert (json_folder / "tokenizer.json").is_file() and not (json_folder / "spiece.model").exists()
    return ref, spiece_folder, json_folder


def reference_tokens(ref, texts, max_length):
    enc = ref(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_attention_mask=True)
    return np.array(enc["input_ids"]), np.array(enc["attention_mask"])


@pytest.mark.parametrize("source", ["spiece", "json"])
@pytest.mark.parametrize("max_length", [16, 512])
def test_tokenizer_matches_transformers(tokenizer_folders, source, max_length):
    ref, spiece_folder, json_folder = tokenizer_folders
    ours = T5Tokenizer.from_folder(spiece_folder if source == "spiece" else json_folder)
    # The last prompt is longer than 512 tokens, so truncation is exercised at both lengths.
    texts = PROMPTS + [" ".join(SENTENCES[:4]) * 12]
    expected_ids, expected_mask = reference_tokens(ref, texts, max_length)
    assert expected_mask[-1].all()

    ids, mask = ours(texts, max_length=max_length)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(texts), max_length)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    assert ours.vocab_size == len(ref)
    # The reloaded tokenizer.json gives the same reference.
    reloaded = transformers.AutoTokenizer.from_pretrained(str(json_folder))
    np.testing.assert_array_equal(reference_tokens(reloaded, texts, max_length)[0], expected_ids)


def test_tokenizer_empty_prompt_is_eos_only(tokenizer_folders):
    _, spiece_folder, _ = tokenizer_folders
    ids, mask = T5Tokenizer.from_folder(spiece_folder)([""], max_length=8)
    assert ids.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_tokenizer_byte_fallback(tmp_path):
    """UMT5's vocabulary falls back to bytes for unknown characters; both file kinds honour it."""
    import sentencepiece

    spiece_folder = train_sentencepiece(tmp_path / "spiece", byte_fallback=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece_folder / "spiece.model"))
    # A tokenizer.json with byte fallback on, as written for the hub's UMT5 tokenizer.
    pytest.importorskip("google.protobuf")
    json_folder = tmp_path / "json"
    transformers.T5Tokenizer.from_pretrained(str(spiece_folder), extra_ids=0).save_pretrained(str(json_folder))
    tokenizer_json = json.loads((json_folder / "tokenizer.json").read_text())
    tokenizer_json["model"]["byte_fallback"] = True
    (json_folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))

    text = "A cat 🐱 walks on the grass"
    expected = processor.encode(text) + [1]
    assert any(processor.id_to_piece(i).startswith("<0x") for i in expected)
    for folder in (spiece_folder, json_folder):
        ids, mask = T5Tokenizer.from_folder(folder)([text], max_length=32)
        assert ids[0, : len(expected)].tolist() == expected and mask[0].sum() == len(expected)


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(MlxVideoError, match=r"spiece\.model.*tokenizer\.json"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(MlxVideoError, match=r"spiece\.model.*tokenizer\.json"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")


def test_tokenizer_corrupt_files(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model" * 4)
    with pytest.raises(MlxVideoError, match=r"spiece\.model"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MlxVideoError, match=r"tokenizer\.json"):
        T5Tokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------- prompt clean

TRICKY_PROMPTS = [
    "A cat &amp; a dog",
    "Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &#x4e2d;",
    "The Mona Lisa doesnâ€™t have eyebrows.",  # mojibake
    "cafÃ©  au   lait",
    "  line one\nline two\r\n\tindented\t\ttabs  ",
    "wide\u3000ideographic\u00a0nbsp\u2009thin\u202fnarrow\u2028sep\u2029para\u0085nel\u200bzwsp",
    "一只猫在草地上散步，阳光明媚。  镜头缓缓推进。",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ",
    "\x1cfile\x1dgroup\x1erecord\x1funit",
    "",
    "   ",
    "&nbsp;&nbsp;spaces&nbsp;",
    "emoji 🐱‍👤 and <b>tags</b>",
]


@pytest.fixture(scope="module")
def diffusers_prompt_clean():
    wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    return wan.prompt_clean


@pytest.mark.parametrize("text", TRICKY_PROMPTS)
def test_clean_prompt_matches_diffusers(diffusers_prompt_clean, text):
    assert clean_prompt(text) == diffusers_prompt_clean(text)


def test_clean_prompt_every_whitespace_character(diffusers_prompt_clean):
    candidates = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace() or re.fullmatch(r"\s", chr(c))]
    candidates += ["\u200b", "\u180e", "\ufeff"]
    for c in candidates:
        text = f"a{c}b{c}{c}c"
        assert clean_prompt(text) == diffusers_prompt_clean(text), repr(c)
