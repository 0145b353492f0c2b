"""Mochi conversion: what `classify` calls each component (T5 v1.1 told apart from Wan's UMT5), the full-size plan
of every diffusers component and of the official release's names (dit.safetensors, decoder.safetensors +
encoder.safetensors; references on torch's meta device, ours built lazily), the refusals, and the cost model's
parameter counts against the references'."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLMochi, MochiTransformer3DModel
from mlx.utils import tree_flatten
from transformers import T5Config as HFT5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from mlx_video.convert.convert import ComponentPlan, plan_component
from mlx_video.families.mochi import planner as family
from mlx_video.families.hunyuan.planner import FUSED, FusedParts, fused_keymap
from mlx_video.convert.formats import ComponentSource, classify
from mlx_video.families.mochi.keys import DIFFUSERS_TRANSFORMER, DIFFUSERS_VAE, OFFICIAL_TRANSFORMER, TRANSFORMERS_T5
from mlx_video.families.mochi.keys import transformer_config_from_diffusers, vae_config_from_diffusers
from mlx_video.errors import MlxVideoError
from mlx_video.families.mochi import cost_model as cost
from mlx_video.families.mochi.config import MOCHI_1_PREVIEW, MOCHI_VAE
from mlx_video.families.mochi.transformer import MochiTransformer
from mlx_video.families.mochi.vae import MochiVAE
from mlx_video.registry import get_spec
from mlx_video.text_encoders.t5 import T5Config, T5Encoder
from support.mochi import T5_XXL, official_state_dict, official_vae_state_dicts
from support.arrays import meta_shapes
from support.tensor_files import Shapes



@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        transformer = MochiTransformer3DModel()
        t5 = T5EncoderModel(HFT5Config(**T5_XXL))
        vae = AutoencoderKLMochi()
        official = official_state_dict(transformer.state_dict(), transformer.config.num_layers)
        decoder, encoder = official_vae_state_dicts(vae.state_dict())
        return {
            "transformer": meta_shapes(transformer),
            "official": {k: tuple(v.shape) for k, v in official.items()},
            "text_encoder": meta_shapes(t5),
            "vae": meta_shapes(vae),
            "vae_decoder": {k: tuple(v.shape) for k, v in decoder.items()},
            "vae_encoder": {k: tuple(v.shape) for k, v in encoder.items()},
            "config": dict(transformer.config),
            "vae_config": dict(vae.config),
            "numel": {name: sum(p.numel() for p in m.parameters()) for name, m in
                      (("transformer", transformer), ("text_encoder", t5), ("vae", vae))},
            "decoder_numel": sum(p.numel() for p in vae.decoder.parameters()),
        }


def test_classify_names_each_component(full_size):
    expected = {"transformer": ("transformer", "diffusers"), "official": ("transformer", "official"),
                "text_encoder": ("text_encoder", "transformers"), "vae": ("vae", "diffusers"),
                "vae_decoder": ("vae_decoder", "official"), "vae_encoder": ("vae_encoder", "official")}
    for name, want in expected.items():
        kind = classify(full_size[name])
        assert (kind.family, kind.kind, kind.naming) == ("mochi", *want), (name, kind)
    # ComfyUI's prefix on the official names
    from mlx_video.convert.formats import ComponentSource as Source

    comfy = Source(Shapes({f"model.diffusion_model.{k}": s for k, s in full_size["official"].items()}), "comfy")
    assert classify(comfy.keys()).family == "mochi"
    # Wan's UMT5 (a position table in every block) stays Wan's
    with torch.device("meta"):
        umt5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4))
    kind = classify(meta_shapes(umt5))
    assert (kind.family, kind.kind) == ("wan", "text_encoder")


def test_full_size_plan_covers_every_key(full_size):
    """Every key of each published component maps onto our lazily built module with its shape, and every
    parameter is filled (`plan_component` refuses anything else)."""
    cfg = transformer_config_from_diffusers(full_size["config"])
    assert cfg == MOCHI_1_PREVIEW
    assert vae_config_from_diffusers({"_class_name": "AutoencoderKLMochi", **full_size["vae_config"]}) == MOCHI_VAE
    plans = [
        ComponentPlan("transformer", ComponentSource(FusedParts(Shapes(full_size["transformer"]), DIFFUSERS_TRANSFORMER,
                                                                "t"), "t"),
                      fused_keymap(DIFFUSERS_TRANSFORMER), {}, MochiTransformer(cfg)),
        ComponentPlan("transformer", ComponentSource(Shapes(full_size["official"]), "dit"), OFFICIAL_TRANSFORMER, {},
                      MochiTransformer(cfg)),
        ComponentPlan("text_encoder", ComponentSource(Shapes(full_size["text_encoder"]), "te"), TRANSFORMERS_T5, {},
                      T5Encoder(T5Config.from_transformers(T5_XXL))),
        ComponentPlan("vae", ComponentSource(FusedParts(Shapes(full_size["vae"]), DIFFUSERS_VAE, "vae"), "vae"),
                      fused_keymap(DIFFUSERS_VAE), {}, MochiVAE(MOCHI_VAE)),
        ComponentPlan("vae", ComponentSource(family.OfficialVAE({h: Shapes(full_size[f"vae_{h}"])
                                                                for h in ("decoder", "encoder")}), "official vae"),
                      family.official_vae_keymap(), {}, MochiVAE(MOCHI_VAE)),
    ]
    for plan in plans:
        plan_component(plan)
        expected = {k: tuple(v.shape) for k, v in tree_flatten(plan.module.parameters())}
        assert {k: v[1] for k, v in plan.tensors.items()} == expected, plan.name
    fused = [k for k, (src, _, _) in plans[0].tensors.items() if src.startswith(FUSED)]
    assert len(fused) == 2 * 48  # q|k|v of each stream in each block
    assert plans[0].tensors["blocks.0.attn.qkv_x.weight"][1] == (9216, 3072)
    # low precision under --quantize: every block linear, nothing else
    low = [k for k in plans[0].tensors if family.LOW_PRECISION_TRANSFORMER.fullmatch(k)]
    # per block q|k|v, output projection, MLP w1 and w2 of each stream and both modulations; the last block has
    # no text output projection nor text MLP
    assert len(low) == 48 * 10 - 3 and not any(k.startswith(("final_layer", "text_pool")) for k in low)
    # kept in float32 under --dtype bf16 --quantize q8: the RoPE frequencies and every q/k norm gain, nothing else
    from mlx_video.convert.quantize import plan_item

    codes = {t: plan_item("transformer", t, k, tr, sh, plans[0].source, "bf16", "q8", 64,
                          family.LOW_PRECISION_TRANSFORMER, family.KEEP_FP32_TRANSFORMER).outputs[0].code
             for t, (k, sh, tr) in plans[0].tensors.items()}
    kept = sorted(t for t, c in codes.items() if c == "F32")
    assert kept == sorted(["pos_frequencies"] + [f"blocks.{i}.attn.norm_{a}_{b}.weight"
                                                 for i in range(48) for a in "qk" for b in "xy"])
    assert {c for t, c in codes.items() if t not in kept} == {"BF16", "U32"}


def test_cost_parameter_counts_match_the_references(full_size):
    spec = get_spec("mochi-1-preview")
    assert cost.transformer_params(MOCHI_1_PREVIEW).total == full_size["numel"]["transformer"]
    assert cost.t5_params().total == full_size["numel"]["text_encoder"]
    assert cost.vae_params() == full_size["numel"]["vae"]
    assert cost.vae_params(decoder_only=True) == full_size["decoder_numel"]
    # figures worked out by hand from genmo/mochi's DiT and T5 configs (its README says 10B): 10.03B DiT, 4.76B T5, 44,520 tokens, 1.67 PFLOP per forward at 480p
    assert round(full_size["numel"]["transformer"] / 1e9, 2) == 10.03
    assert cost.tokens(spec, 848, 480, 163) == 44520
    assert round(cost.video_flops(spec, 848, 480, 163, 64, guidance=False)["per_step"] / 1e15, 2) == 1.67


def _stub_folder(root, pipeline_class="MochiPipeline"):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    for name in family.COMPONENTS:
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    return root


def test_claims_and_refusals(tmp_path):
    src = _stub_folder(tmp_path / "mochi")
    assert family.claims(src, {}) and not family.claims(tmp_path, {}) and not family.claims(None, {})
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert not family.claims(tmp_path / "wan", {})
    other = _stub_folder(tmp_path / "other", "MochiVideoToVideoPipeline")
    with pytest.raises(MlxVideoError, match="MochiVideoToVideoPipeline"):
        family.plan(other)
    with pytest.raises(MlxVideoError, match="tokenizer does not exist"):
        family.plan(src)
    (src / "tokenizer").mkdir()
    with pytest.raises(MlxVideoError, match="neither spiece.model nor tokenizer.json"):
        family.plan(src)
    with pytest.raises(MlxVideoError, match="--vae: .*decoder.safetensors does not exist"):
        family.plan(src, {"vae": tmp_path / "decoder.safetensors"})
    with pytest.raises(MlxVideoError, match="Mochi has no text_encoder_2"):
        family.plan(src, {"text_encoder_2": tmp_path / "clip.safetensors"})
    (src / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(MlxVideoError, match="mixes models"):
        family.plan(src)
