"""HunyuanVideo 1.5 super-resolution: the latent upsamplers (480p -> 720p, 720p -> 1080p) and the SR step's
conditioning against a torch transcription of the official code (tests/hy15_sr_reference.py, cited there), in CI;
and, when HUNYUANVIDEO15_REPO names a checkout of Tencent-Hunyuan/HunyuanVideo-1.5, the transcription against the
official classes and the whole SR stage against the official `HunyuanVideo_1_5_SR_Pipeline` on CPU torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402

import hy15_sr_reference as ref  # noqa: E402
from mlx_video.convert.rules import convert_weights  # noqa: E402
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
    model.update(tree_unflatten(list(convert_weights(upsampler_keymap(), weights).items())))
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
