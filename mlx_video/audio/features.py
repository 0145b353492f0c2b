"""Audio features per video frame, as Wan2.2-S2V prepares them for its audio encoder.

The steps (the official Wan-Video/Wan2.2 `wan/modules/s2v/audio_encoder.py` and `audio_utils.py`):

1. the voice track as mono 16 kHz (`mlx_video.io.audio.read_audio(path, WAV2VEC2_SAMPLE_RATE)`; the
   official code uses librosa's soxr resampler, we use libswresample);
2. the wav2vec2 processor's normalisation: zero mean, unit variance (variance + 1e-7) over the whole track;
3. every hidden state of wav2vec2 (50 steps a second), stacked: (layers, T50, dim);
4. linear interpolation in time (align_corners) to 30 steps a second, int(T50 / 50 * 30) steps;
5. one step per video frame at `fps`: frame i takes step round(i * 30 / fps) (half to even), as many frames as
   whole clips of `frames_per_clip` need to cover the audio plus one more clip; frames past the audio are zeros.

Our layout is channels-last, (frames, layers, dim); the official tensor is [1, layers, dim, frames].
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import mlx.core as mx
import numpy as np

from .wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

WAV2VEC2_SAMPLE_RATE = 16000
WAV2VEC2_FEATURE_RATE = 50  # one step per 320 samples at 16 kHz
FEATURE_RATE = 30  # the rate the features are interpolated to before bucketing ("video_rate" upstream)
# Added to the variance by transformers' Wav2Vec2FeatureExtractor before the square root.
NORMALIZE_EPS = 1e-7


@dataclass(frozen=True)
class FrameAudioFeatures:
    """Audio features for `num_clips * frames_per_clip` video frames: `features` is (frames, layers, dim)."""

    features: mx.array
    num_clips: int
    frames_per_clip: int
    audio_frames: int  # frames that lie within the audio; the rest of `features` is zeros

    def clip(self, index: int) -> mx.array:
        """The (frames_per_clip, layers, dim) features of clip `index`."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range: the audio covers {self.num_clips} clips")
        start = index * self.frames_per_clip
        return self.features[start : start + self.frames_per_clip]


def normalize_waveform(samples: np.ndarray) -> np.ndarray:
    """The processor's per-utterance normalisation: (x - mean) / sqrt(var + 1e-7), as float32."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform shaped (samples,), got {x.shape}")
    x64 = x.astype(np.float64)
    return ((x64 - x64.mean()) / np.sqrt(x64.var() + NORMALIZE_EPS)).astype(np.float32)


def min_samples(config: Wav2Vec2Config) -> int:
    """Fewest 16 kHz samples that yield at least one 30 Hz feature step (shorter audio has no features)."""
    n = 1
    while resampled_length(max(config.output_length(n), 0)) < 1:
        n += 1
    return n


def resampled_length(steps: int, input_rate: int = WAV2VEC2_FEATURE_RATE, output_rate: int = FEATURE_RATE) -> int:
    """Steps after rate conversion.

    Computed in floating point as duration-in-seconds times the output rate, then truncated, because that is
    what the official code does; it is one step short of the exact floor for some lengths (205 steps at
    50 Hz give 122, not 123, at 30 Hz), and matching that keeps the frame buckets identical.
    """
    return int(steps / float(input_rate) * output_rate)


def wav2vec2_hidden_states(model: Wav2Vec2Model, samples_16k: np.ndarray) -> mx.array:
    """All hidden states of one 16 kHz mono waveform (normalised here), stacked: (layers, T50, dim)."""
    values = mx.array(normalize_waveform(samples_16k))[None]
    return mx.stack([s[0] for s in model.hidden_states(values)])


def interpolate_time(features: mx.array, length: int) -> mx.array:
    """Linear interpolation along axis 1 of (layers, T, dim) to `length` steps, end points aligned.

    Output step j reads input position j * (T - 1) / (length - 1). The position and the weights are computed
    in float32, as torch's CPU kernel does for float input, so the weights agree bit for bit with the
    reference rather than to float32 rounding of the position (which, times a feature difference of a few
    units, would be a few 1e-6).
    """
    steps = features.shape[1]
    if length < 1:
        raise ValueError(f"cannot interpolate to {length} steps")
    if steps == 1 or length == 1:
        return mx.repeat(features[:, :1], length, axis=1)
    scale = np.float32(steps - 1) / np.float32(length - 1)
    position = scale * np.arange(length, dtype=np.float32)
    left = np.minimum(position.astype(np.int64), steps - 1)
    right = np.minimum(left + 1, steps - 1)
    w_right = np.clip(position - left.astype(np.float32), 0, 1).astype(np.float32)
    w_left = (np.float32(1) - w_right).astype(np.float32)
    w_left, w_right = (mx.array(w)[None, :, None] for w in (w_left, w_right))
    return w_left * features[:, mx.array(left)] + w_right * features[:, mx.array(right)]


def frame_indices(num_frames: int, fps: int, feature_rate: int = FEATURE_RATE) -> np.ndarray:
    """Feature step of each video frame: round(i * feature_rate / fps), halves to even."""
    ratio = Fraction(feature_rate, fps)
    return np.array([round(i * ratio) for i in range(num_frames)], dtype=np.int64)


def bucket_per_frame(
    features: mx.array, fps: int = 16, frames_per_clip: int = 80, feature_rate: int = FEATURE_RATE
) -> FrameAudioFeatures:
    """Pick one feature step per video frame from (layers, T30, dim) features.

    The frame count is a whole number of clips: floor(T30 / (frames_per_clip * feature_rate / fps)) + 1 clips,
    so the audio is always covered and the last clip is partly (or, on an exact boundary, entirely) silent.
    """
    layers, steps, dim = features.shape
    if steps < 1:
        raise ValueError("no audio feature steps to bucket")
    num_clips = (steps * fps) // (frames_per_clip * feature_rate) + 1
    num_frames = num_clips * frames_per_clip
    index = frame_indices(num_frames, fps, feature_rate)
    inside = index < steps
    audio_frames = int(inside.sum())
    picked = features[:, mx.array(index[inside])].transpose(1, 0, 2)
    zeros = mx.zeros((num_frames - audio_frames, layers, dim), dtype=features.dtype)
    # The indices grow with i, so the frames inside the audio are exactly the first `audio_frames`.
    return FrameAudioFeatures(mx.concatenate([picked, zeros]), num_clips, frames_per_clip, audio_frames)


def frame_audio_features(
    model: Wav2Vec2Model, samples_16k: np.ndarray, fps: int = 16, frames_per_clip: int = 80
) -> FrameAudioFeatures:
    """The whole chain, from a mono 16 kHz waveform to per-video-frame features of every wav2vec2 layer."""
    if samples_16k.shape[0] < min_samples(model.config):
        raise ValueError(
            f"{samples_16k.shape[0]} samples at 16 kHz are too few for one audio feature step"
            f" (at least {min_samples(model.config)} are needed)"
        )
    states = wav2vec2_hidden_states(model, samples_16k)
    resampled = interpolate_time(states, resampled_length(states.shape[1]))
    return bucket_per_frame(resampled, fps=fps, frames_per_clip=frames_per_clip)
