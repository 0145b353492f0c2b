"""HunyuanVideo VAE: parity with diffusers' AutoencoderKLHunyuanVideo (untiled and tiled), full-size keys."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from mlx.utils import tree_flatten
from safetensors.torch import load_file

from mlx_video.families.hunyuan.keys import DIFFUSERS_VAE, convert_weights, vae_config_from_diffusers
from mlx_video.families.hunyuan.config import HUNYUAN_VAE
from mlx_video.families.hunyuan.vae import HunyuanVAE, VAETiling
from support.arrays import from_torch, rel_err, to_torch

PARITY_RTOL = 1e-5


def tiny_config(**overrides) -> dict:
    """4 levels of 8/16/24/24 channels in 4 groups: the real level structure (2 spatial-and-temporal)."""
    config = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=6,
        block_out_channels=(8, 16, 24, 24),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    config.update(overrides)
    return config


def random_reference(config: dict, seed: int) -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(seed)
    model = AutoencoderKLHunyuanVideo(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


def ours_from(reference, tmp_path) -> HunyuanVAE:
    reference.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = HunyuanVAE(vae_config_from_diffusers(dict(reference.config)), dtype=mx.float32)
    weights = convert_weights(DIFFUSERS_VAE, {k: mx.array(v.float().numpy()) for k, v in state.items()})
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = random_reference(tiny_config(), seed=0)
    return reference, ours_from(reference, tmp_path_factory.mktemp("vae"))


@pytest.mark.parametrize("frames,height,width", [(1, 16, 24), (5, 24, 16), (9, 16, 32)])
def test_encode_parity_untiled(pair, frames, height, width):
    reference, ours = pair
    reference.use_framewise_encoding = False
    reference.disable_tiling()
    video = np.random.default_rng(frames).uniform(-1, 1, (2, frames, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(reference.encode(to_torch(video)).latent_dist.mode()) * 0.476986
    got = ours.encode(mx.array(video), tiling=None)
    assert got.shape == expected.shape == (2, (frames - 1) // 4 + 1, height // 8, width // 8, 6)
    rel = rel_err(np.array(got), expected)
    print(f"VAE encode {frames}x{height}x{width}: rel {rel:.2e}")
    assert rel < PARITY_RTOL


@pytest.mark.parametrize("frames,height,width", [(1, 2, 3), (2, 3, 2), (4, 2, 4)])
def test_decode_parity_untiled(pair, frames, height, width):
    reference, ours = pair
    reference.use_framewise_decoding = False
    reference.disable_tiling()
    latents = np.random.default_rng(frames).standard_normal((2, frames, height, width, 6)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(reference.decode(to_torch(latents / 0.476986)).sample)
    got = ours.decode(mx.array(latents), tiling=None)
    assert got.shape == expected.shape == (2, 4 * frames - 3, 8 * height, 8 * width, 3)
    rel = rel_err(np.array(got), expected)
    print(f"VAE decode {frames}x{height}x{width}: rel {rel:.2e}")
    assert rel < PARITY_RTOL


# Small tiles (64 px every 48, 8 frames every 4) so that tiny inputs cross several tile borders.
SMALL_TILES = dict(sample_size=64, sample_stride=48, frames=8, frame_stride=4)


def test_decode_parity_tiled(pair):
    reference, ours = pair
    reference.use_framewise_decoding = True
    reference.enable_tiling(
        tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_min_num_frames=8,
        tile_sample_stride_height=48, tile_sample_stride_width=48, tile_sample_stride_num_frames=4,
    )
    latents = np.random.default_rng(5).standard_normal((1, 4, 9, 10, 6)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(reference.decode(to_torch(latents / 0.476986)).sample)
    got = np.array(ours.decode(mx.array(latents), tiling=VAETiling(**SMALL_TILES)))
    assert got.shape == expected.shape == (1, 13, 72, 80, 3)
    rel = rel_err(got, expected)
    print(f"VAE tiled decode (2x2 spatial tiles, 4 clips): rel {rel:.2e}")
    assert rel < PARITY_RTOL
    untiled = np.array(ours.decode(mx.array(latents), tiling=None))
    print(f"tiled vs untiled decode (not the same computation): rel {rel_err(got, untiled):.2e}")
    assert not np.allclose(got, untiled)


def test_encode_parity_tiled(pair):
    reference, ours = pair
    reference.use_framewise_encoding = True
    reference.enable_tiling(
        tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_min_num_frames=8,
        tile_sample_stride_height=48, tile_sample_stride_width=48, tile_sample_stride_num_frames=4,
    )
    video = np.random.default_rng(6).uniform(-1, 1, (1, 13, 80, 72, 3)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(reference.encode(to_torch(video)).latent_dist.mode()) * 0.476986
    got = np.array(ours.encode(mx.array(video), tiling=VAETiling(**SMALL_TILES)))
    assert got.shape == expected.shape
    rel = rel_err(got, expected)
    print(f"VAE tiled encode: rel {rel:.2e}")
    assert rel < PARITY_RTOL


def test_default_tiling_is_diffusers_default(pair):
    """With diffusers' defaults (framewise decoding on) a 6-frame latent is decoded in overlapping clips."""
    reference, ours = pair
    reference.use_framewise_decoding = True
    reference.disable_tiling()
    reference.tile_sample_min_num_frames, reference.tile_sample_stride_num_frames = 16, 12
    latents = np.random.default_rng(8).standard_normal((1, 6, 2, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(reference.decode(to_torch(latents / 0.476986)).sample)
    got = np.array(ours.decode(mx.array(latents), tiling=VAETiling(spatial=False)))
    assert rel_err(got, expected) < PARITY_RTOL


def test_input_validation(pair):
    _, ours = pair
    with pytest.raises(ValueError):
        ours.encode(mx.zeros((1, 4, 16, 16, 3)))  # not 1 + 4k frames
    with pytest.raises(ValueError):
        ours.encode(mx.zeros((1, 5, 12, 16, 3)))  # not a multiple of 8
    with pytest.raises(ValueError):
        ours.decode(mx.zeros((1, 2, 2, 2, 5)))


def test_full_size_keys_and_shapes():
    assert vae_config_from_diffusers({}) == HUNYUAN_VAE
    with torch.device("meta"):
        reference = AutoencoderKLHunyuanVideo()
    assert vae_config_from_diffusers(dict(reference.config)) == HUNYUAN_VAE
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in tree_flatten(HunyuanVAE(HUNYUAN_VAE).parameters())}
    print(f"HunyuanVideo VAE parameters: {sum(math.prod(s) for s in ours.values()) / 1e6:.1f}M")
    assert DIFFUSERS_VAE.unknown_keys(shapes) == []
    converted = convert_weights(DIFFUSERS_VAE, {k: mx.zeros(s) for k, s in shapes.items()})
    mapped = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(ours) - set(mapped)) == []
    assert sorted(set(mapped) - set(ours)) == []
    assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
