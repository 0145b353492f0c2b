"""Audio in and out: read a voice track for audio-driven models, and mux a track into a written video.

Reading decodes the first audio stream of any file FFmpeg understands (wav, flac, mp3, m4a/AAC, ...) with
PyAV, averages the channels to mono float32 and resamples with libswresample (PyAV's `AudioResampler`,
FFmpeg's default windowed-sinc filter: a Kaiser window, beta 9, 32 taps per phase, 1024 phases, cutoff 0.97
of the lower Nyquist frequency). That is not the soxr filter that librosa uses in the reference
pipelines; both are band-limited interpolators and differ by a fraction of a percent near the cutoff.

Every check that can fail on the user's file (unreadable, no audio stream, an odd sample rate, silence,
too short) raises `MlxVideoError` with a message naming the file, so callers can run `read_audio` before
any weights are loaded.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import MlxVideoError
from .atomic import atomic_file, detached
from .video import frame_rate, video_format, write_video

# Below this rate speech is already band-limited to under 4 kHz; upsampling such a file to a model's rate
# would feed it an input it was never trained on, so it is refused rather than silently accepted.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
# Peak amplitude (full scale = 1.0) below which a track counts as silent: about -80 dBFS.
DEFAULT_SILENCE_PEAK = 1e-4
# Samples per frame handed to the resampler and the AAC encoder (AAC codes 1024 samples a frame).
_CHUNK = 1024
_AAC_BITRATE = 192_000
# The sampling rates AAC can signal; other rates are resampled to _AAC_FALLBACK_RATE before encoding.
_AAC_RATES = frozenset({7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000})
_AAC_FALLBACK_RATE = 48000


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] (nominally) at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def read_audio(
    path: str | os.PathLike,
    sample_rate: int | None = None,
    min_duration: float | None = None,
    silence_peak: float = DEFAULT_SILENCE_PEAK,
) -> Audio:
    """Decode the first audio stream of `path` to mono float32, resampled to `sample_rate` (None: keep).

    Raises MlxVideoError when the file cannot be read, holds no audio, has a sample rate outside
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], is silent (peak below `silence_peak`), or is shorter than
    `min_duration` seconds.
    """
    path = Path(path)
    if sample_rate is not None:
        _check_rate(sample_rate, "the target sample rate")
    if not path.is_file():
        raise MlxVideoError(f"audio file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        samples, source_rate = _decode_mono(path)
    except av.error.FFmpegError as error:
        raise MlxVideoError(f"could not read audio from {path}: {error}") from error
    if samples.shape[0] == 0:
        raise MlxVideoError(f"{path} holds no audio samples")
    if not np.isfinite(samples).all():
        raise MlxVideoError(f"{path} decodes to NaN or infinite samples")

    audio = Audio(samples, source_rate)
    if sample_rate is not None and sample_rate != source_rate:
        audio = Audio(resample(samples, source_rate, sample_rate), sample_rate)
    check_audio(audio, path, min_duration=min_duration, silence_peak=silence_peak)
    return audio


def check_audio(
    audio: Audio,
    name: str | os.PathLike = "the audio",
    min_duration: float | None = None,
    silence_peak: float = DEFAULT_SILENCE_PEAK,
) -> None:
    """Refuse silent or too-short audio with a message the user can act on."""
    peak = float(np.abs(audio.samples).max()) if audio.samples.size else 0.0
    if peak < silence_peak:
        raise MlxVideoError(
            f"{name} is silent (peak amplitude {peak:.2g}, below {silence_peak:g} of full scale);"
            " an audio-driven model needs an audible voice track"
        )
    if min_duration is not None and audio.duration < min_duration:
        raise MlxVideoError(
            f"{name} lasts {audio.duration:.3f} s; at least {min_duration:.3f} s is needed for one clip"
        )


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample mono float32 `samples` with libswresample; the result has round(n * target / source) samples.

    The resampler compensates its own filter delay, so sample i of the output lies at time i / target_rate
    like sample j of the input lies at j / source_rate.
    """
    _check_rate(source_rate, "the source sample rate")
    _check_rate(target_rate, "the target sample rate")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"resample expects mono samples shaped (n,), got {samples.shape}")
    if source_rate == target_rate:
        return samples.copy()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    pieces = []
    for start in range(0, samples.shape[0], 16 * _CHUNK):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + 16 * _CHUNK], format="flt", layout="mono")
        frame.sample_rate = source_rate
        frame.pts = start
        frame.time_base = Fraction(1, source_rate)
        pieces.extend(out.to_ndarray()[0] for out in resampler.resample(frame))
    pieces.extend(out.to_ndarray()[0] for out in resampler.resample(None))
    out = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return _fit_length(out, round(samples.shape[0] * target_rate / source_rate))


def mux_audio(
    video,
    audio: np.ndarray | Audio,
    output_path: str | os.PathLike,
    sample_rate: int | None = None,
    fps: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an mp4/mov holding `video` and `audio` as an AAC track of exactly the video's duration.

    `video` is either the path of an existing video (its video stream is copied without re-encoding) or
    frames (T, H, W, 3) that are encoded first with `write_video` at `fps`. `audio` is an `Audio` or mono
    samples with `sample_rate`. Audio longer than the video is cut at the video's end; shorter audio is
    padded with silence, so both streams end together. A rate AAC cannot carry (e.g. 37 kHz) is resampled
    to 48 kHz first.
    """
    output_path = Path(output_path)
    container_format = video_format(output_path)
    if isinstance(audio, Audio):
        samples, sample_rate = audio.samples, audio.sample_rate
    else:
        if sample_rate is None:
            raise ValueError("mux_audio needs sample_rate when audio is an array")
        samples = np.asarray(audio, dtype=np.float32)
    _check_rate(sample_rate, "the audio sample rate")
    if samples.ndim != 1:
        raise MlxVideoError(f"audio to mux must be mono samples shaped (n,), got {samples.shape}")
    if not np.isfinite(samples).all():
        raise MlxVideoError("audio to mux contains NaN or infinite samples")
    if sample_rate not in _AAC_RATES:
        samples, sample_rate = resample(samples, sample_rate, _AAC_FALLBACK_RATE), _AAC_FALLBACK_RATE

    if isinstance(video, (str, os.PathLike)):
        return _mux_into(Path(video), samples, sample_rate, output_path, container_format, overwrite)
    if fps is None:
        raise ValueError("mux_audio needs fps when video is given as frames")
    frame_rate(fps)
    with tempfile.TemporaryDirectory(prefix="mlxvid-mux-") as scratch:
        silent = Path(scratch) / f"video{output_path.suffix.lower()}"
        with detached():  # a scratch file, not the result: written now even while the result's unit is open
            write_video(video, silent, fps)
        return _mux_into(silent, samples, sample_rate, output_path, container_format, overwrite)


def _mux_into(
    video_path: Path, samples: np.ndarray, sample_rate: int, output_path: Path, container_format: str, overwrite: bool
) -> Path:
    try:
        source = av.open(str(video_path))
    except av.error.FFmpegError as error:
        raise MlxVideoError(f"could not open video {video_path}: {error}") from error
    with source, atomic_file(output_path, overwrite) as tmp:
        if not source.streams.video:
            raise MlxVideoError(f"{video_path} has no video stream")
        video_in = source.streams.video[0]
        duration = _video_duration(video_in)
        samples = _fit_length(samples, round(duration * sample_rate))
        with av.open(str(tmp), mode="w", format=container_format, options={"movflags": "+faststart"}) as out:
            if hasattr(out, "add_stream_from_template"):  # PyAV >= 13
                video_out = out.add_stream_from_template(video_in)
            else:
                video_out = out.add_stream(template=video_in)
            audio_out = out.add_stream("aac", rate=sample_rate, layout="mono")
            audio_out.bit_rate = _AAC_BITRATE
            audio_out.codec_context.time_base = Fraction(1, sample_rate)
            for packet in source.demux(video_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = video_out
                out.mux(packet)
            for start in range(0, samples.shape[0], _CHUNK):
                frame = av.AudioFrame.from_ndarray(samples[None, start : start + _CHUNK], format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                out.mux(audio_out.encode(frame))
            out.mux(audio_out.encode(None))
    return output_path


def _video_duration(stream) -> float:
    """Seconds covered by the stream's frames: frame count / frame rate, as `write_video` writes them."""
    rate = stream.average_rate or stream.base_rate
    if stream.frames and rate:
        return float(stream.frames / rate)
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    raise MlxVideoError("cannot tell the duration of the video to put the audio into")


def _decode_mono(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MlxVideoError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise MlxVideoError(f"{path} does not state its sample rate")
        _check_rate(rate, f"the sample rate of {path}")
        # Planar float keeps the channels apart so that they can be averaged here, explicitly, rather than
        # by libswresample's downmix matrix (which scales stereo to mono by 1/sqrt(2) per channel).
        to_planar = av.AudioResampler(format="fltp")
        channels = []
        for frame in container.decode(stream):
            if frame.sample_rate != rate:
                raise MlxVideoError(f"{path} changes its sample rate mid-stream ({rate} -> {frame.sample_rate} Hz)")
            channels.extend(f.to_ndarray() for f in to_planar.resample(frame))
        channels.extend(f.to_ndarray() for f in to_planar.resample(None))
    if not channels:
        return np.zeros(0, np.float32), rate
    return np.concatenate(channels, axis=1).mean(axis=0, dtype=np.float64).astype(np.float32), rate


def _check_rate(rate, what: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise MlxVideoError(f"{what} must be a whole number of Hz, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MlxVideoError(
            f"{what} is {rate} Hz; audio from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz is supported"
        )


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    if samples.shape[0] >= length:
        return np.ascontiguousarray(samples[:length], dtype=np.float32)
    return np.concatenate([samples, np.zeros(length - samples.shape[0], np.float32)]).astype(np.float32)
