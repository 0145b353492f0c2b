"""Mochi VAE: encode and decode parity with diffusers' AutoencoderKLMochi (fp32, tiny random configs), chunked
decoding, the official key maps, and full-size key/shape coverage."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mlx_video.families.mochi.keys import (  # noqa: E402
    DIFFUSERS_VAE,
    OFFICIAL_VAE_DECODER,
    OFFICIAL_VAE_ENCODER,
    convert_weights,
    vae_config_from_diffusers,
)
from mlx_video.families.mochi.config import MOCHI_VAE  # noqa: E402
from mlx_video.families.mochi.vae import MochiVAE  # noqa: E402
from support.mochi import official_vae_state_dicts  # noqa: E402
from support.arrays import rel_err_f64  # noqa: E402

TINY = [
    dict(
        encoder_block_out_channels=(32, 64, 64, 96),
        decoder_block_out_channels=(32, 32, 64, 64),
        latent_channels=12,
        layers_per_block=(1, 1, 2, 1, 1),
    ),
    dict(
        encoder_block_out_channels=(32, 64, 32, 64),
        decoder_block_out_channels=(32, 64, 32, 32),
        latent_channels=4,
        layers_per_block=(2, 1, 1, 1, 2),
        add_attention_block=(True, False, True, True, True),
    ),
]


def to_torch_layout(x):  # (B, T, H, W, C) -> (B, C, T, H, W)
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


@pytest.fixture(scope="module", params=[0, 1])
def tiny(request, tmp_path_factory):
    case = request.param
    folder = tmp_path_factory.mktemp(f"mochi_vae_{case}")
    ref = diffusers.AutoencoderKLMochi(**TINY[case]).eval()
    g = torch.Generator().manual_seed(case)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / math.sqrt(fan_in))
    ref.save_pretrained(folder)
    config = vae_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    weights = convert_weights(DIFFUSERS_VAE, mx.load(str(folder / "diffusion_pytorch_model.safetensors")))
    ours = MochiVAE(config)
    expected = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    assert {k: v.shape for k, v in weights.items()} == expected
    ours.load_weights(list(weights.items()), strict=True)
    return case, ref, ours


@pytest.mark.parametrize("latent_frames,batch,h,w", [(1, 1, 2, 3), (2, 2, 2, 2), (4, 1, 3, 2)])
def test_decode_parity(tiny, latent_frames, batch, h, w):
    case, ref, ours = tiny
    rng = np.random.default_rng(latent_frames)
    z = rng.standard_normal((batch, ours.config.latent_channels, latent_frames, h, w)).astype(np.float32)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample.numpy()
    got = ours.decode(mx.array(z.transpose(0, 2, 3, 4, 1)))
    assert got.shape == (batch, 6 * latent_frames - 5, 8 * h, 8 * w, 3)
    got = to_torch_layout(got)
    assert got.shape == expected.shape
    assert rel_err_f64(got, expected) <= 1e-5
    if latent_frames == 4:  # (width-1 latents are avoided: a 1-pixel GroupNorm is ill-conditioned even in torch fp32)
        for chunk in (1, 3):
            chunked = to_torch_layout(ours.decode(mx.array(z.transpose(0, 2, 3, 4, 1)), chunk_frames=chunk))
            assert rel_err_f64(chunked, expected) <= 1e-5
            assert rel_err_f64(chunked, got) <= 1e-6


@pytest.mark.parametrize("frames,batch,height,width", [(1, 1, 16, 24), (7, 2, 16, 16), (13, 1, 24, 16)])
def test_encode_parity(tiny, frames, batch, height, width):
    case, ref, ours = tiny
    rng = np.random.default_rng(frames)
    video = rng.uniform(-1, 1, (batch, 3, frames, height, width)).astype(np.float32)
    with torch.no_grad():
        moments = ref.encoder(torch.from_numpy(video))[0].numpy()
        mean = ref.encode(torch.from_numpy(video)).latent_dist.mean.numpy()
    x = mx.array(video.transpose(0, 2, 3, 4, 1))
    got_moments = to_torch_layout(ours.encoder(x))
    got_mean = to_torch_layout(ours.encode(x))
    assert got_mean.shape == mean.shape == (batch, ours.config.latent_channels, (frames - 1) // 6 + 1, height // 8, width // 8)
    assert rel_err_f64(got_moments, moments) <= 1e-5
    assert rel_err_f64(got_mean, mean) <= 1e-5


def test_latent_normalisation_round_trip():
    vae = MochiVAE.__new__(MochiVAE)
    vae.config = MOCHI_VAE
    z = mx.array(np.random.default_rng(0).standard_normal((1, 2, 2, 2, 12)).astype(np.float32))
    assert np.allclose(np.array(vae.denormalize_latents(vae.normalize_latents(z))), np.array(z), atol=1e-6)
    assert MOCHI_VAE.latents_std[7] == pytest.approx(1.37209, abs=1e-5)


# ------------------------------------------------------------------------------------- official names


def _shapes_after(keymap, shapes: dict) -> dict:
    """Converted names and shapes, transforming zero-strided stand-ins (nothing is materialised)."""
    stand_ins = {k: mx.broadcast_to(mx.zeros((1,) * len(s)), s) for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in convert_weights(keymap, stand_ins).items()}


def test_full_size_key_and_shape_coverage():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLMochi()
    sd = dict(ref.state_dict())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    config = vae_config_from_diffusers(dict(ref.config))
    assert config == MOCHI_VAE
    ours = {k: tuple(v.shape) for k, v in tree_flatten(MochiVAE(config).parameters())}
    assert DIFFUSERS_VAE.unknown_keys(shapes) == []
    assert _shapes_after(DIFFUSERS_VAE, shapes) == ours
    decoder_params = sum(math.prod(s) for k, s in ours.items() if k.startswith("decoder."))
    assert abs(decoder_params / 1e6 - 362.5) < 0.1  # the README's 362M is the decoder

    with torch.device("meta"):
        dec, enc = official_vae_state_dicts(sd)
    dec_shapes = {k: tuple(v.shape) for k, v in dec.items()}
    enc_shapes = {k: tuple(v.shape) for k, v in enc.items()}
    assert OFFICIAL_VAE_DECODER.unknown_keys(dec_shapes) == [] and OFFICIAL_VAE_ENCODER.unknown_keys(enc_shapes) == []
    official = {**_shapes_after(OFFICIAL_VAE_DECODER, dec_shapes), **_shapes_after(OFFICIAL_VAE_ENCODER, enc_shapes)}
    assert official == ours


def test_official_names_load_the_same_weights():
    # A tiny model with the published layer counts, to run the official maps on real tensors.
    small = diffusers.AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32), latent_channels=12
    )
    sd = {k: v.detach() for k, v in small.state_dict().items()}
    dec, enc = official_vae_state_dicts(sd)
    from_official = {
        **convert_weights(OFFICIAL_VAE_DECODER, {k: mx.array(v.numpy()) for k, v in dec.items()}),
        **convert_weights(OFFICIAL_VAE_ENCODER, {k: mx.array(v.numpy()) for k, v in enc.items()}),
    }
    from_diffusers = convert_weights(DIFFUSERS_VAE, {k: mx.array(v.numpy()) for k, v in sd.items()})
    assert set(from_official) == set(from_diffusers)
    for k, v in from_diffusers.items():
        assert np.array_equal(np.array(v), np.array(from_official[k])), k


def test_unknown_keys_are_refused():
    with pytest.raises(KeyError):
        convert_weights(DIFFUSERS_VAE, {"decoder.mid_block.resnets.0.norm1.weight": mx.zeros((2,))})
    with pytest.raises(KeyError):
        convert_weights(OFFICIAL_VAE_DECODER, {"blocks.9.0.weight": mx.zeros((2,))})


def test_tiled_convolutions_compute_the_same(tiny, monkeypatch):
    """A tiny unfold budget forces every 3x3x3 conv into per-frame row bands; the result is the same sums."""
    from mlx_video.families.mochi.vae import CausalConv3d

    case, ref, ours = tiny
    rng = np.random.default_rng(3)
    z = mx.array(rng.standard_normal((1, 3, 3, 2, ours.config.latent_channels)).astype(np.float32))
    video = mx.array(rng.uniform(-1, 1, (1, 7, 24, 16, 3)).astype(np.float32))
    whole_decode, whole_encode = np.array(ours.decode(z)), np.array(ours.encoder(video))
    monkeypatch.setattr(CausalConv3d, "max_unfold_bytes", 1)
    assert rel_err_f64(np.array(ours.decode(z, chunk_frames=2)), whole_decode) <= 1e-6
    assert rel_err_f64(np.array(ours.encoder(video)), whole_encode) <= 1e-6
