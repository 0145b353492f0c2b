"""HunyuanVideo conversion: the fused view of diffusers' split projections, what `classify` calls each component,
the full-size plan of every diffusers component (references on torch's meta device, ours built lazily), the
refusals, and the cost model's parameter count."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from mlx.utils import tree_flatten
from transformers import CLIPTextConfig as HFCLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from mlx_video.convert.convert import ComponentPlan, plan_component
from mlx_video.families.hunyuan import planner as family
from mlx_video.convert.formats import ComponentSource, classify, open_tensors
from mlx_video.families.hunyuan.keys import (
    DIFFUSERS_TRANSFORMER,
    DIFFUSERS_VAE,
    TRANSFORMERS_CLIP,
    TRANSFORMERS_LLAMA,
    transformer_config_from_diffusers,
)
from mlx_video.convert.rules import KeyMap, Rule
from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan import cost_model as cost
from mlx_video.families.hunyuan.config import HUNYUAN_T2V_720P, HUNYUAN_VAE, HunyuanTransformerConfig
from mlx_video.families.hunyuan.transformer import HunyuanTransformer
from mlx_video.families.hunyuan.vae import HunyuanVAE
from mlx_video.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder
from mlx_video.text_encoders.llama import LlamaTextEncoder
from support.hunyuan import CLIP_L, LLAMA_8B, PUBLISHED_TRANSFORMER  # noqa: E402
from support.arrays import meta_shapes
from support.tensor_files import Shapes



def test_fused_view_reads_rows_across_parts(tmp_path):
    rng = np.random.default_rng(0)
    parts = {"blk.to_q.weight": rng.standard_normal((3, 4)), "blk.to_k.weight": rng.standard_normal((3, 4)),
             "blk.to_v.weight": rng.standard_normal((2, 4)), "blk.other.weight": rng.standard_normal((5,))}
    mx.save_safetensors(str(tmp_path / "w.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in parts.items()})
    keymap = KeyMap([Rule(r"blk\.to_q\.weight", "qkv.weight#0"), Rule(r"blk\.to_k\.weight", "qkv.weight#1"),
                     Rule(r"blk\.to_v\.weight", "qkv.weight#2"), Rule(r"blk\.other\.weight", "other.weight")])
    view = family.FusedParts(open_tensors(tmp_path / "w.safetensors", "w"), keymap, "w")
    assert sorted(view.keys()) == ["blk.other.weight", "fused:qkv.weight"]
    assert view.shape("fused:qkv.weight") == (8, 4)
    whole = np.concatenate([parts["blk.to_q.weight"], parts["blk.to_k.weight"], parts["blk.to_v.weight"]])
    for start, stop in [(None, None), (2, 7), (3, 6), (0, 1), (6, 8)]:
        got = np.array(view.read("fused:qkv.weight", start, stop))
        np.testing.assert_array_equal(got, whole[slice(start, stop)].astype(np.float32))
    np.testing.assert_array_equal(np.array(view.read("blk.other.weight")), parts["blk.other.weight"].astype(np.float32))
    assert family.fused_keymap(keymap).target("fused:qkv.weight") == ("qkv.weight", None)

    del parts["blk.to_k.weight"]
    mx.save_safetensors(str(tmp_path / "gap.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in parts.items()})
    with pytest.raises(MlxVideoError, match=r"part\(s\) \[1\] are missing"):
        family.FusedParts(open_tensors(tmp_path / "gap.safetensors", "gap"), keymap, "gap")


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        return {
            "transformer": meta_shapes(HunyuanVideoTransformer3DModel(**PUBLISHED_TRANSFORMER)),
            "text_encoder": meta_shapes(LlamaModel(LlamaConfig(**LLAMA_8B))),
            "text_encoder_2": meta_shapes(CLIPTextModel(HFCLIPTextConfig(**CLIP_L))),
            "vae": meta_shapes(AutoencoderKLHunyuanVideo()),
        }


def test_classify_names_each_component(full_size):
    expected = {"transformer": ("transformer", "diffusers"), "text_encoder": ("text_encoder", "transformers"),
                "text_encoder_2": ("text_encoder", "clip"), "vae": ("vae", "diffusers")}
    for name, shapes in full_size.items():
        kind = classify(shapes)
        assert (kind.family, kind.kind, kind.naming) == ("hunyuan", *expected[name]), (name, kind)
    # CLIP with the older `text_model.` prefix, and Llama under a LLaVA wrapper
    clip = classify({f"text_model.{k}": s for k, s in full_size["text_encoder_2"].items()})
    llava = classify({f"language_model.model.{k}": s for k, s in full_size["text_encoder"].items()})
    assert (clip.naming, llava.naming) == ("clip", "transformers")


def test_full_size_diffusers_plan_covers_every_key(full_size):
    """Every key of each published diffusers component maps onto our lazily built module with its shape, and
    every parameter is filled (`plan_component` refuses anything else)."""
    cfg = transformer_config_from_diffusers(PUBLISHED_TRANSFORMER)
    assert cfg == HUNYUAN_T2V_720P
    transformer = ComponentSource(family.FusedParts(Shapes(full_size["transformer"]), DIFFUSERS_TRANSFORMER, "t"), "t")
    llama = LlamaTextEncoder(LLAMA_8B)
    plans = [
        ComponentPlan("transformer", transformer, family.fused_keymap(DIFFUSERS_TRANSFORMER), {}, HunyuanTransformer(cfg)),
        ComponentPlan("text_encoder", ComponentSource(Shapes(full_size["text_encoder"]), "te"),
                      family.DroppingKeyMap(TRANSFORMERS_LLAMA, llama.is_unused), {}, llama),
        ComponentPlan("text_encoder_2", ComponentSource(Shapes(full_size["text_encoder_2"]), "te2"), TRANSFORMERS_CLIP,
                      {}, CLIPTextEncoder(CLIPTextConfig.from_transformers(CLIP_L))),
        ComponentPlan("vae", ComponentSource(Shapes(full_size["vae"]), "vae"), DIFFUSERS_VAE, {}, HunyuanVAE(HUNYUAN_VAE)),
    ]
    for plan in plans:
        plan_component(plan)
        expected = {k: tuple(v.shape) for k, v in tree_flatten(plan.module.parameters())}
        assert {k: v[1] for k, v in plan.tensors.items()} == expected, plan.name
    fused = [k for k, (src, _, _) in plans[0].tensors.items() if src.startswith(family.FUSED)]
    assert len(fused) == 2 * 2 * 20 + 2 * 40 + 2 * 2  # q|k|v (weight, bias) per double-block stream, linear1, refiner
    # the Llama layers 30 and 31 and the final norm are left out on purpose
    assert len(full_size["text_encoder"]) - len(plans[1].tensors) == 2 * 9 + 1


def _stub_folder(root, pipeline_class="HunyuanVideoPipeline"):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    for name in family.COMPONENTS:
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    return root


def test_claims_and_refusals(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from mlx_video.text_encoders.llama import VIDEO_TEMPLATE

    src = _stub_folder(tmp_path / "hy")
    assert family.claims(src, {}) and not family.claims(tmp_path, {})
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert not family.claims(tmp_path / "wan", {})

    i2v = _stub_folder(tmp_path / "i2v", "HunyuanVideoImageToVideoPipeline")  # planned as HunyuanVideo-I2V
    with pytest.raises(MlxVideoError, match="no tokenizer.json \\(the LLaVA-Llama-3 tokenizer\\)"):
        family.plan(i2v)
    with pytest.raises(MlxVideoError, match="no tokenizer.json"):
        family.plan(src)
    # a byte-level BPE with GPT-2's split (not Llama 3's) cuts the template into another count: refused
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
    tok.train_from_iterator([VIDEO_TEMPLATE] * 3, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    (src / "tokenizer").mkdir()
    tok.save(str(src / "tokenizer" / "tokenizer.json"))
    with pytest.raises(MlxVideoError, match="not the Llama 3 tokenizer"):
        family.plan(src)


def test_cost_parameter_count_matches_the_module():
    tiny = HunyuanTransformerConfig(num_heads=2, head_dim=24, rope_axes=(4, 10, 10), num_double_blocks=2,
                                    num_single_blocks=3, num_refiner_blocks=1, mlp_ratio=3.0, text_dim=20,
                                    pooled_dim=12, in_channels=12, out_channels=8)
    for cfg in (tiny, HUNYUAN_T2V_720P):
        counted = sum(v.size for _, v in tree_flatten(HunyuanTransformer(cfg).parameters()))
        assert sum(c.total for c in cost.transformer_params(cfg).values()) == counted
    assert sum(math.prod(s) for s in (tuple(v.shape) for _, v in tree_flatten(LlamaTextEncoder(LLAMA_8B).parameters()))) \
        == cost.llama_params()


def test_clip_tokenizer_from_vocab_and_merges(tmp_path):
    """tokenizer_2/ as the hub ships CLIP's (vocab.json + merges.txt, no tokenizer.json): the tokenizer.json the
    converter builds gives transformers' CLIPTokenizer's ids."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    from mlx_video.text_encoders.llama import JsonTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a cat walks on the grass in the morning light, realistic style",
                             "a corgi surfs a wave at sunset; the camera pans over 3 mountains"] * 5, trainer)
    (tmp_path / "clip").mkdir()
    tok.model.save(str(tmp_path / "clip"))
    (tmp_path / "clip" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    reference = CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))

    built = family._tokenizer(tmp_path / "clip", "tokenizer_2")
    (tmp_path / "ours").mkdir()
    for data, name in built:
        (tmp_path / "ours" / name).write_bytes(data if isinstance(data, bytes) else data.read_bytes())
    ours = JsonTokenizer(tmp_path / "ours")
    texts = ["A cat walks on the grass.", "  The CAMERA   pans over 3 snowy Mountains!!", "a corgi's wave at sunset",
             "unseen wörds like zebra?"]
    for text in texts:
        assert ours.encode(text) == reference(text).input_ids, text
    assert ours.pad_id == reference.pad_token_id
