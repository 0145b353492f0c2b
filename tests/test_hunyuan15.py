"""HunyuanVideo 1.5 against diffusers 0.42.1: the transformer (`HunyuanVideo15Transformer3DModel`) at tiny random
configs through `mlxvid convert`; the denoising of `HunyuanVideo15Pipeline` (CFG; guidance 1 with its decoded frames)
and of `HunyuanVideo15ImageToVideoPipeline` (the step-distilled MeanFlow model, with its decoded frames) to the final
latents; every key and shape
of the published transformer (built on torch's meta device).

The pipeline runs go from the prompt (a tiny Qwen2.5-VL text model, a tiny ByT5 for the quoted text) and, for I2V,
an image file (a tiny VAE and SigLIP) through `mlxvid convert` and `mlxvid generate --save-latents`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.pipelines.base import GenerationSettings, Pipeline  # noqa: E402
from support.tensor_files import meta_state, write_description  # noqa: E402
from support.hunyuan15 import (  # noqa: E402
    GLYPH_DIM, IMAGE_DIM, TEXT_DIM, build_tiny_i2v_pipeline, build_tiny_t2v_pipeline, official_state,
    save_transformer_folder, tiny_transformer,
)
from support.arrays import rel_err  # noqa: E402

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


def test_official_release_layout_every_key_and_shape(tmp_path):
    """The official transformer at the published size (its keys and shapes recorded from the official class on the
    meta device: tests/fixtures/hunyuan15/record_official_keys.py) as the release lays it out,
    transformer/480p_i2v_step_distilled/: every key planned onto ours with its shape, the configuration read from
    the shapes equal to the published one."""
    from mlx.utils import tree_flatten

    from mlx_video.convert.convert import plan
    from mlx_video.families.hunyuan15.config import HUNYUAN15_480P_MEANFLOW

    recorded = json.loads((Path(__file__).parent / "fixtures" / "hunyuan15" / "official_transformer_keys.json").read_text())
    folder = tmp_path / "HunyuanVideo-1.5" / "transformer" / "480p_i2v_step_distilled"
    folder.mkdir(parents=True)
    write_description(folder / "diffusion_pytorch_model.safetensors",
                      {k: ("BF16", tuple(v), None) for k, v in recorded["shapes"].items()})
    (folder / "config.json").write_text(json.dumps({"ideal_resolution": "480p", "ideal_task": "i2v"}))
    conversion = plan(tmp_path / "HunyuanVideo-1.5")
    (component,) = conversion.components
    assert conversion.manifest["model"] == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    assert component.config == HUNYUAN15_480P_MEANFLOW.to_dict()
    ours = {k: tuple(v.shape) for k, v in tree_flatten(component.module.parameters())}
    assert {k: v[1] for k, v in component.tensors.items()} == ours
    assert len(ours) == len(recorded["shapes"]) == 1797


# --- the pipelines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,guidance,mode", [('a neon sign that reads "OPEN" at sunset', 6.0, "batched")])
def test_t2v_from_the_prompt_matches_diffusers(t2v, prompt, guidance, mode):
    """CFG 6 on "" with a quoted glyph (the ByT5 path runs for the prompt, not for the negative; the two passes
    keep different numbers of tokens): final latents from `mlxvid generate`. Guidance 1 (one pass, the distilled
    models' way) runs in `test_t2v_guidance_1_latents_and_frames_match_diffusers` and the I2V test."""
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


def test_t2v_guidance_1_latents_and_frames_match_diffusers(tmp_path_factory):
    """Guidance 1, the CFG-distilled models' path (one pass per step: diffusers' guider skips the unconditional pass
    at scale 1; the CFG-distilled model's default, read from the folder's guider), on another transformer (4 heads of
    10, 1 block, RoPE axes 2/4/4), 9 frames at 80x32, shift 7: the final latents from `mlxvid generate --save-latents`, and the PNG frames the same run writes against the frames
    diffusers' pipeline decodes (its own `output_type="np"` path; the latents it decodes recorded on the way)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hy15_t2v_g1")
    pipe = build_tiny_t2v_pipeline(root / "diffusers", guidance=1.0, shift=7.0,
                                   transformer=dict(heads=4, head_dim=10, layers=1, seed=9, axes=(2, 4, 4)))
    for name, value in (("tokenizer_max_length", 40), ("tokenizer_2_max_length", 32), ("vision_num_semantic_tokens", 3)):
        setattr(pipe, name, value)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    assert json.loads((root / "mlx" / "mlxvid.json").read_text())["model"] == "hunyuanvideo-1.5-480p-t2v-distilled"
    prompt = "a corgi surfs a wave at sunset"
    init = np.random.default_rng(11).standard_normal((1, 4, 3, 2, 5)).astype(np.float32)
    np.save(root / "init.npy", init)
    decoded, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: (decoded.append(z.clone()), decode(z, **kw))[1]
    with torch.no_grad():
        frames = pipe(prompt=prompt, height=32, width=80, num_frames=9, num_inference_steps=3,
                      latents=torch.from_numpy(init)).frames[0] * 255.0
    want = decoded[0].numpy() * pipe.vae.config.scaling_factor
    main(["generate", "--model", str(root / "mlx"), "--prompt", prompt, "--size", "80x32", "--frames", "9",
          "--steps", "3", "--shift", "7", "--init-latents", str(root / "init.npy"), "--save-latents",
          str(root / "out.npy"), "--output", str(root / "frames") + "/", "--quiet"])
    assert json.loads((root / "frames.json").read_text())["settings"]["guidance"] == 1.0  # the distilled model's default
    err = rel_err(np.load(root / "out.npy"), want)
    ours = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "frames").glob("*.png"))]).astype(np.float32)
    mean_abs = float(np.abs(ours - frames).mean())
    print(f"HunyuanVideo 1.5 T2V, guidance 1: final latents rel {err:.2e}, decoded frames {mean_abs:.3f}/255 mean "
          f"absolute (frames' std {frames.std():.1f})")
    assert err < 1e-5
    assert ours.shape == frames.shape == (9, 32, 80, 3) and mean_abs < 1.0 and frames.std() > 20


def test_quantized_transformer_runs(t2v):
    """`--quantize q8` stores the transformer blocks' linear layers (those whose width the group size divides, at
    this tiny size) in 8 bits; the run stays within 1e-2 of the float32 conversion's."""
    root, _ = t2v
    main(["convert", str(root / "diffusers"), str(root / "q8"), "--dtype", "fp32", "--quantize", "q8"])
    manifest = json.loads((root / "q8" / "mlxvid.json").read_text())
    assert manifest["quantization"]["mode"] == "q8"
    init = np.random.default_rng(5).standard_normal((1, 4, 2, 3, 4)).astype(np.float32)
    np.save(root / "init_q.npy", init)
    outs = {}
    for name in ("mlx", "q8"):
        main(["generate", "--model", str(root / name), "--prompt", "a corgi surfs a wave", "--size", "64x48",
              "--frames", "5", "--steps", "2", "--init-latents", str(root / "init_q.npy"), "--save-latents",
              str(root / f"q_{name}.npy"), "--quiet", "--overwrite"])
        outs[name] = np.load(root / f"q_{name}.npy")
    err = rel_err(outs["q8"], outs["mlx"])
    print(f"HunyuanVideo 1.5 --quantize q8 against the float32 conversion: final latents rel {err:.2e}")
    assert 0 < err < 1e-2


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


def bucket_image(pipe, path, height: int, width: int) -> tuple[int, int]:
    """An image of the bucket diffusers picks for `height` x `width` (so that no resampling stands between the two
    pipelines), saved to `path`; its (height, width)."""
    from PIL import Image

    height, width = pipe.video_processor.calculate_default_height_width(height, width, 64)
    ramp = np.linspace(40, 200, width)[None, :, None]
    pixels = np.clip(np.random.default_rng(1).standard_normal((height, width, 3)) * 40 + ramp, 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return height, width


def converted_i2v(root, **pipeline):
    """A tiny diffusers I2V folder (`build_tiny_i2v_pipeline(**pipeline)`, short prompt lengths) converted to
    root/mlx; (root, the diffusers pipeline)."""
    pipe = build_tiny_i2v_pipeline(root / "diffusers", **pipeline)
    for name, value in (("tokenizer_max_length", 40), ("tokenizer_2_max_length", 32)):
        setattr(pipe, name, value)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


def test_i2v_with_guidance_matches_diffusers(tmp_path_factory):
    """The CFG I2V models (480p/720p I2V: guidance 6, no MeanFlow): the unconditional pass on the empty prompt with
    the same image condition, 3 steps at shift 5, from an image file, 9 frames; final latents."""
    from PIL import Image

    root, pipe = converted_i2v(tmp_path_factory.mktemp("hy15_i2v_cfg"), guidance=6.0, shift=5.0, meanflow=False)
    height, width = bucket_image(pipe, root / "image.png", 64, 48)
    init = np.random.default_rng(3).standard_normal((1, 4, 3, height // 16, width // 16)).astype(np.float32)
    np.save(root / "init.npy", init)
    prompt = "a paper boat drifts down a rainy street"
    with torch.no_grad():
        want = pipe(image=Image.open(root / "image.png"), prompt=prompt, num_frames=9, num_inference_steps=3,
                    latents=torch.from_numpy(init), output_type="latent").frames
    main(["generate", "--model", str(root / "mlx"), "--prompt", prompt, "--image", str(root / "image.png"),
          "--frames", "9", "--steps", "3", "--init-latents", str(root / "init.npy"),
          "--save-latents", str(root / "out.npy"), "--quiet", "--overwrite"])
    got = np.load(root / "out.npy")
    err = rel_err(got, want.numpy())
    print(f"HunyuanVideo 1.5 I2V with CFG 6 (3 steps, 9 frames): final latents rel {err:.2e}")
    assert Pipeline.from_pretrained(str(root / "mlx")).spec.defaults["guidance"] == 6.0
    assert err < 1e-5


def test_step_distilled_i2v_from_the_image_matches_diffusers(tmp_path_factory):
    """The step-distilled I2V model (MeanFlow: timestep_r the next step's timestep, 0 at the last) over 4 steps at
    guidance 1, from an image file through `mlxvid convert` + `mlxvid generate --image`: our VAE encodes the image
    onto latent frame 0 beside the mask channel, our SigLIP gives its features; final latents, then the frames our
    VAE decodes from them against diffusers' decoding of its own."""
    from PIL import Image

    root, pipe = converted_i2v(tmp_path_factory.mktemp("hy15_i2v"))
    height, width = bucket_image(pipe, root / "image.png", 48, 80)
    init = np.random.default_rng(2).standard_normal((1, 4, 2, height // 16, width // 16)).astype(np.float32)
    np.save(root / "init.npy", init)
    prompt = 'a neon sign that reads "OPEN"'
    with torch.no_grad():
        want = pipe(image=Image.open(root / "image.png"), prompt=prompt, num_frames=5, num_inference_steps=4,
                    latents=torch.from_numpy(init), output_type="latent").frames
        video = pipe.vae.decode(want / pipe.vae.config.scaling_factor).sample
        frames = pipe.video_processor.postprocess_video(video, output_type="np")[0] * 255.0
    # no --size: the image's aspect picks the bucket, as in the reference
    main(["generate", "--model", str(root / "mlx"), "--prompt", prompt, "--image", str(root / "image.png"),
          "--frames", "5", "--steps", "4", "--init-latents", str(root / "init.npy"),
          "--save-latents", str(root / "out.npy"), "--quiet", "--overwrite"])
    got = np.load(root / "out.npy")
    err = rel_err(got, want.numpy())
    ours_pipe = Pipeline.from_pretrained(str(root / "mlx"))
    ours, _ = ours_pipe.decode(got)
    settings = ours_pipe.resolve(GenerationSettings(prompt=prompt, image=str(root / "image.png"), frames=5))
    assert (settings.width, settings.height) == (width, height)  # the image's bucket
    stages = ours_pipe.estimate_memory(settings, has_image=True)["stages"]
    assert set(stages) == {"text_encoding", "image_encoding", "denoising", "decoding"}
    mean_abs = float(np.abs(ours.astype(np.float32) - frames).mean())
    print(f"HunyuanVideo 1.5 step-distilled I2V (MeanFlow, 4 steps): final latents rel {err:.2e}, "
          f"decoded frames {mean_abs:.3f}/255 mean absolute (frames' std {frames.std():.1f})")
    assert err < 1e-5
    assert ours.shape == frames.shape and mean_abs < 1.0 and frames.std() > 20


def test_official_transformer_replaces_a_diffusers_folders(tmp_path_factory):
    """The release's step-distilled transformer (official names, its own folder with config.json) put in place of a
    diffusers folder's with `--transformer` and `--base`: the same latents as the diffusers-named conversion."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hy15_official")
    pipe = build_tiny_i2v_pipeline(root / "diffusers")
    official = root / "HunyuanVideo-1.5" / "transformer" / "480p_i2v_step_distilled"
    official.mkdir(parents=True)
    save_file(official_state(pipe.transformer.state_dict()), str(official / "diffusion_pytorch_model.safetensors"))
    config = {"ideal_resolution": "480p", "ideal_task": "i2v", "rope_dim_list": [4, 8, 8], "rope_theta": 256}
    (official / "config.json").write_text(json.dumps(config))
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    main(["convert", str(root / "diffusers"), str(root / "mixed"), "--dtype", "fp32", "--transformer", str(official),
          "--base", "hunyuanvideo-1.5-480p-i2v-step-distilled"])
    assert json.loads((root / "mixed" / "mlxvid.json").read_text())["model"] == "hunyuanvideo-1.5-480p-i2v-step-distilled"
    x = mx.random.normal((1, 2, 2, 3, 9), key=mx.random.key(0))
    args = (x, mx.array([800.0]), mx.random.normal((1, 5, 24), key=mx.random.key(1)), None, None, None,
            mx.random.normal((1, 3, IMAGE_DIM), key=mx.random.key(2)), mx.array([300.0]))
    a, b = (Pipeline.from_pretrained(str(root / name)).load_transformer()(*args) for name in ("mlx", "mixed"))
    assert np.array_equal(np.array(a), np.array(b))


def test_official_release_layout_from_the_prompt(t2v):
    """The release's layout as its checkpoints-download.md builds it (transformer/480p_t2v/ in the official names,
    vae/, text_encoder/llm with its tokenizer, text_encoder/byt5-small/config.json, text_encoder/Glyph-SDXL-v2 with
    checkpoints/byt5_model.pt (a training state dict under module.text_tower.encoder.) and assets/), converted
    alone, generates what the diffusers folder's conversion generates: the same latents, a quoted glyph included."""
    import shutil

    root, pipe = t2v
    release = root / "HunyuanVideo-1.5"
    official = release / "transformer" / "480p_t2v"
    official.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(official_state(pipe.transformer.state_dict()), str(official / "diffusion_pytorch_model.safetensors"))
    (official / "config.json").write_text(json.dumps({"ideal_resolution": "480p", "rope_dim_list": [4, 6, 6]}))
    shutil.copytree(root / "diffusers" / "vae", release / "vae")
    pipe.text_encoder.save_pretrained(release / "text_encoder" / "llm")
    pipe.tokenizer.save_pretrained(release / "text_encoder" / "llm")
    (release / "text_encoder" / "byt5-small").mkdir()
    pipe.text_encoder_2.config.to_json_file(release / "text_encoder" / "byt5-small" / "config.json")
    glyph = release / "text_encoder" / "Glyph-SDXL-v2"
    (glyph / "checkpoints").mkdir(parents=True)
    (glyph / "assets").mkdir()
    for name in ("color_idx.json", "multilingual_10-lang_idx.json"):  # no added tokens: the tiny ByT5's 384 rows
        (glyph / "assets" / name).write_text("{}")
    encoder = {f"module.text_tower.encoder.{k}": v for k, v in pipe.text_encoder_2.encoder.state_dict().items()}
    torch.save({"state_dict": encoder}, glyph / "checkpoints" / "byt5_model.pt")
    main(["convert", str(release), str(root / "from_release"), "--dtype", "fp32"])
    manifest = json.loads((root / "from_release" / "mlxvid.json").read_text())
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(manifest["components"])
    prompt = 'a neon sign that reads "OPEN" at sunset'
    init = np.random.default_rng(8).standard_normal((1, 4, 2, 3, 4)).astype(np.float32)
    np.save(root / "init_release.npy", init)
    for name in ("mlx", "from_release"):
        main(["generate", "--model", str(root / name), "--prompt", prompt, "--size", "64x48", "--frames", "5",
              "--steps", "2", "--init-latents", str(root / "init_release.npy"), "--save-latents",
              str(root / f"release_{name}.npy"), "--quiet", "--overwrite"])
    assert np.array_equal(np.load(root / "release_mlx.npy"), np.load(root / "release_from_release.npy"))


def test_i2v_size_is_the_reference_bucket():
    """Without --size, an I2V run takes the bucket diffusers' HunyuanVideo15ImageProcessor picks for the image's
    aspect, at the 480p and 720p bases: portrait, landscape, square and extreme aspects."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    from mlx_video.families.hunyuan15.pipeline import bucket_for

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for base in (640, 960):
        for h, w in [(480, 848), (848, 480), (512, 512), (600, 800), (1000, 250), (97, 1313), (1080, 1920), (721, 720)]:
            assert bucket_for(h, w, base) == processor.calculate_default_height_width(h, w, base), (base, h, w)


def test_refusals(tmp_path_factory, tmp_path, capsys):
    """Clear errors before any work: a folder without a text encoder, a video output without a VAE, a LoRA file that
    is not there, the download of a model without a diffusers repository."""
    bare = converted(tmp_path_factory, "hy15_bare", tiny_transformer())
    with pytest.raises(MlxVideoError, match="no text encoder"):
        bare.generate(GenerationSettings(prompt="a cat", width=64, height=48, frames=5, steps=1))
    with pytest.raises(MlxVideoError, match="x.safetensors does not exist"):
        bare.resolve(GenerationSettings(prompt="a", loras=[{"path": str(tmp_path / "x.safetensors")}]))
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(bare.folder.path), "--prompt", "a cat", "--size", "64x48", "--frames", "5",
              "--steps", "1", "--output", str(tmp_path / "out.mp4")])
    assert not (tmp_path / "out.mp4").exists() and "no VAE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the step-distilled model is only in the official release
        main(["download", "hunyuanvideo-1.5-480p-i2v-step-distilled"])
    assert "--base hunyuanvideo-1.5-480p-i2v-step-distilled" in capsys.readouterr().err
