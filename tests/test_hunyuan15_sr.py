"""HunyuanVideo 1.5 super-resolution: the latent upsamplers (480p -> 720p, 720p -> 1080p) and the SR step's
conditioning against a torch transcription of the official code (tests/support/reference/hy15_sr.py, cited there), in CI;
and, when HUNYUANVIDEO15_REPO names a checkout of Tencent-Hunyuan/HunyuanVideo-1.5, the transcription against the
official classes and the whole SR stage against the official `HunyuanVideo_1_5_SR_Pipeline` on CPU torch."""

from __future__ import annotations

import json
import os
import re

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from support.reference import hy15_sr as ref  # noqa: E402
from mlx_video.convert.rules import convert_weights  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.families.hunyuan15.sr import renoise_low_res, sr_conditions, uses_low_res  # noqa: E402
from mlx_video.families.hunyuan15.upsampler import (  # noqa: E402
    UpsamplerConfig,
    build_upsampler,
    upsample_latents,
    upsampler_keymap,
)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module.eval()


def reference_upsampler(cfg: UpsamplerConfig, seed: int = 0):
    if cfg.kind == "720p":
        module = ref.SRTo720pUpsampler(cfg.in_channels, cfg.out_channels, cfg.hidden_channels, cfg.num_blocks,
                                       cfg.global_residual)
    else:
        module = ref.SRTo1080pUpsampler(cfg.z_channels, cfg.out_channels, cfg.block_out_channels, cfg.num_res_blocks)
    return randomize(module, seed)


def ours(module, cfg: UpsamplerConfig):
    """Our upsampler with the reference's weights, through the official names' key map."""
    weights = {k: mx.array(v.detach().numpy()) for k, v in module.state_dict().items()}
    model = build_upsampler(cfg)
    converted = convert_weights(upsampler_keymap(), weights)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten(list(converted.items())))
    return model


CONFIGS = {
    "720p": UpsamplerConfig(kind="720p", in_channels=4, out_channels=4, hidden_channels=6, num_blocks=2,
                            global_residual=True),
    "720p-narrow-out": UpsamplerConfig(kind="720p", in_channels=5, out_channels=3, hidden_channels=8, num_blocks=1),
    "1080p": UpsamplerConfig(kind="1080p", z_channels=4, out_channels=4, block_out_channels=(8, 12),
                             num_res_blocks=1),
}


@pytest.mark.parametrize("name,frames,low,high", [("720p", 3, (5, 7), (8, 11)), ("720p-narrow-out", 1, (4, 4), (6, 6)),
                                                  ("1080p", 4, (6, 5), (9, 8))])
def test_upsampler_matches_reference(name, frames, low, high):
    """Resize (bilinear, non-integer factors) then the upsampler, as the SR pipeline runs it, in float32."""
    cfg = CONFIGS[name]
    module = reference_upsampler(cfg)
    channels = cfg.in_channels if cfg.kind == "720p" else cfg.z_channels
    x = torch.randn(1, channels, frames, *low, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(x.transpose(1, 2).flatten(0, 1), size=high, mode="bilinear",
                                                  align_corners=False).unflatten(0, (1, frames)).transpose(1, 2)
        want = module(resized).numpy()
    got = upsample_latents(ours(module, cfg), mx.array(x.permute(0, 2, 3, 4, 1).numpy()), *high)
    assert rel_err(np.array(got).transpose(0, 4, 1, 2, 3), want) < 1e-5


def test_sr_conditions_match_reference():
    """The condition beside the noisy latents: [zeros (T2V base condition and mask), the upsampled latents
    re-noised at 0.7, ones]; and the same without the last C + 1 channels once the timestep drops below 700."""
    cfg = CONFIGS["1080p"]
    module = reference_upsampler(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    lq, noise = torch.randn(1, 4, 2, 4, 6, generator=g), torch.randn(1, 4, 2, 7, 10, generator=g)
    with torch.no_grad():
        want, want_without = ref.sr_condition(module, lq, noise, (7, 10))
    upsampled = upsample_latents(ours(module, cfg), mx.array(lq.permute(0, 2, 3, 4, 1).numpy()), 7, 10)
    got, got_without = sr_conditions(renoise_low_res(upsampled, mx.array(noise.permute(0, 2, 3, 4, 1).numpy())), None)
    for a, b in ((got, want), (got_without, want_without)):
        assert a.shape[-1] == 2 * 4 + 2
        np.testing.assert_allclose(np.array(a).transpose(0, 4, 1, 2, 3), b.numpy(), rtol=1e-5, atol=1e-5)


def test_low_res_guide_stops_below_strength():
    """The 720p SR run's 6 steps at shift 2: timesteps 1000, 909, 800, 667, 500, 286; the guide is seen while
    t >= 700 (the first three), and once dropped stays dropped."""
    from mlx_video.samplers import make_sampler

    timesteps = make_sampler("euler", 6, 2.0).timesteps
    np.testing.assert_allclose(np.asarray(timesteps, dtype=np.float64), [1000, 909.09, 800, 666.67, 500, 285.71],
                               atol=0.01)
    assert [uses_low_res(timesteps, i) for i in range(6)] == [True, True, True, False, False, False]
    assert [uses_low_res([800, 650, 750], i) for i in range(3)] == [True, False, False]


def test_upsampler_config_from_official_json():
    cfg = UpsamplerConfig.from_json({"_class_name": "SRTo720pUpsampler", "_diffusers_version": "0.35.0",
                                     "in_channels": 32, "out_channels": 32, "hidden_channels": None,
                                     "num_blocks": 6, "global_residual": False})
    assert (cfg.kind, cfg.hidden_channels, cfg.num_blocks) == ("720p", 64, 6)
    cfg = UpsamplerConfig.from_json({"_class_name": "SRTo1080pUpsampler", "z_channels": 32, "out_channels": 32,
                                     "block_out_channels": [64, 64], "num_res_blocks": 2, "is_residual": False})
    assert (cfg.kind, cfg.block_out_channels) == ("1080p", (64, 64))
    with pytest.raises(ValueError, match="SRTo720pUpsampler"):
        UpsamplerConfig.from_json({"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="multiple of z_channels"):
        UpsamplerConfig(kind="1080p", z_channels=32, block_out_channels=(48,))


# --- against the official code (HUNYUANVIDEO15_REPO) -------------------------------------------------------

OFFICIAL = os.environ.get("HUNYUANVIDEO15_REPO")
needs_official = pytest.mark.skipif(
    not OFFICIAL, reason="HUNYUANVIDEO15_REPO is not set (a checkout of Tencent-Hunyuan/HunyuanVideo-1.5; its code "
    "also imports einops, loguru and psutil)")
TEXT_DIM, GLYPH_DIM, IMAGE_DIM = 20, 1472, 16  # the official ByT5 mapper has a fixed 1472-wide input


class StandIn:
    """An object with the given attributes, for what this test does not run (VAE, text encoder, parallelism)."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def import_official():
    """The official SR pipeline module. Its base pipeline imports torchvision (only for I2V image transforms), which
    is not a test dependency: where it cannot be imported, a stand-in module is registered after diffusers has
    decided torchvision is absent (the I2V test then skips). Its parallel state is set to a single process."""
    import importlib
    import importlib.util
    import sys
    import types

    import diffusers.image_processor  # noqa: F401
    import diffusers.loaders.peft  # noqa: F401
    import diffusers.pipelines.pipeline_utils  # noqa: F401

    try:
        import torchvision  # noqa: F401  (the I2V SR test needs its transforms)
    except (ImportError, RuntimeError):  # absent, or built for another torch
        sys.modules.pop("torchvision", None)
    if "torchvision" not in sys.modules:
        stand_in = types.ModuleType("torchvision")
        stand_in.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": stand_in, "torchvision.transforms": stand_in.transforms})
    if "hyvideo" not in sys.modules:  # the checkout's package by its own path, leaving sys.path alone
        package = Path(OFFICIAL) / "hyvideo"
        spec = importlib.util.spec_from_file_location("hyvideo", package / "__init__.py",
                                                      submodule_search_locations=[str(package)])
        sys.modules["hyvideo"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["hyvideo"])
    # one process, no sequence parallelism; the official default state builds a CUDA device mesh
    parallel = importlib.import_module("hyvideo.commons.parallel_states")
    parallel.__dict__["__parallel_dims"] = StandIn(sp=1, sp_enabled=False, sp_rank=0, sp_group=None)
    return importlib.import_module("hyvideo.pipelines.hunyuan_video_sr_pipeline")


def official_upsampler(cfg: UpsamplerConfig, state: dict):
    from hyvideo.models.transformers.modules import upsample

    if cfg.kind == "720p":
        module = upsample.SRTo720pUpsampler(cfg.in_channels, cfg.out_channels, cfg.hidden_channels, cfg.num_blocks,
                                            cfg.global_residual)
    else:
        module = upsample.SRTo1080pUpsampler(cfg.z_channels, cfg.out_channels, cfg.block_out_channels,
                                             cfg.num_res_blocks)
    module.load_state_dict(state)  # strict: the transcription's names and shapes are the official ones
    return module.eval()


@needs_official
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transcription_matches_official(name):
    import_official()
    cfg = CONFIGS[name]
    module = reference_upsampler(cfg, seed=7)
    official = official_upsampler(cfg, module.state_dict())
    x = torch.randn(1, 4 if cfg.kind == "1080p" else cfg.in_channels, 3, 5, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(module(x), official(x), rtol=0, atol=0)


def official_transformer(heads=2, head_dim=24, axes=(4, 10, 10), layers=2, seed=11, resolution="720p"):
    """A tiny official SR transformer on the 32 latent channels the official SR pipeline hard-codes: 3 x 32 + 2
    = 98 input channels (its PatchEmbed widens in_channels 65 by half of itself plus one when
    `is_reshape_temporal_channels`)."""
    from hyvideo.models.transformers.hunyuanvideo_1_5_transformer import HunyuanVideo_1_5_DiffusionTransformer

    model = HunyuanVideo_1_5_DiffusionTransformer(
        patch_size=[1, 1, 1], in_channels=65, concat_condition=True, is_reshape_temporal_channels=True,
        out_channels=32, hidden_size=heads * head_dim, heads_num=heads, mlp_width_ratio=2.0,
        mm_double_blocks_depth=layers, mm_single_blocks_depth=0, rope_dim_list=list(axes), text_states_dim=TEXT_DIM,
        glyph_byT5_v2=True, vision_projection="linear", vision_states_dim=IMAGE_DIM, use_cond_type_embedding=True,
        ideal_resolution=resolution, ideal_task="t2v")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # wide layers (the 1472 / 2048 glyph mapper) scaled by their fan-in
            p.normal_(0.0, 0.1 if p.ndim == 1 else min(0.1, 1.0 / p[0].numel() ** 0.5))
    return model.eval().float()


def official_folder(root, variant, transformer, upsampler, upsampler_cfg: dict):
    """The release layout: transformer/<variant>/ and upsampler/<variant>/."""
    from safetensors.torch import save_file

    for part, module, config in (("transformer", transformer, dict(transformer.config)),
                                 ("upsampler", upsampler, upsampler_cfg)):
        folder = root / part / variant
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    return root


def run_official_sr(module, transformer, upsampler, lq, text, glyph, seed, base, steps, image=None, vae=None,
                    vision_encoder=None):
    """The official SR pipeline's __call__ on CPU in float32 (output_type "latent"), the prompt states given (its
    `encode_prompt` / `_prepare_byt5_embeddings` replaced), its resolution buckets at a tiny base (SizeMap, the
    only sizes it reads); for I2V, `image` (a file) with the VAE and vision encoder that encode it. Returns (final
    latents, the initial noise, the re-noising's noise)."""
    pipe = module.HunyuanVideo_1_5_SR_Pipeline(
        vae=vae or StandIn(config=StandIn(block_out_channels=[1] * 5)),
        text_encoder=StandIn(max_length=text[0].shape[1]), transformer=transformer, scheduler=None,
        upsampler=upsampler, flow_shift=2.0, guidance_scale=1.0, num_inference_steps=steps, base_resolution=base,
        vision_num_semantic_tokens=5, vision_states_dim=IMAGE_DIM, execution_device="cpu",
        vision_encoder=vision_encoder)
    pipe.target_dtype, pipe.autocast_enabled = torch.float32, False
    pipe.encode_prompt = lambda *a, **k: (text[0], None, text[1], None)
    pipe._prepare_byt5_embeddings = lambda *a, **k: {"byt5_text_states": glyph[0], "byt5_text_mask": glyph[1]}
    seen = {}
    prepare, add_noise = pipe.prepare_latents, pipe.add_noise_to_lq

    def prepare_latents(*args, **kwargs):
        seen["init"] = prepare(*args, **kwargs)
        return seen["init"]

    def add_noise_to_lq(lq_latents, strength=0.7):
        out = add_noise(lq_latents, strength)
        seen["noise"] = (out - (1 - strength) * lq_latents) / strength
        return out

    pipe.prepare_latents, pipe.add_noise_to_lq = prepare_latents, add_noise_to_lq
    sizes = dict(module.SizeMap)
    module.SizeMap.update({base: 64, transformer.config.ideal_resolution: 96})
    try:
        with torch.no_grad():
            out = pipe(prompt="p", video_length=5, lq_latents=lq, output_type="latent", seed=seed,
                       reference_image=image).videos
    finally:
        module.SizeMap.update(sizes)
    return out.numpy(), seen["init"].numpy(), seen["noise"]


SR_CASES = {  # variant: (base resolution, steps, transformer sizes, upsampler)
    "720p_sr_distilled": ("480p", 6, dict(heads=2, head_dim=24, axes=(4, 10, 10), layers=2, seed=11),
                          UpsamplerConfig(kind="1080p", z_channels=32, out_channels=32, block_out_channels=(32, 40),
                                          num_res_blocks=1)),
    "1080p_sr_distilled": ("720p", 8, dict(heads=3, head_dim=16, axes=(4, 6, 6), layers=1, seed=12),
                           UpsamplerConfig(kind="720p", in_channels=32, out_channels=32, hidden_channels=8,
                                           num_blocks=2, global_residual=True)),
}


def upsampler_json(cfg: UpsamplerConfig) -> dict:
    if cfg.kind == "720p":
        return {"_class_name": "SRTo720pUpsampler", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
                "hidden_channels": cfg.hidden_channels, "num_blocks": cfg.num_blocks,
                "global_residual": cfg.global_residual}
    return {"_class_name": "SRTo1080pUpsampler", "z_channels": cfg.z_channels, "out_channels": cfg.out_channels,
            "block_out_channels": list(cfg.block_out_channels), "num_res_blocks": cfg.num_res_blocks}


@needs_official
@pytest.mark.parametrize("variant", sorted(SR_CASES))
def test_sr_latents_match_official(tmp_path, variant):
    """The whole SR stage at a tiny config, both models: our upscale (converted from the release layout by
    `mlxvid convert`) against the official pipeline over its 6 / 8 steps at shift 2 (the low-resolution guide in
    the first 3 / 4, while t >= 700), from the same noise. Either upsampler class runs in either model here."""
    from mlx_video.cli import main
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    module = import_official()
    base, steps, sizes, cfg = SR_CASES[variant]
    transformer = official_transformer(**sizes, resolution=variant.split("_")[0])
    upsampler = official_upsampler(cfg, reference_upsampler(cfg, seed=5).state_dict())
    g = torch.Generator().manual_seed(3)
    lq = torch.randn(1, 32, 2, 3, 5, generator=g)  # an 80x48 run's latents
    text = (torch.randn(1, 7, TEXT_DIM, generator=g), (torch.arange(7) < 5).long()[None])
    glyph_mask = (torch.arange(4) < 2).long()[None]
    glyph = (torch.randn(1, 4, GLYPH_DIM, generator=g) * glyph_mask[..., None], glyph_mask)
    want, init, noise = run_official_sr(module, transformer, upsampler, lq, text, glyph, 1, base, steps)

    root = official_folder(tmp_path / "release", variant, transformer, upsampler, upsampler_json(cfg))
    main(["convert", str(root), str(tmp_path / "mlx"), "--dtype", "fp32"])
    pipe = Pipeline.from_pretrained(str(tmp_path / "mlx"))
    pipe.encode = lambda s, progress=False: tuple(mx.array(a.numpy()) for a in (*text, *glyph))
    height, width = want.shape[-2:]
    s = GenerationSettings(prompt="p", width=width * 16, height=height * 16, frames=5)
    got = pipe.upscale(s, lq.numpy(), init_latents=init, low_res_noise=mx.array(noise.permute(0, 2, 3, 4, 1).numpy()))
    assert (width * 16, height * 16) == (112, 64) and pipe.resolve(s).steps == steps
    assert pipe.spec.id == "hunyuanvideo-1.5-" + variant.replace("_", "-")
    err = rel_err(got.latents, want)
    print(f"SR {variant} final latents: relative error {err:.2e}")
    assert err < 1e-5


def tiny_image_encoders(folder):
    """A diffusers I2V folder holding what an I2V run's SR stage encodes its image with (a VAE of 32 latent channels,
    a 1-layer SigLIP of 16 on 28x28 pixels with its processor, beside a tiny transformer), saved into `folder`;
    (vae, siglip, processor)."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from support.hunyuan15 import randomize_, save_transformer_folder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=8, num_layers=1, text_embed_dim=24,
        text_embed_2_dim=GLYPH_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=(2, 2, 4), target_size=64)
    save_transformer_folder(folder, transformer, pipeline="HunyuanVideo15ImageToVideoPipeline", guidance=1.0)
    torch.manual_seed(13)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=32, block_out_channels=(8, 8, 16, 16, 64), layers_per_block=1,
                                      scaling_factor=0.8).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=24, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14)).eval()
    randomize_(siglip, 14)
    processor = SiglipImageProcessor(size={"height": 28, "width": 28})
    for name, part in (("vae", vae), ("image_encoder", siglip), ("feature_extractor", processor)):
        part.save_pretrained(folder / name)
    return vae, siglip, processor


@needs_official
def test_i2v_sr_latents_match_official(tmp_path):
    """An I2V run's SR stage (the 720p model, 2 heads of 24, 2 blocks): the official pipeline takes the run's own
    image (`reference_image`) and makes its condition again at the high resolution: the image scaled to cover
    112x64 (LANCZOS, rounded size, centre cut) through the VAE onto latent frame 0 beside a mask of ones there, and
    SigLIP's features of the image fitted to its bucket at the model's 720p resolution, unmasked. Ours from the same
    150x90 image file, encoded by an I2V model folder's VAE and SigLIP (`encode_reference`); final latents."""
    import sys

    from PIL import Image

    from mlx_video.cli import main
    from mlx_video.io.image import load_image
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    module = import_official()
    if not hasattr(sys.modules["torchvision"].transforms, "Compose"):
        pytest.skip("the official I2V path needs torchvision's transforms, which cannot be imported here")
    from hyvideo.models.vision_encoder import VisionEncoder

    base, steps, sizes, cfg = SR_CASES["720p_sr_distilled"]
    transformer = official_transformer(**sizes, resolution="720p")
    upsampler = official_upsampler(cfg, reference_upsampler(cfg, seed=5).state_dict())
    vae, siglip, processor = tiny_image_encoders(tmp_path / "i2v")
    vision = StandIn(processor=processor, model=siglip)
    vision.encode_images = lambda image: VisionEncoder.encode_images(vision, image)
    g = torch.Generator().manual_seed(6)
    pixels = np.clip(np.random.default_rng(4).standard_normal((90, 150, 3)) * 50 + np.linspace(30, 220, 150)[:, None],
                     0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    lq = torch.randn(1, 32, 2, 3, 5, generator=g)
    text = (torch.randn(1, 6, TEXT_DIM, generator=g), (torch.arange(6) < 4).long()[None])
    glyph = (torch.zeros(1, 4, GLYPH_DIM), torch.zeros(1, 4, dtype=torch.long))
    want, init, noise = run_official_sr(module, transformer, upsampler, lq, text, glyph, 2, base, steps,
                                        image=str(tmp_path / "image.png"), vae=vae, vision_encoder=vision)

    root = official_folder(tmp_path / "release", "720p_sr_distilled", transformer, upsampler, upsampler_json(cfg))
    main(["convert", str(root), str(tmp_path / "sr"), "--dtype", "fp32"])
    main(["convert", str(tmp_path / "i2v"), str(tmp_path / "base"), "--dtype", "fp32"])
    sr, encoder = Pipeline.from_pretrained(str(tmp_path / "sr")), Pipeline.from_pretrained(str(tmp_path / "base"))
    sr.encode = lambda s, progress=False: tuple(mx.array(a.numpy()) for a in (*text, *glyph))
    s = GenerationSettings(prompt="p", width=112, height=64, frames=5)
    states = sr.encode_reference(encoder, load_image(tmp_path / "image.png"), s)
    got = sr.upscale(s, lq.numpy(), init_latents=init, low_res_noise=mx.array(noise.permute(0, 2, 3, 4, 1).numpy()),
                     image_states=states)
    assert want.shape[-2:] == (4, 7)
    err = rel_err(got.latents, want)
    print(f"SR of an I2V run (720p model): final latents relative error {err:.2e}")
    assert err < 1e-5


# --- full size ----------------------------------------------------------------------------------------------

KEYS = Path(__file__).parent / "fixtures" / "hy15_sr" / "official_sr_transformer_keys.json"


def test_published_sr_model_every_key_and_shape(tmp_path):
    """The release layout of the 720p SR model planned onto ours: the official transformer's every key and shape at
    full size (recorded from the official module on the meta device, tests/fixtures/hy15_sr), and an upsampler
    (the official 720p class's defaults: 64 hidden channels, 6 blocks)."""
    from mlx.utils import tree_flatten

    from mlx_video.convert.convert import plan
    from support.tensor_files import write_description

    record = json.loads(KEYS.read_text())
    folder = tmp_path / "transformer" / "720p_sr_distilled"
    folder.mkdir(parents=True)
    write_description(folder / "diffusion_pytorch_model.safetensors",
                      {k: ("BF16", tuple(v), None) for k, v in record["keys"].items()})
    (folder / "config.json").write_text(json.dumps({"ideal_resolution": "720p", "ideal_task": "t2v"}))
    up = {k: ("F32", tuple(v.shape), None) for k, v in ref.SRTo720pUpsampler(32, 32).state_dict().items()}
    (tmp_path / "upsampler" / "720p_sr_distilled").mkdir(parents=True)
    write_description(tmp_path / "upsampler" / "720p_sr_distilled" / "diffusion_pytorch_model.safetensors", up)
    (tmp_path / "upsampler" / "720p_sr_distilled" / "config.json").write_text(json.dumps(
        {"_class_name": "SRTo720pUpsampler", "in_channels": 32, "out_channels": 32, "hidden_channels": None,
         "num_blocks": 6, "global_residual": False}))
    conversion = plan(tmp_path)
    assert conversion.manifest["model"] == "hunyuanvideo-1.5-720p-sr-distilled"
    planned = {c.name: c for c in conversion.components}
    assert sorted(planned) == ["transformer", "upsampler"] and planned["upsampler"].dtype == "fp32"
    assert planned["transformer"].config["in_channels"] == 98 and planned["transformer"].config["target_size"] == 960
    for component, source in ((planned["transformer"], record["keys"]), (planned["upsampler"], up)):
        ours = {k: tuple(v.shape) for k, v in tree_flatten(component.module.parameters())}
        assert {k: v[1] for k, v in component.tensors.items()} == ours
        assert sorted(v[0] for v in component.tensors.values()) == sorted(source)  # every source key used once


def test_release_without_upsampler_is_refused(tmp_path):
    from mlx_video.convert.convert import plan
    from mlx_video.errors import MlxVideoError
    from support.tensor_files import write_description

    record = json.loads(KEYS.read_text())
    folder = tmp_path / "transformer" / "1080p_sr_distilled"
    folder.mkdir(parents=True)
    write_description(folder / "diffusion_pytorch_model.safetensors",
                      {k: ("BF16", tuple(v), None) for k, v in record["keys"].items()})
    with pytest.raises(MlxVideoError, match="upsampler/1080p_sr_distilled/"):
        plan(tmp_path)


# --- mlxvid upscale -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,base,want", [(848, 480, 960, (1280, 720)), (480, 848, 960, (720, 1280)),
                                                    (1280, 720, 1440, (1904, 1072)), (720, 1280, 1440, (1072, 1904)),
                                                    (640, 640, 960, (960, 960))])
def test_high_res_size_is_the_official_bucket(width, height, base, want):
    """The official SR pipeline's BucketMap on the published sizes (its outputs, run once on the official code)."""
    from mlx_video.families.hunyuan15.sr import high_res_size

    assert high_res_size(width, height, base) == want


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny T2V model converted and run (64x48, 5 frames, --save-latents), and a tiny SR model converted with
    --base from a folder holding a diffusers-named transformer of 3 x 4 + 2 input channels and an upsampler."""
    from support.hunyuan15 import build_tiny_t2v_pipeline, tiny_transformer

    from mlx_video.cli import main

    root = tmp_path_factory.mktemp("hy15_upscale")
    build_tiny_t2v_pipeline(root / "base-src", guidance=1.0)
    main(["convert", str(root / "base-src"), str(root / "base"), "--dtype", "fp32"])
    main(["generate", "--model", str(root / "base"), "--prompt", "a corgi surfs", "--size", "64x48", "--frames", "5",
          "--steps", "1", "--save-latents", str(root / "low.npy"), "--quiet"])
    model = tiny_transformer(2, 16, 1, seed=8, axes=(4, 6, 6), text_dim=24)
    model.register_to_config(in_channels=14, target_size=96)
    model.x_embedder.proj = torch.nn.Conv3d(14, 32, 1)
    save = root / "sr-src"
    model.save_pretrained(save / "transformer")
    (save / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15Pipeline"}))
    cfg = CONFIGS["720p"]
    upsampler = reference_upsampler(cfg, seed=9)
    from safetensors.torch import save_file

    (save / "upsampler" / "720p_sr_distilled").mkdir(parents=True)
    save_file(upsampler.state_dict(), str(save / "upsampler" / "720p_sr_distilled" / "diffusion_pytorch_model.safetensors"))
    (save / "upsampler" / "720p_sr_distilled" / "config.json").write_text(json.dumps(
        {"_class_name": "SRTo720pUpsampler", "in_channels": 4, "out_channels": 4, "hidden_channels": 6,
         "num_blocks": 2, "global_residual": True}))
    main(["convert", str(save), str(root / "sr"), "--dtype", "fp32", "--base", "hunyuanvideo-1.5-720p-sr-distilled"])
    return root


def test_upscale_command(runs, tmp_path):
    """`mlxvid upscale` from the run's latents and sidecar: the prompt encoded by the run's folder, the SR model's
    6 steps at the bucket nearest the run's aspect, a sidecar naming the run's model, so `mlxvid decode` decodes the
    result with its VAE."""
    from mlx_video.cli import main

    main(["upscale", str(runs / "low.npy"), "-o", str(tmp_path / "up.npy"), "--model", str(runs / "sr"), "--quiet"])
    up = np.load(tmp_path / "up.npy")
    assert up.shape == (1, 4, 2, 5, 7) and np.isfinite(up).all()  # 112x80: the base-96 bucket nearest 4:3
    record = json.loads((tmp_path / "up.json").read_text())["settings"]
    assert record["model"] == "hunyuanvideo-1.5-480p-t2v-distilled" and record["upscaled_from"] == str(runs / "low.npy")
    assert (record["upscale"]["steps"], record["upscale"]["shift"], record["upscale"]["guidance"]) == (6, 2.0, 1.0)
    assert (record["upscale"]["width"], record["upscale"]["height"]) == (112, 80)
    assert list(record["upscale"]["memory_estimate"]["stages"]) == ["denoising"]
    main(["decode", str(tmp_path / "up.npy"), "-o", str(tmp_path / "video.mp4"), "--quiet"])
    assert json.loads((tmp_path / "video.json").read_text())["settings"]["render_size"] == [112, 80]
    with pytest.raises(SystemExit):  # the output exists
        main(["upscale", str(runs / "low.npy"), "-o", str(tmp_path / "up.npy"), "--model", str(runs / "sr")])


def test_upscale_refusals(runs, tmp_path, capsys):
    from mlx_video.cli import main
    from mlx_video.upscale import sr_model_for

    assert sr_model_for("hunyuanvideo-1.5-480p-i2v-step-distilled") == "hunyuanvideo-1.5-720p-sr-distilled"
    assert sr_model_for("hunyuanvideo-1.5-720p-t2v") == "hunyuanvideo-1.5-1080p-sr-distilled"
    with pytest.raises(MlxVideoError, match="no super-resolution model takes wan2.2-ti2v-5b"):
        sr_model_for("wan2.2-ti2v-5b")

    np.save(tmp_path / "bare.npy", np.load(runs / "low.npy"))
    for args, message in (([str(runs / "low.npy"), "-o", str(tmp_path / "up.mp4")], "must be a .npy"),
                          ([str(tmp_path / "bare.npy"), "-o", str(tmp_path / "up.npy")], "has no sidecar"),
                          ([str(runs / "low.npy"), "-o", str(tmp_path / "up.npy"), "--model", str(runs / "base")],
                           "not a super-resolution model")):
        with pytest.raises(SystemExit):
            main(["upscale", *args])
        assert message in capsys.readouterr().err


# --- generate --upscale ---------------------------------------------------------------------------------------

def test_generate_upscale_in_one_command_resumes(runs, tmp_path, monkeypatch, capsys):
    """`generate --upscale 720p --upscale-model SR` = the run, then `mlxvid upscale` on its latents (the same
    latents, bit for bit), decoded at the high resolution by the run's VAE, one sidecar recording both stages.
    Interrupted in the SR stage, the same command resumes from the kept base latents (the base model not run
    again), and the kept stages are removed once the output is written."""
    from mlx_video.cli import main
    from mlx_video.families.hunyuan15.pipeline import Hunyuan15Pipeline
    from mlx_video.families.hunyuan15.sr import Hunyuan15SRPipeline

    main(["upscale", str(runs / "low.npy"), "-o", str(tmp_path / "two-step.npy"), "--model", str(runs / "sr"), "-q"])
    args = ["generate", "--model", str(runs / "base"), "--prompt", "a corgi surfs", "--size", "64x48", "--frames",
            "5", "--steps", "1", "--upscale", "720p", "--upscale-model", str(runs / "sr"), "--output",
            str(tmp_path / "out.mp4"), "--save-latents", str(tmp_path / "hr.npy"), "--preview-every", "1"]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Hunyuan15SRPipeline, "upscale", interrupt)
    with pytest.raises(SystemExit):
        main(args + ["-q"])
    kept = tmp_path / ".out.mp4.upscale"
    assert (kept / "base.npz").is_file() and not (tmp_path / "out.mp4").exists()
    monkeypatch.undo()
    monkeypatch.setattr(Hunyuan15Pipeline, "generate", lambda *a, **k: pytest.fail("the base run ran again"))
    main(args)
    assert "resuming: the base latents read back" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "hr.npy"), np.load(tmp_path / "two-step.npy"))
    record = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert record["render_size"] == [112, 80] and (record["width"], record["height"]) == (64, 48)
    assert record["output_frames"] == 5 and record["options"]["upscale"] == "720p"
    assert record["upscale"]["model"] == "hunyuanvideo-1.5-720p-sr-distilled" and record["upscale"]["steps"] == 6
    assert list(record["memory_estimate"]["stages"]) == ["text_encoding", "denoising", "upscaling", "decoding"]
    assert not kept.exists() and (tmp_path / "out.preview.png").is_file()  # the base run's preview


def test_generate_upscale_of_an_image_to_video_run(runs, tmp_path):
    """An I2V run upscaled in one command, and by `mlxvid upscale` from its saved latents: the run's image encoded
    again at 112x80 by the I2V folder's VAE and SigLIP (the official path, compared in
    test_i2v_sr_latents_match_official); the two ways give the same latents."""
    from PIL import Image
    from support.hunyuan15 import build_tiny_i2v_pipeline

    from mlx_video.cli import main

    build_tiny_i2v_pipeline(tmp_path / "i2v-src", meanflow=False)
    main(["convert", str(tmp_path / "i2v-src"), str(tmp_path / "i2v"), "--dtype", "fp32"])
    pixels = np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat.png")
    common = ["--model", str(tmp_path / "i2v"), "--prompt", "a cat", "--image", str(tmp_path / "cat.png"), "--size",
              "64x48", "--frames", "5", "--steps", "1", "-q"]
    main(["generate", *common, "--save-latents", str(tmp_path / "low.npy")])
    main(["upscale", str(tmp_path / "low.npy"), "-o", str(tmp_path / "up.npy"), "--model", str(runs / "sr"), "-q"])
    main(["generate", *common, "--upscale", "720p", "--upscale-model", str(runs / "sr"), "--save-latents",
          str(tmp_path / "hr.npy")])
    up, hr = np.load(tmp_path / "up.npy"), np.load(tmp_path / "hr.npy")
    assert hr.shape == (1, 4, 2, 5, 7) and np.isfinite(hr).all() and np.array_equal(up, hr)
    (tmp_path / "cat.png").unlink()
    with pytest.raises(MlxVideoError, match="the run's image .*cat.png is not there"):
        from mlx_video.upscale import upscale_latents

        upscale_latents(tmp_path / "low.npy", tmp_path / "again.npy", str(runs / "sr"), quiet=True)


def test_generate_upscale_refusals(runs, tmp_path, monkeypatch, capsys):
    """Before any weights are read: a model without a super-resolution stage, the other resolution, an SR folder
    not converted (the registry's default place) or not an SR model, --upscale-model alone, a chain of clips."""
    from mlx_video.cli import main
    from mlx_video.model_folder import ModelFolder
    from mlx_video.upscale_stage import sr_spec_for

    with pytest.raises(MlxVideoError, match="wan2.2-ti2v-5b has no super-resolution stage; --upscale is for "):
        sr_spec_for("wan2.2-ti2v-5b", "720p")
    monkeypatch.setattr(ModelFolder, "load_module", lambda *a: pytest.fail("weights were read"))
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path / "home"))
    base = ["generate", "--model", str(runs / "base"), "--prompt", "a corgi", "--size", "64x48", "--frames", "5",
            "--output", str(tmp_path / "x.mp4")]
    for extra, message in (
            (["--upscale", "1080p"], "--upscale 1080p: hunyuanvideo-1.5-480p-t2v-distilled's runs upscale to 720p"),
            (["--upscale", "720p"], "hunyuanvideo-1.5-720p-sr-distilled, which is not converted (looked in "),
            (["--upscale", "720p", "--upscale-model", str(runs / "base")], "not a super-resolution model that takes"),
            (["--upscale-model", str(runs / "sr")], "--upscale-model names the model of --upscale"),
            (["--upscale", "720p", "--upscale-model", str(runs / "sr"), "--duration", "9"], "--upscale makes one clip"),
            (["--upscale", "720p", "--upscale-model", str(runs / "sr"), "--cache", "fbcache"],
             "--cache fbcache with --upscale 720p: the super-resolution stage runs without them"),
            (["--upscale", "720p", "--upscale-model", str(runs / "sr"), "--attention", "radial"],
             "--attention radial with --upscale 720p: the super-resolution stage runs without them")):
        with pytest.raises(SystemExit):
            main(base[:-4] + (["--duration", "9"] if "--duration" in extra else ["--frames", "5"]) + base[-2:]
                 + [e for e in extra if e not in ("--duration", "9")])
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.mp4").exists()


def test_sr_model_refuses_a_step_cache_and_radial_attention(runs, monkeypatch):
    """An SR folder given --cache or --attention radial (as `upscale` resolves its settings) refuses it before any
    weights are read, rather than running without it."""
    from mlx_video.model_folder import ModelFolder
    from mlx_video.pipelines.base import GenerationSettings
    from mlx_video.run import load_pipeline

    monkeypatch.setattr(ModelFolder, "load_module", lambda *a: pytest.fail("weights were read"))
    sr = load_pipeline(str(runs / "sr"))
    low = np.load(runs / "low.npy")
    common = dict(prompt="a corgi", width=112, height=80, frames=5)
    for extra, message in (({"cache": "easycache:0.1"}, "--cache easycache:0.1: hunyuanvideo-1.5-720p-sr-distilled "
                                                         "is a step-distilled super-resolution model"),
                           ({"attention": "radial"}, "--attention radial: hunyuanvideo-1.5-720p-sr-distilled has no "
                                                     "radial attention parameters")):
        with pytest.raises(MlxVideoError, match=re.escape(message)):
            sr.upscale(GenerationSettings(**common, **extra), low, context=())


def test_served_upscale_job_reports_both_stages(runs, tmp_path, monkeypatch):
    """A server job with --upscale (the worker in this process): its progress counts the base run's step and the SR
    stage's 6 (7 in all), the SR steps under the stage "upscaling", the last as "decoding"; a cancel asked in the SR
    stage stops the job at its next step; run again, it resumes from the kept base latents and counts them done."""
    from mlx_video.server import worker as worker_module
    from mlx_video.server.bodies import from_fields
    from mlx_video.server.store import JobStore

    monkeypatch.setattr(worker_module, "REPORT_EVERY", 0.0)  # every step written
    store, seen, update = JobStore(tmp_path / "jobs.sqlite"), [], JobStore.update

    def recording(self, job_id, **fields):
        seen.append((job_id, fields.get("stage"), fields.get("step"), fields.get("steps"), fields.get("progress")))
        if (job_id, fields.get("stage"), fields.get("step")) == (ids[1], "upscaling", 3):
            self.request_cancel(job_id)
        update(self, job_id, **fields)

    monkeypatch.setattr(JobStore, "update", recording)
    # a request names no SR folder (upscale_model is the server's): the registry's model under the models home
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "hunyuanvideo-1.5-720p-sr-distilled").symlink_to(runs / "sr")
    options = from_fields({"prompt": "a corgi surfs", "size": "64x48", "frames": 5, "steps": 1, "upscale": "720p"},
                          [], "base")
    ids = [store.add("openai", "base", "a corgi surfs", options).id for _ in range(2)]
    worker = worker_module.Worker(store, tmp_path / "data", {"base": str(runs / "base")})
    for _ in ids:
        worker.run_job(store.claim_next())

    def steps_of(job_id):
        return [s[1:] for s in seen if s[0] == job_id and s[2] is not None]

    want = [("denoising", 0, 7, 0), ("denoising", 1, 7, 12)] + [("upscaling", i, 7, 90 * i // 7) for i in range(2, 7)]
    assert steps_of(ids[0]) == want + [("decoding", 7, 7, 90)]
    assert store.get(ids[0]).status == "completed"
    assert steps_of(ids[1]) == want[:4] and store.get(ids[1]).status == "cancelled"
    seen.clear()
    update(store, ids[1], cancel_requested=0)
    worker.run_job(store.get(ids[1]))  # as a killed server's job runs again
    assert steps_of(ids[1]) == [want[0], *want[2:], ("decoding", 7, 7, 90)]
    assert store.get(ids[1]).status == "completed"


def test_presets_pick_the_super_resolution_stage(runs, tmp_path, monkeypatch, capsys):
    """--preset with --quality high picks the model's SR stage where the delivery is at least its size (720p models
    to 1080p deliveries: the 1080p stage; 480p models: the 720p one); not at medium quality, not for a smaller
    delivery, not for models without one, not for a chain of clips, not with --upscale none. Picked and not
    converted, the run is refused (naming --upscale none); given its folder, a 480p run to a preset of 1280x720 (in
    presets.toml) runs the 720p stage and delivers 1280x720."""
    from mlx_video.cli import main
    from mlx_video.presets import BUILTIN_PRESETS, Preset
    from mlx_video.registry import get_spec
    from mlx_video.upscale_stage import planned_upscale

    wide, short, square = (BUILTIN_PRESETS[n] for n in ("linkedin-wide", "youtube-short", "linkedin-square"))
    hy720, hy480 = get_spec("hunyuanvideo-1.5-720p-t2v"), get_spec("hunyuanvideo-1.5-480p-i2v-step-distilled")
    high = {"quality": "high"}
    assert planned_upscale(high, hy720, wide) == planned_upscale(high, hy720, short) == "1080p"
    assert planned_upscale(high, hy480, square) == "720p"
    assert planned_upscale(high, hy480, Preset("hd", 1280, 720, 24)) == "720p"
    for o, spec, preset in (({"quality": "medium"}, hy720, wide), (high, hy720, None), (high, hy480, Preset("sd", 848, 480, 24)),
                            (high, get_spec("wan2.2-ti2v-5b"), wide), ({**high, "duration": 30.0}, hy720, wide),
                            ({**high, "upscale": "none"}, hy720, wide)):
        assert planned_upscale(o, spec, preset) is None, (o, spec.id, preset)

    monkeypatch.setenv("MLXVID_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "presets.toml").write_text("[hd]\nwidth = 1280\nheight = 720\nfps = 24\n")
    args = ["generate", "--model", str(runs / "base"), "--prompt", "a corgi surfs", "--size", "64x48", "--frames", "5",
            "--steps", "1", "--preset", "hd", "--quality", "high", "--output", str(tmp_path / "wide.mp4"), "-q"]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "--upscale 720p runs hunyuanvideo-1.5-720p-sr-distilled, which is not converted" in err
    assert "--upscale none delivers without it" in err
    main(args + ["--upscale-model", str(runs / "sr"), "--save-latents", str(tmp_path / "hd.npy")])
    record = json.loads((tmp_path / "wide.json").read_text())["settings"]
    assert record["upscale"]["model"] == "hunyuanvideo-1.5-720p-sr-distilled" and record["render_size"] == [112, 80]
    assert record["delivery_size"] == [1280, 720] and record["upscale"]["steps"] == 6
    # the upscaled latents decode as they are (the recorded preset and quality plan no second SR stage)
    main(["decode", str(tmp_path / "hd.npy"), "-o", str(tmp_path / "again.mp4"), "-q"])
    again = json.loads((tmp_path / "again.json").read_text())["settings"]
    assert again["render_size"] == [112, 80] and again["delivery_size"] == [1280, 720] and "upscale" not in again
