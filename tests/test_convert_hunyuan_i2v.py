"""HunyuanVideo-I2V conversion at full size: the published LLaVA-Llama-3-8B (`LlavaForConditionalGeneration`, CLIP
ViT-L/14-336 tower) and the token-replace transformer, built on torch's meta device, planned onto our lazily built
modules key for key and shape for shape; and the layouts that are refused."""

from __future__ import annotations

import pytest
import torch
from mlx.utils import tree_flatten

from mlx_video.convert.convert import ComponentPlan, plan_component
from mlx_video.convert.formats import ComponentSource, FusedParts, fused_keymap
from mlx_video.convert.rules import DroppingKeyMap
from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan import planner as family
from mlx_video.families.hunyuan.config import HUNYUAN_I2V_720P
from mlx_video.families.hunyuan.keys import LLAVA_IMAGE, TRANSFORMERS_LLAMA, transformer_config_from_diffusers
from mlx_video.text_encoders.llama import LlamaTextEncoder
from mlx_video.text_encoders.llava import LlavaImageConfig, LlavaImageEncoder
from support.hunyuan import LLAMA_8B, PUBLISHED_TRANSFORMER  # noqa: E402
from support.tensor_files import Shapes


# openai/clip-vit-large-patch14-336, LLaVA's vision tower
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                  patch_size=14, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
PROCESSOR = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3,
             "do_center_crop": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.fixture(scope="module")
def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=LlamaConfig(**LLAMA_8B),
                         image_token_index=128257, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, config.to_dict()


def _check(plan: ComponentPlan) -> None:
    plan_component(plan)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(plan.module.parameters())}
    assert {k: v[1] for k, v in plan.tensors.items()} == expected, plan.name


def transformers4_names(shapes: dict) -> dict:
    """LlavaForConditionalGeneration's keys as transformers 4 saved them (the hub's LLaVA files)."""
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."))
    out = {}
    for key, shape in shapes.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = shape
    return out


@pytest.mark.parametrize("naming", ["transformers5", "transformers4"])
def test_full_size_llava_plans_cover_every_key(llava, naming):
    """The one LLaVA file feeds two components: the Llama (layers 30, 31 and the norm left out, as for T2V) and
    the vision tower with the projector; together they account for every tensor but the LM head."""
    shapes, config = llava
    if naming == "transformers4":
        shapes = transformers4_names(shapes)
        assert "language_model.model.embed_tokens.weight" in shapes and "vision_tower.vision_model.pre_layrnorm.weight" in shapes
    image_cfg = LlavaImageConfig.from_transformers(config, PROCESSOR)
    assert image_cfg.image_tokens == 576 and image_cfg.text_dim == 4096 and image_cfg.feature_layer == -2
    llama = LlamaTextEncoder(LLAMA_8B)
    text = ComponentPlan("text_encoder", ComponentSource(Shapes(shapes), "te"),
                         DroppingKeyMap(TRANSFORMERS_LLAMA, llama.is_unused), {}, llama)
    source = ComponentSource(FusedParts(Shapes(shapes), LLAVA_IMAGE, "te"), "te")
    image = ComponentPlan("image_encoder", source, fused_keymap(LLAVA_IMAGE), {}, LlavaImageEncoder(image_cfg))
    for plan in (text, image):
        _check(plan)
    vision = [k for k in shapes if "vision_tower" in k or "multi_modal_projector" in k]
    fused = 2 * 24  # q|k|v weight and bias per CLIP layer, three tensors read as one
    assert len(image.tensors) == len(vision) - 2 * fused
    unused = 2 * 9 + 1  # Llama layers 30, 31 and the final norm
    assert len(shapes) - len(vision) - len(text.tensors) == unused + 1  # + lm_head


def test_full_size_token_replace_transformer():
    from diffusers import HunyuanVideoTransformer3DModel

    from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    published = {**PUBLISHED_TRANSFORMER, "image_condition_type": "token_replace"}
    cfg = transformer_config_from_diffusers(published)
    assert cfg == HUNYUAN_I2V_720P
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in HunyuanVideoTransformer3DModel(**published).state_dict().items()}
    source = ComponentSource(FusedParts(Shapes(shapes), DIFFUSERS_TRANSFORMER, "t"), "t")
    _check(ComponentPlan("transformer", source, fused_keymap(DIFFUSERS_TRANSFORMER), {}, HunyuanTransformer(cfg)))


def test_official_release_layout_is_refused(tmp_path):
    release = tmp_path / "ckpts"
    (release / family.RELEASE_I2V_MODEL / "transformers").mkdir(parents=True)
    assert family.claims(release, {})
    with pytest.raises(MlxVideoError, match="official release layout"):
        family.plan(release)


def test_vision_config_fields_left_out_take_transformers_defaults():
    """transformers 4 saves only the fields that differ from its defaults: the published LLaVA's vision_config has
    no hidden_act, which is then CLIP's quick_gelu (not the GELU of our ViT-H default)."""
    config = {"vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                                "patch_size": 14, "projection_dim": 768},
              "text_config": {"hidden_size": 4096}, "image_token_index": 128257, "pad_token_id": 128258}
    cfg = LlavaImageConfig.from_transformers(config, PROCESSOR)
    assert cfg.vision_config.hidden_act == "quick_gelu" and cfg.image_tokens == 576 and cfg.image_token_id == 128257


def test_llava_text_config_fields_left_out_take_transformers_defaults():
    """LLaVA-Llama-3-8B's text_config (as transformers 4 saved it) names only what differs from LlamaConfig's
    defaults: the Llama built from it is still the 8B one (4096 wide, 32 layers of 32 heads, 8 KV heads)."""
    from mlx_video.text_encoders.llama import llama_args

    text_config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
                   "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
                   "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128320}
    args = llama_args({"text_config": text_config, "image_token_index": 128257})
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == \
        (4096, 32, 32, 8)
    assert (args.intermediate_size, args.vocab_size, args.rope_theta) == (14336, 128320, 500000.0)
    # transformers 5's rope_parameters still give the theta
    five = {k: v for k, v in text_config.items() if k != "rope_theta"}
    assert llama_args({**five, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}).rope_theta == 500000.0
