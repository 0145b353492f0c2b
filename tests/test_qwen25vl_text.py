"""Qwen2.5-VL text encoder (the prompt path of HunyuanVideo 1.5): diffusers' own `_get_mllm_prompt_embeds` on a
tiny transformers `Qwen2_5_VLTextModel`, with the released chat template rendered by transformers, against our
template, tokenizer, mlx_lm-based encoder and crop; the tokenizer.json's normalizer; full-size key coverage."""

from __future__ import annotations

import inspect
import json
import math
import unicodedata
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15Pipeline
from mlx.utils import tree_flatten
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
)

from mlx_video.convert.rules import convert_weights
from mlx_video.errors import MlxVideoError
from mlx_video.text_encoders.qwen25vl import (
    CROP_START,
    SYSTEM_MESSAGE,
    TRANSFORMERS_QWEN25VL_TEXT,
    Qwen25VLTextEncoder,
    chat_text,
    encode_prompts,
    qwen2_args,
    qwen_tokenizer,
    template_crop_start,
)
from support.arrays import rel_err

PARITY_RTOL = 1e-5

# Transcribed, not ours: the chat template of Qwen/Qwen2.5-VL-7B-Instruct (Hugging Face model repository,
# chat_template.json / tokenizer_config.json "chat_template"), so that transformers renders the text the model
# was trained with and our fixed format is checked against it.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content"
    " %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)
# The pre-tokenizer split of Qwen2's released tokenizer.json (digits one by one, words with one leading
# non-letter, punctuation runs, newlines, whitespace runs), then byte-level without its own regex; NFC first.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = ["A cat walks on the grass, realistic.", "", "Café lights at night, a sign reading \"OPEN 24h\"."]


def qwen_style_tokenizer(folder):
    """A byte-level BPE tokenizer.json laid out as Qwen2's (NFC, its split regex, no post-processor specials)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SYSTEM_MESSAGE, *PROMPTS, "assistant user system"], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return tok


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25vl")
    tok = qwen_style_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2_5_VLTextConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80,
                                  num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                  rms_norm_eps=1e-6, max_position_embeddings=1024,
                                  rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2],
                                                   "rope_theta": 10000.0})
    reference = Qwen2_5_VLTextModel(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    reference.save_pretrained(folder / "text_encoder")
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    ours = Qwen25VLTextEncoder(json.loads((folder / "text_encoder" / "config.json").read_text()))
    weights = convert_weights(TRANSFORMERS_QWEN25VL_TEXT, {k: mx.array(v.float().numpy()) for k, v in state.items()})
    assert len(ours.drop_unused(weights)) == len(weights) - 2 * 12 - 1  # 2 layers of 12 tensors, the norm
    ours.load_weights(list(ours.drop_unused(weights).items()), strict=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
                                           pad_token="<|endoftext|>", padding_side="right",
                                           chat_template=QWEN25VL_CHAT_TEMPLATE)
    return SimpleNamespace(reference=reference, ours=ours, tokenizer=qwen_tokenizer(folder / "tokenizer"),
                           hf_tokenizer=hf_tokenizer)


def test_system_message_is_diffusers_default():
    default = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    assert SYSTEM_MESSAGE == default
    assert inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["crop_start"].default \
        == CROP_START


def test_chat_text_is_the_released_template(qwen):
    for prompt in PROMPTS:
        conversation = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt or " "}]
        rendered = qwen.hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert chat_text(prompt) == rendered


def test_prompt_path_matches_diffusers(qwen):
    crop = template_crop_start(qwen.tokenizer)
    with torch.no_grad():
        expected, expected_mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            qwen.reference, qwen.hf_tokenizer, PROMPTS, device="cpu", tokenizer_max_length=24, crop_start=crop)
    got, mask = encode_prompts(qwen.ours, qwen.tokenizer, PROMPTS, crop_start=None, text_tokens=24)
    assert got.shape == tuple(expected.shape) == (3, 24, 48)
    np.testing.assert_array_equal(np.array(mask), expected_mask.numpy())
    assert 0 < int(np.array(mask).sum(1).max()) < 24  # every prompt padded
    rel = rel_err(np.array(got), expected.numpy())
    print(f"Qwen2.5-VL prompt path (crop {crop}, hidden_states[-3]) parity: rel {rel:.2e}")
    assert rel < PARITY_RTOL


def test_hidden_state_index_and_mrope_positions(qwen):
    """Our output is transformers' hidden_states[-3] (not [-2]), with transformers' own text positions."""
    ids = mx.array(np.arange(5, 30)[None])
    with torch.no_grad():
        states = qwen.reference(torch.from_numpy(np.array(ids)).long(), output_hidden_states=True).hidden_states
    got = np.array(qwen.ours(ids))
    assert rel_err(got, states[-3].numpy()) < PARITY_RTOL
    assert rel_err(got, states[-2].numpy()) > 1e-2


def test_tokenizer_applies_the_released_normalizer(qwen):
    """tokenizer.json's NFC normalizer applies: a decomposed accent tokenizes as the composed one."""
    composed = "Café lights"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert qwen.tokenizer.encode(decomposed) == qwen.tokenizer.encode(composed)
    assert qwen.tokenizer.encode(chat_text(composed)) == qwen.hf_tokenizer.encode(chat_text(composed))


def test_unsupported_configs_refused():
    base = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    with pytest.raises(MlxVideoError, match="rope type 'yarn'"):
        qwen2_args({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(MlxVideoError, match="5 heads of 10"):
        qwen2_args({**base, "num_attention_heads": 5, "head_dim": 10})
    with pytest.raises(MlxVideoError, match="'vocab_size'"):
        qwen2_args({k: v for k, v in base.items() if k != "vocab_size"})


def test_crop_start_checked(qwen):
    crop = template_crop_start(qwen.tokenizer)
    with pytest.raises(MlxVideoError, match="system turn"):
        encode_prompts(qwen.ours, qwen.tokenizer, ["a cat"], crop_start=crop + 1, text_tokens=8)
    with pytest.raises(MlxVideoError, match="tokens long"):
        encode_prompts(qwen.ours, qwen.tokenizer, ["a cat " * 40], crop_start=None, text_tokens=8)
    # The crop removes exactly the tokens before the prompt.
    ids = qwen.tokenizer.encode(chat_text("grass"))
    assert ids[crop:crop + len(qwen.tokenizer.encode("grass"))] == qwen.tokenizer.encode("grass")
    assert qwen.tokenizer.encode(chat_text("grass"))[:crop] == qwen.tokenizer.encode(chat_text("cat"))[:crop]


def test_full_size_keys_and_shapes():
    """Qwen2.5-VL-7B-Instruct: diffusers' text_encoder/ (Qwen2_5_VLTextModel) and the full model as transformers 5
    saves it, and under the released files' names (`model.` + Qwen2 names, `visual.`, `lm_head`)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    encoder = Qwen25VLTextEncoder(Qwen2_5_VLTextConfig(**text).to_dict())
    ours = {k: tuple(v.shape) for k, v in tree_flatten(encoder.parameters())}
    with torch.device("meta"):
        bare = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text))
        full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text))
    full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    released = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): s
                for k, s in full_shapes.items()}
    assert any(k.startswith("visual.") for k in released) and "lm_head.weight" in released
    for shapes in ({k: tuple(v.shape) for k, v in bare.state_dict().items()}, full_shapes, released):
        assert TRANSFORMERS_QWEN25VL_TEXT.unknown_keys(shapes) == []
        converted = convert_weights(TRANSFORMERS_QWEN25VL_TEXT, {k: mx.zeros(s) for k, s in shapes.items()})
        assert {"model.norm.weight", "model.layers.27.mlp.up_proj.weight"} <= set(converted)
        mapped = {k: tuple(v.shape) for k, v in encoder.drop_unused(converted).items()}
        assert sorted(set(ours) ^ set(mapped)) == []
        assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
    # The released config.json (transformers 4 style): text fields at the top, mrope in `rope_scaling`.
    hub = {**{k: v for k, v in text.items() if k != "rope_parameters"}, "rope_theta": 1e6, "model_type": "qwen2_5_vl",
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vision_config": {"depth": 32}}
    assert qwen2_args(hub) == encoder.args
    print(f"Qwen2.5-VL-7B text parameters used (26 of 28 layers): {sum(map(math.prod, ours.values())) / 1e9:.3f}B")
