"""Wan2.2-S2V audio features per video frame, against a torch / numpy reference of the official extraction.

The reference below is written from the official pipeline's behaviour (Wan-Video/Wan2.2
`wan/modules/s2v/audio_encoder.py` and `audio_utils.py`): transformers' own Wav2Vec2FeatureExtractor for the normalisation,
transformers' Wav2Vec2 for the hidden states (4.x stacking), torch's linear `F.interpolate(align_corners=True)`
from 50 to 30 steps a second, and frame i of a 16 fps video taking step round(t_i * 30) with t_i from
`np.linspace(0, n / fps, n, endpoint=False)`, zeros past the audio, in the official [1, layers, dim, frames]
layout.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_video.audio.features import (
    bucket_per_frame,
    frame_audio_features,
    frame_indices,
    interpolate_time,
    min_samples,
    normalize_waveform,
    resampled_length,
)
from mlx_video.audio.wav2vec2 import Wav2Vec2Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from mlx_video.audio.wav2vec2 import Wav2Vec2Model  # noqa: E402
from mlx_video.families.wan.wav2vec2_keys import convert_wav2vec2_weights  # noqa: E402
from support.arrays import rel_err_f64  # noqa: E402

# Head width 28, an even positional kernel, three convolutions with 40 samples per feature step.
TINY = dict(hidden_size=84, num_attention_heads=3, intermediate_size=64, num_hidden_layers=2,
            conv_dim=(20, 24, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 4, 2),
            num_conv_pos_embeddings=6, num_conv_pos_embedding_groups=3)


def reference_model(seed: int):
    config = transformers.Wav2Vec2Config(**TINY, do_stable_layer_norm=True, feat_extract_norm="layer",
                                         conv_bias=True, vocab_size=9)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.copy_(p + 0.3 * torch.randn_like(p))
    return model


def reference_states(model, input_values: torch.Tensor) -> torch.Tensor:
    """(layers + 1, T, dim): transformers 4.x stacking (the official pin), layer inputs then the final norm.

    transformers 5 ends `hidden_states` with the pre-norm output instead; `last_hidden_state` is the normed
    one in both, so it is taken from there.
    """
    with torch.no_grad():
        out = model.wav2vec2(input_values, output_hidden_states=True)
    return torch.cat(list(out.hidden_states[: model.config.num_hidden_layers]) + [out.last_hidden_state])


def reference_processor(samples: np.ndarray) -> torch.Tensor:
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    return extractor(samples, sampling_rate=16000, return_tensors="pt").input_values


def reference_frame_features(model, samples: np.ndarray, fps: int, frames_per_clip: int) -> np.ndarray:
    input_values = reference_processor(samples)
    states = reference_states(model, input_values)
    steps_50 = states.shape[1]
    resampled = F.interpolate(states.transpose(1, 2), size=int(steps_50 / 50.0 * 30), mode="linear",
                              align_corners=True).transpose(1, 2)  # (layers, T30, dim)
    steps_30 = resampled.shape[1]
    num_clips = int(steps_30 / (frames_per_clip * 30 / fps)) + 1
    num_frames = num_clips * frames_per_clip
    index = np.round(np.linspace(0, num_frames / fps, num_frames, endpoint=False) * 30).astype(int)
    result = np.zeros((1, states.shape[0], states.shape[2], num_frames), np.float32)
    for i, step in enumerate(index):
        if step < steps_30:
            result[0, :, :, i] = resampled[:, step].numpy()
    return result


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    reference = reference_model(seed=11)
    folder = tmp_path_factory.mktemp("w2v")
    reference.save_pretrained(folder)
    ours = Wav2Vec2Model(Wav2Vec2Config.from_transformers(reference.config.to_dict()))
    ours.load_weights(list(convert_wav2vec2_weights(mx.load(str(folder / "model.safetensors"))).items()), strict=True)
    return reference, ours


def samples_for_steps(config: Wav2Vec2Config, steps: int) -> int:
    n = 1
    while config.output_length(n) < steps:
        n += 1
    return n


@pytest.mark.parametrize("steps_50,frames_per_clip", [(205, 8), (205, 80), (250, 8), (37, 4), (2, 80)])
def test_frame_features_match_the_official_extraction(models, steps_50, frames_per_clip):
    reference, ours = models
    n = samples_for_steps(ours.config, steps_50) + 3
    rng = np.random.default_rng(steps_50)
    # A loud, offset signal: the normalisation has a mean and a scale to remove.
    samples = (0.3 + 0.8 * rng.standard_normal(n)).astype(np.float32)
    expected = reference_frame_features(reference, samples, fps=16, frames_per_clip=frames_per_clip)

    got = frame_audio_features(ours, samples, fps=16, frames_per_clip=frames_per_clip)
    got_official_layout = np.array(got.features).transpose(1, 2, 0)[None]
    assert got_official_layout.shape == expected.shape
    assert got.num_clips * frames_per_clip == expected.shape[-1]
    err = rel_err_f64(got_official_layout, expected)
    assert err <= 1e-5, f"relative error {err:.2e}"
    # Frames past the audio are exact zeros, and the count of audio frames is where they start.
    silent = np.abs(expected[0]).sum(axis=(0, 1)) == 0
    assert got.audio_frames == int((~silent).sum()) and not silent[: got.audio_frames].any()
    np.testing.assert_array_equal(np.array(got.clip(got.num_clips - 1)),
                                  np.array(got.features)[-frames_per_clip:])


def test_normalisation_matches_the_processor():
    samples = (0.2 + 0.05 * np.random.default_rng(0).standard_normal(5000)).astype(np.float32)
    ref = reference_processor(samples)[0].numpy()
    np.testing.assert_allclose(normalize_waveform(samples), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fps", [16, 8, 32])
def test_frame_indices_round_half_to_even_like_numpy(fps):
    n = 4000
    times = np.linspace(0, n / fps, n, endpoint=False)
    np.testing.assert_array_equal(frame_indices(n, fps), np.round(times * 30).astype(int))
    # 4 * 30 / 16 = 7.5 rounds to 8 and 12 * 30 / 16 = 22.5 to 22: banker's rounding, not half-up.
    if fps == 16:
        assert frame_indices(13, 16)[[4, 12]].tolist() == [8, 22]


def test_rate_conversion_length_and_interpolation():
    rng = np.random.default_rng(4)
    for steps in (2, 3, 50, 205, 411):
        x = rng.standard_normal((3, steps, 7)).astype(np.float32)
        length = resampled_length(steps)
        ref = F.interpolate(torch.from_numpy(x).transpose(1, 2), size=length, mode="linear", align_corners=True)
        got = np.array(interpolate_time(mx.array(x), length))
        np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)
    # The official length is the float product truncated, one short of the exact floor here.
    assert resampled_length(205) == int(205 / 50.0 * 30) == 122 != 205 * 30 // 50


def test_clip_count_on_the_boundary():
    # 150 steps at 30 Hz are exactly one 80-frame clip at 16 fps: a second, silent clip is added (official rule).
    for steps, clips in ((149, 1), (150, 2), (299, 2), (300, 3)):
        bucket = bucket_per_frame(mx.ones((2, steps, 3)), fps=16, frames_per_clip=80)
        assert bucket.num_clips == clips and bucket.features.shape == (80 * clips, 2, 3)
        assert bucket.audio_frames == int((frame_indices(80 * clips, 16) < steps).sum())


def test_too_short_audio_is_refused(models):
    _, ours = models
    shortest = min_samples(ours.config)
    assert resampled_length(ours.config.output_length(shortest)) == 1
    assert resampled_length(max(ours.config.output_length(shortest - 1), 0)) == 0
    with pytest.raises(ValueError, match="too few"):
        frame_audio_features(ours, np.ones(shortest - 1, np.float32))
    # For the real model (320 samples a step, 400-sample receptive field) that is 45 ms of 16 kHz audio.
    assert min_samples(Wav2Vec2Config()) == 720
