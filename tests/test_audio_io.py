"""Audio reading (wav / flac / mp3 / m4a via PyAV), resampling, input checks and muxing audio into an mp4."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from mlx_video.errors import MlxVideoError
from mlx_video.io.audio import Audio, check_audio, mux_audio, read_audio, resample
from mlx_video.io.video import write_video

# container format, codec, sample format the encoder takes, suffix
FORMATS = {
    "wav": ("wav", "pcm_s16le", "s16", ".wav"),
    "flac": ("flac", "flac", "s16", ".flac"),
    "mp3": ("mp3", "libmp3lame", "fltp", ".mp3"),
    "m4a": ("ipod", "aac", "fltp", ".m4a"),
}


def tone(freq: float, amplitude: float, rate: int, seconds: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def write_tone(path, kind: str, channels: list[np.ndarray], rate: int):
    """Encode per-channel float samples with PyAV (the same library, but its encoders, not our reader)."""
    container_format, codec, sample_format, _ = FORMATS[kind]
    layout = "mono" if len(channels) == 1 else "stereo"
    data = np.stack(channels)
    with av.open(str(path), mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, data.shape[1], frame_size):
            chunk = data[:, start : start + frame_size]
            if sample_format == "s16":
                chunk = np.round(chunk * 32767).astype(np.int16).T.reshape(1, -1)  # packed
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=sample_format, layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def fit_sine(samples: np.ndarray, rate: int, freq: float) -> tuple[float, float]:
    """(amplitude, residual rms) of the least-squares sine of known `freq` plus DC through `samples`."""
    t = np.arange(samples.shape[0]) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, samples.astype(np.float64), rcond=None)
    residual = samples - basis @ coef
    return float(np.hypot(coef[0], coef[1])), float(np.sqrt(np.mean(residual**2)))


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    window = np.hanning(samples.shape[0])
    spectrum = np.abs(np.fft.rfft(samples * window))
    k = int(np.argmax(spectrum))
    # Parabolic interpolation of the log spectrum around the peak bin.
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-30)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / samples.shape[0]


@pytest.mark.parametrize("kind", list(FORMATS))
def test_reads_each_format_as_mono_float(tmp_path, kind):
    rate, freq = 44100, 441.0
    path = tmp_path / f"tone{FORMATS[kind][3]}"
    # Stereo with different levels per channel: the mono mix must be their average.
    write_tone(path, kind, [tone(freq, 0.6, rate, 1.0), tone(freq, 0.2, rate, 1.0)], rate)

    audio = read_audio(path)
    assert audio.sample_rate == rate
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    # Lossy codecs add at most a frame or two of padding (1152 samples for mp3, 1024 for AAC).
    assert abs(audio.samples.shape[0] - rate) <= 2400
    middle = audio.samples[4000:-4000] if kind in ("mp3", "m4a") else audio.samples
    assert dominant_frequency(middle, rate) == pytest.approx(freq, rel=2e-3)
    if kind in ("wav", "flac"):
        amplitude, residual = fit_sine(audio.samples, rate, freq)
        assert amplitude == pytest.approx(0.4, abs=1e-4)
        assert residual < 1e-4
    else:
        # LAME scales its input by 0.95, so the lossy files are checked against their own decoded channels.
        with av.open(str(path)) as container:
            channels = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
        assert channels.shape[0] == 2
        np.testing.assert_allclose(audio.samples, channels.mean(axis=0), atol=1e-6)
        amplitude, _ = fit_sine(middle, rate, freq)
        assert amplitude == pytest.approx(0.4, rel=0.06)


@pytest.mark.parametrize("source_rate,target_rate,freq", [(44100, 16000, 1000.0), (48000, 16000, 3100.0),
                                                          (22050, 16000, 523.25), (8000, 16000, 300.0),
                                                          (16000, 24000, 2000.0)])
def test_resample_matches_the_sine_sampled_at_the_target_rate(source_rate, target_rate, freq):
    seconds, phase = 0.75, 0.3
    ours = resample(tone(freq, 0.7, source_rate, seconds, phase), source_rate, target_rate)
    expected = tone(freq, 0.7, target_rate, seconds, phase)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    # Away from the two ends (where the filter sees the cut-off signal) it is the same sine, in phase.
    edge = target_rate // 50
    error = np.abs(ours[edge:-edge] - expected[edge:-edge]).max()
    assert error < 2e-3 * 0.7
    amplitude, residual = fit_sine(ours[edge:-edge], target_rate, freq)
    assert amplitude == pytest.approx(0.7, rel=1e-3)


def test_resample_removes_content_above_the_new_nyquist():
    # 10 kHz cannot exist at 16 kHz: an unfiltered decimation would alias it to 6 kHz at full level.
    out = resample(tone(10000.0, 0.5, 48000, 0.5), 48000, 16000)
    assert np.sqrt(np.mean(out[400:-400] ** 2)) < 0.01


def test_read_audio_resamples_to_the_requested_rate(tmp_path):
    path = tmp_path / "voice.wav"
    write_tone(path, "wav", [tone(440.0, 0.5, 22050, 0.8)], 22050)
    audio = read_audio(path, sample_rate=16000)
    assert audio.sample_rate == 16000 and audio.samples.shape == (round(0.8 * 16000),)
    assert audio.duration == pytest.approx(0.8)
    amplitude, residual = fit_sine(audio.samples[300:-300], 16000, 440.0)
    assert amplitude == pytest.approx(0.5, rel=1e-3) and residual < 1e-3


def test_unreadable_missing_and_audio_less_files_are_refused(tmp_path):
    with pytest.raises(MlxVideoError, match="does not exist"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(MlxVideoError, match="not a file"):
        read_audio(tmp_path)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(MlxVideoError, match="garbage.mp3"):
        read_audio(garbage)
    video_only = tmp_path / "silent_film.mp4"
    write_video(np.zeros((4, 32, 32, 3), np.uint8), video_only, fps=8)
    with pytest.raises(MlxVideoError, match="no audio stream"):
        read_audio(video_only)


def test_silent_and_too_short_audio_are_refused(tmp_path):
    quiet = tmp_path / "quiet.wav"
    write_tone(quiet, "wav", [np.zeros(16000, np.float32)], 16000)
    with pytest.raises(MlxVideoError, match="silent"):
        read_audio(quiet)
    short = tmp_path / "short.flac"
    write_tone(short, "flac", [tone(200.0, 0.3, 16000, 0.5)], 16000)
    assert read_audio(short, min_duration=0.4).duration == pytest.approx(0.5)
    with pytest.raises(MlxVideoError, match="at least 5.000 s"):
        read_audio(short, min_duration=5.0)
    with pytest.raises(MlxVideoError, match="silent"):
        check_audio(Audio(np.full(100, 5e-5, np.float32), 16000))


def test_odd_sample_rates(tmp_path):
    low = tmp_path / "telephone.wav"
    write_tone(low, "wav", [tone(300.0, 0.5, 4000, 0.5)], 4000)
    with pytest.raises(MlxVideoError, match="4000 Hz"):
        read_audio(low)
    # An unusual but sane rate is read and resampled.
    odd = tmp_path / "odd.wav"
    write_tone(odd, "wav", [tone(700.0, 0.5, 11025, 0.5)], 11025)
    audio = read_audio(odd, sample_rate=16000)
    written = tone(700.0, 0.5, 11025, 0.5).shape[0]
    assert audio.samples.shape == (round(written * 16000 / 11025),)
    assert dominant_frequency(audio.samples, 16000) == pytest.approx(700.0, rel=2e-3)
    with pytest.raises(MlxVideoError, match="target sample rate"):
        read_audio(odd, sample_rate=16000.5)
    with pytest.raises(MlxVideoError, match="target sample rate"):
        read_audio(odd, sample_rate=100)


def _stream_seconds(path):
    """(video seconds, audio seconds) of a written file, from the decoded frames and samples."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        video_seconds = frames / float(video.average_rate)
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        decoded = [f.to_ndarray() for f in container.decode(audio)]
        rate = audio.codec_context.sample_rate
        # The container's own bookkeeping (what players show) agrees with the decoded lengths.
        assert abs(float(audio.duration * audio.time_base) - video_seconds) <= 1 / float(video.average_rate)
    samples = np.concatenate(decoded, axis=1).mean(axis=0)
    return video_seconds, samples.shape[0] / rate, samples, rate


@pytest.mark.parametrize("audio_seconds", [3.0, 0.6])  # longer than the video (cut), shorter (padded)
def test_mux_audio_into_frames_matches_the_video_duration(tmp_path, audio_seconds):
    fps, count = 16, 21
    frames = np.random.default_rng(1).integers(0, 256, (count, 48, 64, 3), dtype=np.uint8)
    voice = tone(440.0, 0.5, 16000, audio_seconds)
    path = mux_audio(frames, voice, tmp_path / "talk.mp4", sample_rate=16000, fps=fps)

    video_seconds, audio_seconds_read, samples, rate = _stream_seconds(path)
    assert video_seconds == pytest.approx(count / fps)
    assert abs(audio_seconds_read - video_seconds) <= 1 / fps
    # The track carries the tone (AAC keeps a 440 Hz sine at its level).
    amplitude, _ = fit_sine(samples[2000:8000], rate, 440.0)
    assert amplitude == pytest.approx(0.5, rel=0.05)
    if audio_seconds < video_seconds:
        tail = samples[int((audio_seconds + 0.1) * rate) :]
        assert np.abs(tail).max() < 0.01


def test_mux_audio_at_a_rate_aac_cannot_carry(tmp_path):
    fps, count = 16, 12
    frames = np.zeros((count, 32, 32, 3), np.uint8)
    path = mux_audio(frames, tone(500.0, 0.5, 37000, 1.0), tmp_path / "odd.mp4", sample_rate=37000, fps=fps)
    video_seconds, audio_seconds, samples, rate = _stream_seconds(path)
    assert rate == 48000
    assert abs(audio_seconds - video_seconds) <= 1 / fps
    assert dominant_frequency(samples[2000:-2000], rate) == pytest.approx(500.0, rel=5e-3)


def test_mux_audio_into_an_existing_video_copies_its_stream(tmp_path):
    fps, count = 25, 30
    frames = np.random.default_rng(2).integers(0, 256, (count, 32, 48, 3), dtype=np.uint8)
    silent = write_video(frames, tmp_path / "silent.mp4", fps=fps)
    voice = read_audio_like(tmp_path)
    path = mux_audio(silent, voice, tmp_path / "with_voice.mp4")
    video_seconds, audio_seconds, _, rate = _stream_seconds(path)
    assert rate == voice.sample_rate
    assert video_seconds == pytest.approx(count / fps)
    assert abs(audio_seconds - video_seconds) <= 1 / fps
    with av.open(str(silent)) as a, av.open(str(path)) as b:
        original = [bytes(p) for p in a.demux(a.streams.video[0]) if p.size]
        copied = [bytes(p) for p in b.demux(b.streams.video[0]) if p.size]
    assert copied == original
    with pytest.raises(MlxVideoError, match="already exists"):
        mux_audio(silent, voice, path)


def read_audio_like(tmp_path) -> Audio:
    path = tmp_path / "voice.m4a"
    write_tone(path, "m4a", [tone(330.0, 0.4, 44100, 2.0)], 44100)
    return read_audio(path)
