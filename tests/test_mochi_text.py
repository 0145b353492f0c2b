"""T5-v1.1 encoder (Mochi's text encoder) against transformers' T5EncoderModel, and the T5 tokenizer at 256 tokens."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlx_video.families.mochi.keys import TRANSFORMERS_T5, convert_t5_weights  # noqa: E402
from mlx_video.text_encoders.t5 import T5Config, T5Encoder  # noqa: E402
from mlx_video.text_encoders.tokenizer import T5Tokenizer  # noqa: E402
from support.arrays import rel_err_f64  # noqa: E402

TINY = [
    dict(vocab_size=96, d_model=40, d_kv=12, num_heads=5, d_ff=56, num_layers=3),
    dict(vocab_size=80, d_model=24, d_kv=20, num_heads=3, d_ff=36, num_layers=2),
]
COMMON = dict(
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
)
SEQ_LEN = 160  # offsets beyond max_distance, so every kind of bucket occurs


def tiny_t5(folder, kwargs, seed):
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**kwargs, **COMMON)).eval()
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
    ref.save_pretrained(folder)
    return ref


def load_ours(folder) -> T5Encoder:
    import json

    config = T5Config.from_transformers(json.loads((folder / "config.json").read_text()))
    model = T5Encoder(config)
    weights = convert_t5_weights(mx.load(str(folder / "model.safetensors")))
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert {k: v.shape for k, v in weights.items()} == expected
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.mark.parametrize("case", [0, 1])
def test_parity_with_transformers_fp32(tmp_path, case):
    kwargs = TINY[case]
    ref = tiny_t5(tmp_path, kwargs, seed=case)
    ours = load_ours(tmp_path)
    # Only the first layer holds a position table.
    assert [k for k in ref.state_dict() if "relative_attention_bias" in k] == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ]
    rng = np.random.default_rng(case)
    ids = rng.integers(2, kwargs["vocab_size"], size=(3, SEQ_LEN)).astype(np.int32)
    mask = np.zeros((3, SEQ_LEN), dtype=np.int32)
    for i, n in enumerate((SEQ_LEN, 41, 1)):
        mask[i, :n] = 1
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = np.array(ours(mx.array(ids), mx.array(mask)))
    assert got.dtype == np.float32 and got.shape == expected.shape
    valid = mask.astype(bool)
    assert rel_err_f64(got[valid], expected[valid]) <= 1e-5
    assert rel_err_f64(got, expected) <= 1e-5  # padded query rows are defined too
    # Mochi reads 256 tokens.
    ids256, mask256 = ids[:, :128].repeat(2, axis=1), np.repeat(mask[:, :128], 2, axis=1)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids256).long(), attention_mask=torch.from_numpy(mask256)).last_hidden_state.numpy()
    assert rel_err_f64(np.array(ours(mx.array(ids256), mx.array(mask256))), expected) <= 1e-5


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(KeyError):
        convert_t5_weights({"encoder.block.1.layer.0.SelfAttention.qkv.weight": mx.zeros((2, 2))})
    # A UMT5 checkpoint (a position table in every layer) maps two tables onto our single one: refused.
    with pytest.raises(ValueError, match="two source keys"):
        convert_t5_weights(
            {
                f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight": mx.zeros((32, 4))
                for i in range(2)
            }
        )


def test_full_size_key_and_shape_coverage():
    xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**xxl, **COMMON))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert TRANSFORMERS_T5.unknown_keys(shapes) == []
    config = T5Config.from_transformers({**xxl, **COMMON})
    assert config == T5Config()
    ours = {k: tuple(v.shape) for k, v in tree_flatten(T5Encoder(config).parameters())}
    mapped = {}
    keys = [k for k in shapes if k != "encoder.embed_tokens.weight"]
    for k in keys:
        target, _ = TRANSFORMERS_T5.target(k)
        assert target not in mapped
        mapped[target] = shapes[k]
    assert mapped == ours
    assert abs(sum(math.prod(s) for s in ours.values()) / 1e9 - 4.762) < 0.001  # worked out from google/t5-v1_1-xxl's config.json (the encoder): 4.762B


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def t5_tokenizer_folder(tmp_path_factory):
    pytest.importorskip("google.protobuf")
    from support.text import train_sentencepiece

    return train_sentencepiece(tmp_path_factory.mktemp("t5_tok") / "spiece", byte_fallback=False)


@pytest.mark.parametrize("source", ["spiece", "json"])
def test_tokenizer_256_tokens_like_transformers_t5(t5_tokenizer_folder, tmp_path, source):
    from support.text import PROMPTS, SENTENCES

    # T5 v1.1's tokenizer appends 100 sentinel tokens (<extra_id_N>) to the SentencePiece vocabulary.
    ref = transformers.T5Tokenizer.from_pretrained(str(t5_tokenizer_folder), extra_ids=100)
    folder = t5_tokenizer_folder
    if source == "json":
        folder = tmp_path / "json"
        ref.save_pretrained(str(folder))
        assert not (folder / "spiece.model").exists()
    ours = T5Tokenizer.from_folder(folder)
    texts = PROMPTS + [" ".join(SENTENCES) * 20]
    enc = ref(texts, padding="max_length", max_length=256, truncation=True, add_special_tokens=True)
    ids, mask = ours(texts, max_length=256)
    assert ids.shape == (len(texts), 256)
    np.testing.assert_array_equal(ids, np.array(enc["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(enc["attention_mask"]))
    assert mask[-1].all() and mask[1].sum() == 1  # truncated prompt; the empty prompt is EOS only
