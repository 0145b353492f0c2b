"""HunyuanVideo 1.5 against diffusers 0.42.1: the transformer (`HunyuanVideo15Transformer3DModel`) at tiny random
configs through `mlxvid convert`; the denoising of `HunyuanVideo15Pipeline` (CFG, guidance 1) and of
`HunyuanVideo15ImageToVideoPipeline` (the step-distilled MeanFlow model) to the final latents; every key and shape
of the published transformer (built on torch's meta device).

The T2V runs go from the prompt (a tiny Qwen2.5-VL text model, a tiny ByT5 for the quoted text) through
`mlxvid convert` and `mlxvid generate --save-latents`. The 32-channel VAE is not in this build: the I2V run gives
both sides the same prompt states (diffusers' `prompt_embeds` arguments) and our pipeline the image conditioning
the reference computes (its VAE latents of the image, its SigLIP features)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402
from diffusers import (  # noqa: E402
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Transformer3DModel,
)

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.pipelines.base import GenerationSettings, Pipeline  # noqa: E402
from mlxvid_test_helpers import meta_state, write_description  # noqa: E402
from tiny_hunyuan15 import (  # noqa: E402
    GLYPH_DIM,
    IMAGE_DIM,
    TEXT_DIM,
    build_tiny_t2v_pipeline,
    save_transformer_folder,
    tiny_transformer,
    tiny_vae,
)

def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def converted(tmp_path_factory, name, model, **kwargs):
    root = tmp_path_factory.mktemp(name)
    save_transformer_folder(root / "diffusers", model, **kwargs)
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


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """A tiny HunyuanVideo15Pipeline (Qwen2.5-VL, ByT5, transformer) saved and converted; the reference pads its
    prompts to fewer tokens than the released 1000 / 256 and gives T2V fewer all-zero image tokens than 729 (all
    of it masked: the valid tokens' numbers do not change), so that it runs in seconds."""
    root = tmp_path_factory.mktemp("hy15_t2v")
    pipe = build_tiny_t2v_pipeline(root / "diffusers")
    for name, value in (("tokenizer_max_length", 40), ("tokenizer_2_max_length", 32), ("vision_num_semantic_tokens", 4)):
        setattr(pipe, name, value)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


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
    err = rel_err(np.array(got).transpose(0, 4, 1, 2, 3), want)
    print(f"HunyuanVideo 1.5 transformer ({heads}x{head_dim}, {layers} blocks): rel {err:.2e}")
    assert err < 1e-5


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


@pytest.mark.parametrize("prompt,guidance,mode", [('a neon sign that reads "OPEN" at sunset', 6.0, "batched"),
                                                  ("a corgi surfs a wave", 1.0, "batched")])
def test_t2v_from_the_prompt_matches_diffusers(t2v, prompt, guidance, mode):
    """CFG 6 on "" with a quoted glyph (the ByT5 path runs for the prompt, not for the negative), and guidance 1
    (one pass, the distilled models' way) without one: final latents from `mlxvid generate`."""
    root, pipe = t2v
    pipe.guider = pipe.guider.__class__(guidance_scale=guidance)
    init = np.random.default_rng(int(guidance)).standard_normal((1, 4, 2, 3, 4)).astype(np.float32)
    np.save(root / "init.npy", init)
    with torch.no_grad():
        want = pipe(prompt=prompt, height=48, width=64, num_frames=5, num_inference_steps=3,
                    latents=torch.from_numpy(init), output_type="latent").frames.numpy()
    main(["generate", "--model", str(root / "mlx"), "--prompt", prompt, "--size", "64x48", "--frames", "5",
          "--steps", "3", "--guidance", str(guidance), "--guidance-mode", mode, "--init-latents",
          str(root / "init.npy"), "--save-latents", str(root / f"out{guidance}.npy"), "--quiet", "--overwrite"])
    got = np.load(root / f"out{guidance}.npy")
    err = rel_err(got, want)
    print(f"HunyuanVideo 1.5 T2V, guidance {guidance}: final latents rel {err:.2e}")
    assert err < 1e-5


def test_converted_folder(t2v):
    root, _ = t2v
    manifest = json.loads((root / "mlx" / "mlxvid.json").read_text())
    assert manifest["family"] == "hunyuan15" and manifest["model"] == "hunyuanvideo-1.5-480p-t2v"
    assert manifest["vae_stride"] == [4, 16, 16] and manifest["defaults"]["shift"] == 5.0
    assert {"transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(manifest["components"])
    # Qwen's last two decoder layers and its final norm are not stored (the states are hidden_states[-3])
    index = json.loads((root / "mlx" / "text_encoder" / "model.safetensors.index.json").read_text())
    layers = {int(k.split(".")[2]) for k in index["weight_map"] if k.startswith("model.layers.")}
    assert layers == {0, 1, 2} and "model.norm.weight" not in index["weight_map"]


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
    has = pipe.folder.has  # the image's VAE latents and features come from the reference above
    pipe.folder.has = lambda name: name in ("vae", "image_encoder") or has(name)
    s = GenerationSettings(prompt="p", width=width, height=height, frames=5, steps=4, image="image.png")
    got = pipe.generate(s, init_latents=init, image=np.zeros((height, width, 3), np.float32)).latents
    assert s.guidance is None and pipe.resolve(s).guidance == 1.0 and pipe.resolve(s).shift == 7.0
    err = rel_err(got, want)
    print(f"HunyuanVideo 1.5 step-distilled I2V (MeanFlow, 4 steps): final latents rel {err:.2e}")
    assert err < 1e-5


def test_refusals(t2v, tmp_path_factory, tmp_path):
    """Clear errors before any denoising: a folder without a text encoder, a video output without a VAE, LoRAs."""
    bare = converted(tmp_path_factory, "hy15_bare", tiny_transformer())
    with pytest.raises(MlxVideoError, match="no text encoder"):
        bare.generate(GenerationSettings(prompt="a cat", width=64, height=48, frames=5, steps=1))
    with pytest.raises(MlxVideoError, match="LoRAs are not supported"):
        bare.resolve(GenerationSettings(prompt="a", loras=[{"path": str(tmp_path / "x.safetensors")}]))
    root, _ = t2v
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root / "mlx"), "--prompt", "a cat", "--size", "64x48", "--frames", "5",
              "--steps", "1", "--output", str(tmp_path / "out.mp4")])
    assert not (tmp_path / "out.mp4").exists()
