"""HunyuanVideo 1.5 VAE: parity with diffusers' AutoencoderKLHunyuanVideo15 (whole clip, in temporal chunks,
spatially tiled), both checkpoint layouts, full-size keys and shapes (diffusers on meta, the official recorded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15
from mlx.utils import tree_flatten

from mlx_video.families.hunyuan15.vae import HUNYUAN15_VAE, Hunyuan15VAE, Hunyuan15VAEConfig, VAETiling
from mlx_video.families.hunyuan15.vae_keys import (
    DIFFUSERS_VAE,
    OFFICIAL_VAE,
    convert_vae,
    keymap_for,
    vae_config_from_json,
)
from support.arrays import from_torch, rel_err, to_torch
from support.hunyuan15 import official_vae_state

PARITY_RTOL = 1e-5
OFFICIAL_KEYS = Path(__file__).parent / "fixtures" / "hy15_vae" / "official_vae_keys.json"

# A: the published level structure (5 levels, 16x spatial, 4x temporal; the last two spatial levels temporal too),
# narrow. B: 4 levels at 8x, without channel matching at the resamplers (so 1x1 shortcuts), 2 resnets per level.
CONFIG_A = dict(block_out_channels=(4, 8, 8, 16, 16), latent_channels=4, layers_per_block=1, scaling_factor=0.9)
CONFIG_B = dict(block_out_channels=(8, 16, 32, 32), latent_channels=8, layers_per_block=2, scaling_factor=0.7,
                spatial_compression_ratio=8, downsample_match_channel=False, upsample_match_channel=False)
# C: for the tiling tests, light enough for several tiles: 4 levels at 8x, 4 to 8 channels.
CONFIG_C = dict(block_out_channels=(4, 8, 8, 8), latent_channels=4, layers_per_block=1, scaling_factor=1.1,
                spatial_compression_ratio=8)


def random_reference(config: dict, seed: int) -> AutoencoderKLHunyuanVideo15:
    torch.manual_seed(seed)
    model = AutoencoderKLHunyuanVideo15(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


def ours_from(reference: AutoencoderKLHunyuanVideo15, state: dict | None = None) -> Hunyuan15VAE:
    state = reference.state_dict() if state is None else state
    model = Hunyuan15VAE(vae_config_from_json(dict(reference.config)))
    weights = convert_vae({k: mx.array(v.float().numpy()) for k, v in state.items()})
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.fixture(scope="module")
def pair_a():
    reference = random_reference(CONFIG_A, seed=0)
    return reference, ours_from(reference)


@pytest.fixture(scope="module")
def pair_c():
    reference = random_reference(CONFIG_C, seed=2)
    return reference, ours_from(reference)


@pytest.fixture(scope="module")
def pair_b():
    reference = random_reference(CONFIG_B, seed=1)
    return reference, ours_from(reference, official_vae_state(reference.state_dict()))


def reference_decode(reference, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return from_torch(reference.decode(to_torch(latents / reference.config.scaling_factor)).sample)


def reference_encode(reference, video: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return from_torch(reference.encode(to_torch(video)).latent_dist.mode()) * reference.config.scaling_factor


@pytest.mark.parametrize("which,frames,height,width,chunks", [
    ("a", 3, 3, 2, (None, 1, 2)),
    ("b", 1, 2, 2, (None,)),
    ("b", 3, 2, 3, (None, 2)),
])
def test_decode_parity(request, which, frames, height, width, chunks):
    """The whole clip at once, and in chunks of latent frames (the same computation: causal caches)."""
    reference, ours = request.getfixturevalue(f"pair_{which}")
    reference.disable_tiling()
    z = reference.config.latent_channels
    latents = np.random.default_rng(frames).standard_normal((1, frames, height, width, z)).astype(np.float32)
    expected = reference_decode(reference, latents)
    s = reference.config.spatial_compression_ratio
    assert expected.shape == (1, 4 * frames - 3, s * height, s * width, 3)
    for chunk in chunks:
        got = np.array(ours.decode(mx.array(latents), VAETiling(spatial=False, chunk_frames=chunk)))
        rel = rel_err(got, expected)
        print(f"decode {which} {frames}x{height}x{width}, chunks of {chunk}: rel {rel:.2e}")
        assert got.shape == expected.shape and rel < PARITY_RTOL


@pytest.mark.parametrize("which,frames,height,width,chunks", [
    ("a", 1, 32, 48, (None,)),
    ("a", 9, 32, 16, (None, 1, 2)),
    ("b", 5, 16, 24, (None, 1)),
])
def test_encode_parity(request, which, frames, height, width, chunks):
    reference, ours = request.getfixturevalue(f"pair_{which}")
    reference.disable_tiling()
    video = np.random.default_rng(frames).uniform(-1, 1, (1, frames, height, width, 3)).astype(np.float32)
    expected = reference_encode(reference, video)
    s = reference.config.spatial_compression_ratio
    assert expected.shape == (1, (frames - 1) // 4 + 1, height // s, width // s, reference.config.latent_channels)
    for chunk in chunks:
        got = np.array(ours.encode(mx.array(video), VAETiling(spatial=False, chunk_frames=chunk)))
        rel = rel_err(got, expected)
        print(f"encode {which} {frames}x{height}x{width}, chunks of {chunk}: rel {rel:.2e}")
        assert got.shape == expected.shape and rel < PARITY_RTOL


# diffusers' default overlap (tiles of 4 latents every 3: 2 x 3 tiles, 2 latent frames) and the official
# pipeline's (8 every 7: 2 x 2 tiles, 1 latent frame)
@pytest.mark.parametrize("tile,overlap,latent_thw,out_thw", [
    (32, 0.25, (2, 5, 7), (5, 40, 56)),
    (64, 0.125, (1, 9, 8), (1, 72, 64)),
])
def test_tiled_decode_parity(pair_c, tile, overlap, latent_thw, out_thw):
    """Overlapping tiles blended as diffusers blends them, each decoded in chunks of 1 latent frame."""
    reference, ours = pair_c
    s, z = reference.config.spatial_compression_ratio, reference.config.latent_channels
    reference.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_latent_min_height=tile // s,
                            tile_latent_min_width=tile // s, tile_overlap_factor=overlap)
    latents = np.random.default_rng(3).standard_normal((1, *latent_thw, z)).astype(np.float32)
    expected = reference_decode(reference, latents)
    reference.disable_tiling()
    got = np.array(ours.decode(mx.array(latents), VAETiling(tile_size=tile, overlap=overlap, chunk_frames=1)))
    rel = rel_err(got, expected)
    print(f"tiled decode, {tile} px tiles, overlap {overlap}: rel {rel:.2e}")
    assert got.shape == expected.shape == (1, *out_thw, 3) and rel < PARITY_RTOL
    untiled = np.array(ours.decode(mx.array(latents), VAETiling(spatial=False)))
    assert not np.allclose(got, untiled)  # the tiles did cut: tiled decoding is another computation


def test_tiled_encode_parity(pair_c):
    reference, ours = pair_c
    reference.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_latent_min_height=4,
                            tile_latent_min_width=4, tile_overlap_factor=0.25)
    video = np.random.default_rng(4).uniform(-1, 1, (1, 5, 40, 56, 3)).astype(np.float32)
    expected = reference_encode(reference, video)
    reference.disable_tiling()
    got = np.array(ours.encode(mx.array(video), VAETiling(tile_size=32, overlap=0.25, chunk_frames=1)))
    rel = rel_err(got, expected)
    print(f"tiled encode (2 x 3 tiles): rel {rel:.2e}")
    assert got.shape == expected.shape == (1, 2, 5, 7, 4) and rel < PARITY_RTOL


def test_input_validation(pair_a):
    _, ours = pair_a
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(mx.zeros((1, 4, 32, 32, 3)))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(mx.zeros((1, 5, 24, 32, 3)))
    with pytest.raises(ValueError, match="expected latents"):
        ours.decode(mx.zeros((1, 2, 2, 2, 5)))
    with pytest.raises(ValueError, match="chunk_frames"):
        VAETiling(chunk_frames=0)
    with pytest.raises(ValueError, match="whole latent tiles"):
        ours.decode(mx.zeros((1, 1, 30, 30, 4)), VAETiling(tile_size=200))
    with pytest.raises(ValueError, match="do not fold"):
        Hunyuan15VAEConfig(block_out_channels=(8, 16, 24, 48, 48), latent_channels=4)
    with pytest.raises(ValueError, match="AutoencoderKLConv3D"):
        vae_config_from_json({"_class_name": "AutoencoderKLHunyuanVideo"})
    with pytest.raises(ValueError, match="not HunyuanVideo 1.5 VAE keys"):
        convert_vae({"encoder.conv_in.conv.weight": mx.zeros((8, 3, 3, 3, 3)), "quant_conv.weight": mx.zeros((1,))})


def our_shapes() -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tree_flatten(Hunyuan15VAE(HUNYUAN15_VAE).parameters())}


def converted_shapes(keymap, shapes: dict[str, tuple]) -> dict[str, tuple]:
    assert keymap.unknown_keys(shapes) == []
    out = {}
    for key, shape in shapes.items():
        target, value = keymap.apply(key, mx.zeros(shape))
        assert target not in out
        out[target] = tuple(value.shape)
    return out


def test_full_size_diffusers_keys_and_shapes():
    with torch.device("meta"):
        reference = AutoencoderKLHunyuanVideo15()
    assert vae_config_from_json(dict(reference.config)) == HUNYUAN15_VAE
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert keymap_for(shapes) is DIFFUSERS_VAE
    ours = our_shapes()
    print(f"HunyuanVideo 1.5 VAE: {len(ours)} tensors, {sum(math.prod(s) for s in ours.values()) / 1e6:.1f}M parameters")
    assert converted_shapes(DIFFUSERS_VAE, shapes) == ours


def test_full_size_official_keys_and_shapes():
    recorded = json.loads(OFFICIAL_KEYS.read_text())
    assert vae_config_from_json({"_class_name": "AutoencoderKLConv3D", **recorded["config"]}) == HUNYUAN15_VAE
    shapes = {k: tuple(v) for k, v in recorded["shapes"].items()}
    assert keymap_for(shapes) is OFFICIAL_VAE
    assert converted_shapes(OFFICIAL_VAE, shapes) == our_shapes()
