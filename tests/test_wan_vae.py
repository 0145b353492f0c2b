"""Wan 2.1 / 2.2 VAE: parity with diffusers' AutoencoderKLWan, tiled decoding, bounded memory, key maps.

Apples to apples: diffusers' `encode` returns the raw posterior and leaves latent normalisation to the
pipeline, while ours returns the normalised mean. So the reference latents are
`(encode(x).latent_dist.mode() - latents_mean) / latents_std`, and the reference decode of our normalised
input z is `decode(z * latents_std + latents_mean)`, with the same (random) mean/std in both configs.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from mlx.utils import tree_flatten

from mlx_video.families.wan.vae_keys import DIFFUSERS_VAE
from mlx_video.families.wan.vae import WAN21_VAE, WAN22_VAE, WanVAE, WanVAEConfig
from support.arrays import from_torch

# Worst max|ours - ref| / max|ref| allowed in float32. Measured: at most 2e-6 (printed with -s).
PARITY_RTOL = 1e-5


def tiny_config(version: str) -> dict:
    rng = np.random.default_rng(0)
    z_dim = 4 if version == "2.1" else 6
    config = dict(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=rng.normal(size=z_dim).round(4).tolist(),
        latents_std=(0.5 + rng.random(z_dim)).round(4).tolist(),
    )
    if version == "2.2":
        config.update(
            decoder_base_dim=12, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
            scale_factor_spatial=16,
        )  # fmt: skip
    return config


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, norm gains included; conv weights scaled by 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        # Keep most decoded values inside [-1, 1], so the final clamp hides little of the comparison.
        model.decoder.conv_out.weight.mul_(0.3)
    return model.eval()


def convert(state: dict) -> list[tuple[str, mx.array]]:
    return [DIFFUSERS_VAE.apply(k, mx.array(v.float().numpy())) for k, v in state.items()]


_MODELS = {}


def models(version: str) -> tuple[AutoencoderKLWan, WanVAE]:
    if version not in _MODELS:
        config = tiny_config(version)
        reference = randomise(AutoencoderKLWan(**config), seed=1 if version == "2.1" else 2)
        ours = WanVAE(WanVAEConfig.from_diffusers(config))
        ours.load_weights(convert(reference.state_dict()), strict=True)
        mx.eval(ours.parameters())
        _MODELS[version] = reference, ours
    return _MODELS[version]


def to_torch(x: mx.array) -> torch.Tensor:
    """Channels-last (B, T, H, W, C) -> torch (B, C, T, H, W)."""
    return torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3).contiguous()


def rel_err(ours: mx.array, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours) - ref).max() / np.abs(ref).max())


# Non-square sizes: Wan 2.1 compresses 8x8, Wan 2.2 16x16.
VIDEO_SIZE = {"2.1": (16, 40), "2.2": (32, 48)}
LATENT_SIZE = {"2.1": (3, 2), "2.2": (2, 3)}


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_encode_parity(version, frames):
    reference, ours = models(version)
    height, width = VIDEO_SIZE[version]
    video = mx.random.uniform(-1, 1, (2 if frames == 5 else 1, frames, height, width, 3), key=mx.random.key(frames))
    latents = ours.encode(video)

    with torch.no_grad():
        mu = reference.encode(to_torch(video)).latent_dist.mode()
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1, 1)
    expected = from_torch((mu - mean) / std)

    s = ours.config.scale_factor_spatial
    assert latents.shape == (video.shape[0], 1 + (frames - 1) // 4, height // s, width // s, ours.config.z_dim)
    assert latents.shape == expected.shape
    err = rel_err(latents, expected)
    print(f"\nencode Wan {version} frames={frames}: worst relative error {err:.2e}")
    assert err < PARITY_RTOL


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_decode_parity(version, latent_frames):
    reference, ours = models(version)
    h, w = LATENT_SIZE[version]
    z = mx.random.normal((1, latent_frames, h, w, ours.config.z_dim), key=mx.random.key(10 + latent_frames))
    video = ours.decode(z)

    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = from_torch(reference.decode(to_torch(z) * std + mean).sample)

    s = ours.config.scale_factor_spatial
    assert video.shape == (1, 1 + 4 * (latent_frames - 1), h * s, w * s, 3)
    assert video.shape == expected.shape
    err = rel_err(video, expected)
    clamped = float((np.abs(expected) >= 1).mean())
    print(f"\ndecode Wan {version} latent frames={latent_frames}: worst relative error {err:.2e} ({clamped:.0%} clamp)")
    assert clamped < 0.5
    assert err < PARITY_RTOL


# Tiled against untiled decoding on the tiny random-weight models. Not the same computation: each tile sees only
# its latent window and the mid-block attention spans the whole frame, which random weights use far more than
# trained ones. So the bound is empirical. Measured (latents 6x7 / 5x6, tile (4, 4, 2) / (3, 4, 2)):
# mean |diff| = 0.33 x the output's standard deviation for both versions, max |diff| 0.52 / 0.53.
TILED_MEAN_ABS_BOUND = 0.5  # times the std of the untiled output
TILED_MAX_ABS_BOUND = 0.8


@pytest.mark.parametrize("version, latent_size, tile", [("2.1", (6, 7), (4, 4, 2)), ("2.2", (5, 6), (3, 4, 2))])
def test_tiled_decode_close_to_untiled(version, latent_size, tile):
    _, ours = models(version)
    z = mx.random.normal((1, 2, *latent_size, ours.config.z_dim), key=mx.random.key(3))
    untiled = np.array(ours.decode(z))
    tiled = np.array(ours.decode(z, tile=tile))
    assert tiled.shape == untiled.shape
    diff = np.abs(tiled - untiled)
    print(
        f"\ntiled {tile} vs untiled, Wan {version}, latent {latent_size}: mean |diff| {diff.mean():.2e} "
        f"({diff.mean() / untiled.std():.2f} x std), max {diff.max():.2e}"
    )
    assert diff.mean() < TILED_MEAN_ABS_BOUND * untiled.std()
    assert diff.max() < TILED_MAX_ABS_BOUND
    # A tile covering the whole latent is untiled decoding.
    assert np.array_equal(np.array(ours.decode(z, tile=(*latent_size, 2))), untiled)


def test_tile_blending_is_exact_for_a_local_decoder():
    """With a decoder that only sees its own pixel, tiles must blend back into exactly the untiled result."""
    model = WanVAE(WanVAEConfig.from_diffusers(tiny_config("2.1")))

    def local_decoder(z, cache, first_chunk):
        b, _, h, w, _ = z.shape
        frames = 1 if first_chunk else 4
        pixels = mx.broadcast_to(z[:, :, :, None, :, None, :3], (b, frames, h, 8, w, 8, 3))
        return mx.tanh(pixels.reshape(b, frames, 8 * h, 8 * w, 3))

    model._decode_chunk = local_decoder
    z = mx.random.normal((2, 3, 9, 11, 4), key=mx.random.key(4))
    untiled = np.array(model.decode(z))
    for tile in [(4, 5, 1), (3, 3, 2), (5, 11, 3), (9, 2, 0)]:
        np.testing.assert_allclose(np.array(model.decode(z, tile=tile)), untiled, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        model.decode(z, tile=(4, 4, 4))


def test_decode_memory_does_not_grow_with_frames():
    _, ours = models("2.2")
    z = mx.random.normal((1, 9, 2, 3, ours.config.z_dim), key=mx.random.key(5))
    mx.eval(z)

    def peak(latent_frames: int) -> int:
        mx.reset_peak_memory()
        for chunk in ours.decode_chunks(z[:, :latent_frames]):
            del chunk
        return mx.get_peak_memory()

    peak(2)  # warm up
    short, long = peak(3), peak(9)
    print(f"\npeak memory decoding 3 latent frames {short / 1e6:.2f} MB, 9 latent frames {long / 1e6:.2f} MB")
    assert long <= 1.1 * short


def test_input_validation():
    _, ours = models("2.1")
    for bad in [(1, 4, 16, 16, 3), (1, 5, 12, 16, 3), (1, 5, 16, 16, 4), (5, 16, 16, 3)]:
        with pytest.raises(ValueError):
            ours.encode(mx.zeros(bad))
    with pytest.raises(ValueError):
        ours.decode(mx.zeros((1, 2, 2, 2, 5)))


def published_diffusers_configs() -> dict:
    wan22 = dict(
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=list(WAN22_VAE.latents_mean), latents_std=list(WAN22_VAE.latents_std),
    )  # fmt: skip
    return {"Wan2.1": ({}, WAN21_VAE), "Wan2.2": (wan22, WAN22_VAE)}


def test_configs():
    for diffusers_config, expected in published_diffusers_configs().values():
        assert WanVAEConfig.from_diffusers(diffusers_config) == expected
        assert WanVAEConfig.from_dict(json.loads(json.dumps(expected.to_dict()))) == expected
    # diffusers' own defaults are the Wan 2.1 VAE.
    with torch.device("meta"):
        defaults = dict(AutoencoderKLWan().config)
    assert WanVAEConfig.from_diffusers(defaults) == WAN21_VAE
    with pytest.raises(ValueError):
        WanVAEConfig.from_diffusers(dict(attn_scales=[0.5]))
    with pytest.raises(ValueError):
        WanVAEConfig.from_diffusers(dict(_class_name="AutoencoderKL"))
    with pytest.raises(ValueError):
        WanVAEConfig(z_dim=8)  # latents_mean / std keep 16 entries


@pytest.mark.parametrize("name", list(published_diffusers_configs()))
def test_full_size_keys_and_shapes(name):
    diffusers_config, config = published_diffusers_configs()[name]
    with torch.device("meta"):
        reference = AutoencoderKLWan(**diffusers_config)
    source_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # Built lazily: the parameters are never evaluated.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(WanVAE(config).parameters())}

    assert DIFFUSERS_VAE.unknown_keys(source_shapes) == []
    mapped = {}
    for key, shape in source_shapes.items():
        target, value = DIFFUSERS_VAE.apply(key, mx.zeros(shape))
        assert target not in mapped, f"two source keys map onto {target}"
        mapped[target] = tuple(value.shape)
    assert sorted(set(ours) - set(mapped)) == [], "parameters no checkpoint key fills"
    assert sorted(set(mapped) - set(ours)) == [], "checkpoint keys with no parameter"
    assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
