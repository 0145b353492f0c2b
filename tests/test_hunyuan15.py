"""HunyuanVideo 1.5 against diffusers 0.42.1: the transformer (`HunyuanVideo15Transformer3DModel`) at tiny random
configs through `mlxvid convert`; the denoising of `HunyuanVideo15Pipeline` (CFG, guidance 1) and of
`HunyuanVideo15ImageToVideoPipeline` (the step-distilled MeanFlow model) to the final latents; every key and shape
of the published transformer (built on torch's meta device).

The prompt and image encoders (Qwen2.5-VL, ByT5, SigLIP) and the 32-channel VAE are not in this build: the
pipeline tests give both sides the same prompt states (diffusers' `prompt_embeds` arguments) and our pipeline the
image conditioning the reference computes (its VAE latents of the image, its SigLIP features)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.pipelines.base import GenerationSettings, Pipeline  # noqa: E402
from mlxvid_test_helpers import meta_state, write_description  # noqa: E402

TEXT_DIM, GLYPH_DIM, IMAGE_DIM = 20, 12, 16


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_transformer(heads=3, head_dim=24, layers=2, meanflow=False, seed=0, axes=(8, 8, 8)):
    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        text_embed_dim=TEXT_DIM, text_embed_2_dim=GLYPH_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=axes,
        use_meanflow=meanflow, target_size=64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def save_folder(root, model, pipeline="HunyuanVideo15Pipeline", guidance=6.0):
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "guider").mkdir()
    (root / "guider" / "config.json").write_text(json.dumps({"guidance_scale": guidance}))
    return root


def converted(tmp_path_factory, name, model, **kwargs):
    root = tmp_path_factory.mktemp(name)
    save_folder(root / "diffusers", model, **kwargs)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return Pipeline.from_pretrained(str(root / "mlx"))


def prompt_states(seed, lengths=(7, 4), glyphs=(0, 3)):
    """(text, text_mask, glyph, glyph_mask) per prompt, torch, the reference pipelines' padded layout."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, m in zip(lengths, glyphs):
        text, glyph = torch.randn(1, 9, TEXT_DIM, generator=g), torch.randn(1, 6, GLYPH_DIM, generator=g)
        text_mask = (torch.arange(9) < n).long()[None]
        glyph_mask = (torch.arange(6) < m).long()[None]
        out.append((text, text_mask, glyph * glyph_mask[..., None], glyph_mask))
    return out


def ours_context(states):
    return tuple(mx.array(torch.cat([s[i] for s in states]).numpy()) for i in range(4))


def reference_kwargs(states):
    (t, tm, g, gm), (nt, ntm, ng, ngm) = states
    return dict(prompt_embeds=t, prompt_embeds_mask=tm, prompt_embeds_2=g, prompt_embeds_mask_2=gm,
                negative_prompt_embeds=nt, negative_prompt_embeds_mask=ntm, negative_prompt_embeds_2=ng,
                negative_prompt_embeds_mask_2=ngm)


def tiny_vae():
    torch.manual_seed(3)
    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    model = tiny_transformer()
    return model, converted(tmp_path_factory, "hy15_t2v", model)


# --- the transformer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,head_dim,axes,layers,frames,image",
                         [(3, 24, (8, 8, 8), 2, 3, True), (2, 20, (4, 8, 8), 3, 2, False)])
def test_transformer_matches_diffusers(tmp_path_factory, heads, head_dim, axes, layers, frames, image):
    """Through `mlxvid convert`: two samples with different text and glyph padding, an image or none (T2V), and the
    MeanFlow input."""
    ref = tiny_transformer(heads, head_dim, layers, meanflow=True, seed=heads, axes=axes)
    pipe = converted(tmp_path_factory, f"hy15_tr{heads}", ref, pipeline="HunyuanVideo15ImageToVideoPipeline")
    assert pipe.spec.id == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    model = pipe.load_transformer()
    g = torch.Generator().manual_seed(layers)
    x = torch.randn(2, 9, frames, 3, 5, generator=g)
    (text, tm, glyph, gm), (text2, tm2, glyph2, gm2) = prompt_states(layers, lengths=(9, 5), glyphs=(2, 0))
    text, tm, glyph, gm = torch.cat([text, text2]), torch.cat([tm, tm2]), torch.cat([glyph, glyph2]), torch.cat([gm, gm2])
    features = torch.randn(2, 5, IMAGE_DIM, generator=g) if image else torch.zeros(2, 5, IMAGE_DIM)
    t, r = torch.tensor([873.0, 873.0]), torch.tensor([512.5, 512.5])
    with torch.no_grad():
        want = ref(x, t, text, tm, timestep_r=r, encoder_hidden_states_2=glyph, encoder_attention_mask_2=gm,
                   image_embeds=features).sample.numpy()
    arr = lambda a: mx.array(a.numpy())  # noqa: E731
    got = model(arr(x.permute(0, 2, 3, 4, 1)), arr(t), arr(text), arr(tm), arr(glyph), arr(gm),
                arr(features) if image else None, arr(r))
    assert rel_err(np.array(got).transpose(0, 4, 1, 2, 3), want) < 1e-5


def test_published_transformer_every_key_and_shape(tmp_path):
    """The published transformer (diffusers names, meta device) planned onto ours: every key, every shape."""
    from mlx_video.convert.convert import plan

    state = meta_state(HunyuanVideo15Transformer3DModel, use_meanflow=True)
    codes = {torch.float32: "F32", torch.bfloat16: "BF16"}
    (tmp_path / "transformer").mkdir()
    write_description(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors",
                      {k: (codes[v.dtype], tuple(v.shape), None) for k, v in state.items()})
    config = {"_class_name": "HunyuanVideo15Transformer3DModel", "use_meanflow": True}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15ImageToVideoPipeline"}))
    conversion = plan(tmp_path)
    (component,) = conversion.components
    assert conversion.manifest["model"] == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    from mlx.utils import tree_flatten

    ours = {k: tuple(v.shape) for k, v in tree_flatten(component.module.parameters())}
    assert {k: v[1] for k, v in component.tensors.items()} == ours
    assert sum(np.prod(s) for s in ours.values()) == sum(v.numel() for v in state.values())  # nothing dropped


# --- the pipelines ---------------------------------------------------------------------------------------


def reference_t2v(model, guidance, shift):
    return HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=model, vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=guidance))


@pytest.mark.parametrize("guidance,mode", [(6.0, "batched"), (1.0, "sequential")])
def test_t2v_latents_match_diffusers(t2v, guidance, mode):
    model, pipe = t2v
    states = prompt_states(int(guidance))
    init = np.random.default_rng(int(guidance)).standard_normal((1, 4, 2, 3, 4)).astype(np.float32)
    ref = reference_t2v(model, guidance, shift=5.0)
    with torch.no_grad():
        want = ref(height=48, width=64, num_frames=5, num_inference_steps=3, latents=torch.from_numpy(init),
                   output_type="latent", **reference_kwargs(states)).frames.numpy()
    pipe.encode = lambda s, progress=False: ours_context(states if s.guidance != 1.0 else states[:1])
    s = GenerationSettings(prompt="p", width=64, height=48, frames=5, steps=3, guidance=guidance, shift=5.0,
                           guidance_mode=mode)
    got = pipe.generate(s, init_latents=init).latents
    assert rel_err(got, want) < 1e-5


def test_meanflow_i2v_latents_match_diffusers(tmp_path_factory):
    """The step-distilled I2V model over 4 steps: the image's latents on frame 0 with the mask channel, its SigLIP
    features, timestep_r the next step's timestep (0 at the last)."""
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    model = tiny_transformer(heads=2, head_dim=16, layers=2, meanflow=True, seed=5, axes=(4, 6, 6))
    pipe = converted(tmp_path_factory, "hy15_i2v", model, pipeline="HunyuanVideo15ImageToVideoPipeline", guidance=1.0)
    torch.manual_seed(4)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=24, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14)).eval()
    ref = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=model, vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=1.0), image_encoder=siglip,
        feature_extractor=SiglipImageProcessor(size={"height": 28, "width": 28}))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    height, width = ref.video_processor.calculate_default_height_width(40, 70, 64)
    fitted = ref.video_processor.resize(image, height=height, width=width, resize_mode="crop")
    states = prompt_states(9)
    t = 2
    init = np.random.default_rng(2).standard_normal((1, 4, t, height // 16, width // 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(image=image, num_frames=5, num_inference_steps=4, latents=torch.from_numpy(init),
                   output_type="latent", **reference_kwargs(states)).frames.numpy()
        latents = ref._get_image_latents(ref.vae, ref.video_processor, fitted, height, width, "cpu")
        features = ref.encode_image(fitted, 1, "cpu", torch.float32)
    from mlx_video.families.hunyuan15.pipeline import image_condition

    condition = image_condition(mx.array(latents.permute(0, 2, 3, 4, 1).numpy()), t)
    pipe.encode = lambda s, progress=False: ours_context(states[:1])
    pipe.encode_image = lambda image, s, progress=False: (condition, mx.array(features.numpy()))
    pipe.folder.has = lambda name: True  # the image's VAE latents and features come from the reference above
    s = GenerationSettings(prompt="p", width=width, height=height, frames=5, steps=4, image="image.png")
    got = pipe.generate(s, init_latents=init, image=np.zeros((height, width, 3), np.float32)).latents
    assert s.guidance is None and pipe.resolve(s).guidance == 1.0 and pipe.resolve(s).shift == 7.0
    assert rel_err(got, want) < 1e-5


def test_generate_refuses_what_this_build_lacks(t2v, tmp_path):
    """No prompt encoder, no VAE: a clear error before any denoising, not a traceback."""
    _, pipe = t2v
    with pytest.raises(MlxVideoError, match="no text encoder"):
        Pipeline.from_pretrained(str(pipe.folder.path)).generate(GenerationSettings(prompt="a cat", width=64,
                                                                                    height=48, frames=5, steps=1))
    with pytest.raises(MlxVideoError, match="LoRAs are not supported"):
        pipe.resolve(GenerationSettings(prompt="a", loras=[{"path": str(tmp_path / "x.safetensors")}]))
