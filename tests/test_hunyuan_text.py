"""HunyuanVideo text encoders: the Llama path (template, crop, hidden state 3 from the end) against diffusers'
own `_get_llama_prompt_embeds` on a tiny transformers LlamaModel, CLIP pooled output against CLIPTextModel,
and full-size key coverage for Llama-3-8B (incl. LLaVA names) and CLIP-L."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoPipeline
from mlx.utils import tree_flatten
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig as HFCLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from mlx_video.families.hunyuan.keys import TRANSFORMERS_CLIP, TRANSFORMERS_LLAMA, convert_weights
from mlx_video.errors import MlxVideoError
from mlx_video.text_encoders.clip import CLIP_TOKENS, CLIPTextConfig, CLIPTextEncoder, encode_pooled
from mlx_video.text_encoders.llama import (
    VIDEO_TEMPLATE,
    JsonTokenizer,
    LlamaTextEncoder,
    encode_prompts,
    template_crop_start,
)
from support.arrays import rel_err

PARITY_RTOL = 1e-5
SENTENCES = [
    "Describe the video by detailing the following aspects of the main content and theme.",
    "The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "A cat walks on the grass, realistic style, camera angles, movements and transitions.",
    "Actions, events, behaviors temporal relationships, physical movement changes; background light.",
    "The template puts the prompt in its {} placeholder: {} {} {}",  # so that `{}` is one token, as in Llama 3
]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def byte_level_bpe(folder, specials, template_single, pad_token, vocab_size=400, last_special=None):
    """A byte-level BPE tokenizer.json (Llama 3 / CLIP style) trained on a few sentences; `last_special` is
    added after training, so it gets the largest id (as <|endoftext|> in CLIP's vocabulary)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    if last_special is not None:
        tok.add_special_tokens([last_special])
        specials = [*specials, last_special]
    tok.post_processor = processors.TemplateProcessing(
        single=template_single, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template_single]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
    return tok


# --- Llama ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tok = byte_level_bpe(folder / "tokenizer", LLAMA_SPECIALS, "<|begin_of_text|> $A", "<|end_of_text|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=40, intermediate_size=72, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=10, rope_theta=500000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=512)
    reference = LlamaModel(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    reference.save_pretrained(folder / "text_encoder")
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    ours = LlamaTextEncoder(json.loads((folder / "text_encoder" / "config.json").read_text()))
    weights = convert_weights(TRANSFORMERS_LLAMA, {k: mx.array(v.float().numpy()) for k, v in state.items()})
    assert len(ours.drop_unused(weights)) == len(weights) - 2 * 9 - 1  # 2 layers of 9 tensors, the norm
    ours.load_weights(list(ours.drop_unused(weights).items()), strict=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
                                           pad_token="<|end_of_text|>", padding_side="right")
    return SimpleNamespace(reference=reference, ours=ours, tokenizer=JsonTokenizer(folder / "tokenizer"),
                           hf_tokenizer=hf_tokenizer)


def test_llama_path_matches_diffusers(llama):
    prompts = ["A cat walks on the grass.", "Camera angles, movements and transitions of a shape in the light."]
    crop = template_crop_start(llama.tokenizer)
    # diffusers' own function, with our tokenizer.json in transformers and the tiny LlamaModel.
    pipe = SimpleNamespace(tokenizer=llama.hf_tokenizer, text_encoder=llama.reference, _execution_device="cpu")
    with torch.no_grad():
        expected, expected_mask = HunyuanVideoPipeline._get_llama_prompt_embeds(
            pipe, prompts, {"template": VIDEO_TEMPLATE, "crop_start": crop}, device="cpu", dtype=torch.float32,
            max_sequence_length=40, num_hidden_layers_to_skip=2,
        )
    got, mask = encode_prompts(llama.ours, llama.tokenizer, prompts, crop_start=None, text_tokens=40)
    assert got.shape == tuple(expected.shape) == (2, 40, 40)
    np.testing.assert_array_equal(np.array(mask), expected_mask.numpy())
    assert 0 < int(np.array(mask).sum(1).max()) < 40  # both prompts padded
    rel = rel_err(np.array(got), expected.numpy())
    print(f"Llama path (template crop {crop}, hidden_states[-3]) parity: rel {rel:.2e}")
    assert rel < PARITY_RTOL


def test_llama_hidden_state_index(llama):
    """The output after all but the last two layers is transformers' hidden_states[-3]; [-2] differs."""
    ids = mx.array(np.arange(3, 19)[None])
    with torch.no_grad():
        states = llama.reference(torch.from_numpy(np.array(ids)).long(), output_hidden_states=True).hidden_states
    got = np.array(llama.ours(ids))
    assert rel_err(got, states[-3].numpy()) < PARITY_RTOL
    assert rel_err(got, states[-2].numpy()) > 1e-2


def test_template_crop_start_checked(llama):
    with pytest.raises(MlxVideoError, match="template"):
        encode_prompts(llama.ours, llama.tokenizer, ["a cat"], crop_start=95, text_tokens=8)
    with pytest.raises(MlxVideoError, match="tokens long"):
        encode_prompts(llama.ours, llama.tokenizer, ["a cat " * 40], crop_start=None, text_tokens=8)
    crop = template_crop_start(llama.tokenizer)
    # The crop (diffusers' count: template tokens minus `{}` and <|eot_id|>) removes exactly the tokens before
    # the prompt: BOS plus the template prefix.
    assert len(llama.tokenizer.encode("{}")) == 2  # BOS + one token
    prefix = llama.tokenizer.encode(VIDEO_TEMPLATE.split("{}")[0])
    assert crop == len(prefix)


def test_llama_full_size_keys_and_shapes():
    """Llama-3-8B (the LLaVA-Llama-3 language model), as diffusers' text_encoder/ (LlamaModel) and as a LLaVA
    checkpoint (vision tower and projector ignored)."""
    config = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=8192, tie_word_embeddings=False)
    encoder = LlamaTextEncoder(config)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(encoder.parameters())}
    with torch.device("meta"):
        bare = LlamaModel(LlamaConfig(**config))
        llava = LlavaForConditionalGeneration(LlavaConfig(text_config=LlamaConfig(**config), image_token_index=128257))
    for source in (bare.state_dict(), llava.state_dict()):
        shapes = {k: tuple(v.shape) for k, v in source.items()}
        assert TRANSFORMERS_LLAMA.unknown_keys(shapes) == []
        converted = convert_weights(TRANSFORMERS_LLAMA, {k: mx.zeros(s) for k, s in shapes.items()})
        assert {"model.norm.weight", "model.layers.31.mlp.up_proj.weight"} <= set(converted)
        mapped = {k: tuple(v.shape) for k, v in encoder.drop_unused(converted).items()}
        assert sorted(set(ours) ^ set(mapped)) == []
        assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
    print(f"Llama-3-8B parameters used (30 of 32 layers): {sum(math.prod(s) for s in ours.values()) / 1e9:.3f}B")


# --- CLIP -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy_eos", [True, False])
def test_clip_pooled_parity(tmp_path, legacy_eos):
    tok = byte_level_bpe(tmp_path / "tokenizer", ["<|startoftext|>"], "<|startoftext|> $A <|endoftext|>",
                         "<|endoftext|>", last_special="<|endoftext|>")
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(1)
    config = HFCLIPTextConfig(vocab_size=tok.get_vocab_size(), hidden_size=36, intermediate_size=60,
                              num_hidden_layers=3, num_attention_heads=3, max_position_embeddings=CLIP_TOKENS,
                              hidden_act="quick_gelu", eos_token_id=2 if legacy_eos else eos,
                              bos_token_id=tok.token_to_id("<|startoftext|>"), pad_token_id=eos)
    reference = CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if legacy_eos:  # the argmax rule needs <|endoftext|> to be the largest id, as in CLIP's vocabulary
        assert eos == tok.get_vocab_size() - 1
    reference.save_pretrained(tmp_path / "text_encoder_2")
    state = load_file(str(tmp_path / "text_encoder_2" / "model.safetensors"))
    ours = CLIPTextEncoder(CLIPTextConfig.from_transformers(
        json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())))
    ours.load_weights(list(convert_weights(TRANSFORMERS_CLIP, {k: mx.array(v.float().numpy())
                                                               for k, v in state.items()}).items()), strict=True)
    tokenizer = JsonTokenizer(tmp_path / "tokenizer")
    prompts = ["A cat walks on the grass.", "camera angles, movements " * 30]  # the second is cut to 77
    got = encode_pooled(ours, tokenizer, prompts)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer" / "tokenizer.json"),
                                           pad_token="<|endoftext|>")
    ids = hf_tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
    assert ids[1, -1] == eos
    with torch.no_grad():
        expected = reference(ids).pooler_output.numpy()
    assert got.shape == expected.shape == (2, 36)
    rel = rel_err(np.array(got), expected)
    print(f"CLIP pooled parity (legacy eos={legacy_eos}): rel {rel:.2e}")
    assert rel < PARITY_RTOL


def test_clip_full_size_keys_and_shapes():
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, eos_token_id=2)
    ours_config = CLIPTextConfig.from_transformers(clip_l)
    assert ours_config == CLIPTextConfig()
    ours = {k: tuple(v.shape) for k, v in tree_flatten(CLIPTextEncoder(ours_config).parameters())}
    with torch.device("meta"):
        reference = CLIPTextModel(HFCLIPTextConfig(**clip_l))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # transformers 5 names, and the `text_model.`-prefixed names of older transformers and the hub files.
    for source in (shapes, {f"text_model.{k}": s for k, s in shapes.items()}):
        assert TRANSFORMERS_CLIP.unknown_keys(source) == []
        mapped = {k: tuple(v.shape)
                  for k, v in convert_weights(TRANSFORMERS_CLIP, {k: mx.zeros(s) for k, s in source.items()}).items()}
        assert sorted(set(ours) ^ set(mapped)) == []
        assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
    print(f"CLIP-L text parameters: {sum(math.prod(s) for s in ours.values()) / 1e6:.1f}M")
