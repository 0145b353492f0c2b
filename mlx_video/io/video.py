"""Write generated frames to disk: an H.264 video, or a lossless PNG sequence.

Frames are a numpy array shaped (T, H, W, 3), RGB, either uint8 or floating point in [0, 1]. Floats are
clipped to [0, 1] and rounded to uint8; anything that is not finite is refused rather than encoded as
garbage.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..errors import MlxVideoError
from .atomic import atomic_dir, atomic_file

# Container chosen from the output's suffix. It is passed to PyAV explicitly, so the temporary name the
# file is written under does not have to carry the right extension.
VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov"}

PNG_FRAME_PATTERN = "frame_{index:05d}.png"


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether an output path names a video file (.mp4/.mov); any other output is a folder of PNG frames."""
    return Path(path).suffix.lower() in VIDEO_FORMATS


def write_video(
    frames,
    path: str | os.PathLike,
    fps: float,
    overwrite: bool = False,
    crf: int = 18,
) -> Path:
    """Encode `frames` (T, H, W, 3; uint8, or float in [0, 1]) as H.264 yuv420p at exactly `fps`.

    The container is MP4 or MOV, from the suffix of `path`. `crf` is libx264's constant rate factor
    (0-51, lower is better; 18 is visually near-lossless). The file is written under a temporary name
    and renamed at the end, so a failed or interrupted write leaves nothing at `path`.
    """
    path = Path(path)
    container_format = video_format(path)
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise MlxVideoError(
            f"video frames are {width}x{height}; H.264 in yuv420p needs an even width and height"
        )
    rate = frame_rate(fps)
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise MlxVideoError(f"crf must be an integer from 0 to 51, got {crf!r}")
    _refuse_directory(path)

    with atomic_file(path, overwrite) as tmp:
        try:
            _encode_h264(frames, tmp, container_format, rate, int(crf))
        except av.error.FFmpegError as error:
            raise MlxVideoError(f"could not write {path}: {error}") from error
    return path


def write_frames_png(frames, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `frames` losslessly as frame_00000.png, frame_00001.png, ... into `folder`.

    The folder is filled under a temporary name and renamed at the end. With `overwrite`, an existing
    folder is replaced as a whole, but only if it holds nothing except PNG frames, so that a mistyped
    output path cannot wipe unrelated files.
    """
    folder = Path(folder)
    frames = _check_frames(frames)
    if folder.exists() and overwrite:
        check_replaceable_frame_folder(folder)

    with atomic_dir(folder, overwrite) as tmp:
        for index in range(frames.shape[0]):
            image = Image.fromarray(_frame_to_uint8(frames[index]))
            image.save(tmp / PNG_FRAME_PATTERN.format(index=index), format="PNG")
    return folder


def _encode_h264(frames: np.ndarray, path: Path, container_format: str, rate: Fraction, crf: int):
    _, height, width, _ = frames.shape
    # faststart puts the index before the data, so browsers can start playing before the download ends.
    options = {"movflags": "+faststart"}
    with av.open(str(path), mode="w", format=container_format, options=options) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        # One tick per frame, so frame i has pts i and the muxer writes duration T / fps.
        stream.codec_context.time_base = 1 / rate
        # RGB is converted with the BT.709 matrix and tagged as such, so players do not have to guess
        # (untagged video is read as BT.601 by some players and BT.709 by others).
        stream.codec_context.colorspace = 1  # AVCOL_SPC_BT709
        stream.codec_context.color_primaries = 1  # AVCOL_PRI_BT709
        stream.codec_context.color_trc = 1  # AVCOL_TRC_BT709
        stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG (limited, 16-235)

        for index in range(frames.shape[0]):
            rgb = av.VideoFrame.from_ndarray(_frame_to_uint8(frames[index]), format="rgb24")
            yuv = rgb.reformat(format="yuv420p", dst_colorspace="ITU709")
            yuv.pts = index
            container.mux(stream.encode(yuv))
        container.mux(stream.encode(None))


def video_format(path: Path) -> str:
    container_format = VIDEO_FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise MlxVideoError(
            f"cannot write video to {path}: the file name must end in .mp4 or .mov"
            " (or write a PNG sequence to a folder instead)"
        )
    return container_format


def _refuse_directory(path: Path):
    if path.is_dir():
        raise MlxVideoError(f"{path} is a folder; give a file name ending in .mp4 or .mov")


def frame_rate(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.integer, np.floating)):
        raise MlxVideoError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(fps):
        raise MlxVideoError(f"fps must be a positive number, got {fps!r}")
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps))
    # Recovers NTSC rates such as 24000/1001 from 23.976..., and keeps integer rates exact.
    rate = rate.limit_denominator(1001)
    if rate <= 0:
        raise MlxVideoError(f"fps must be a positive number, got {fps!r}")
    return rate


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MlxVideoError(f"frames must be shaped (T, H, W, 3) RGB, got shape {frames.shape}")
    count, height, width, _ = frames.shape
    if count < 1:
        raise MlxVideoError("there are no frames to write")
    if height < 1 or width < 1:
        raise MlxVideoError(f"frames must have a positive width and height, got {width}x{height}")
    if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
        raise MlxVideoError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    if np.issubdtype(frames.dtype, np.floating) and not np.isfinite(frames).all():
        raise MlxVideoError("frames contain NaN or infinite values")
    return frames


def _frame_to_uint8(frame: np.ndarray) -> np.ndarray:
    """One frame as contiguous uint8; done frame by frame so a long float video is never copied whole."""
    if frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    frame = frame.astype(np.float32, copy=False)
    return np.rint(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)


def check_replaceable_frame_folder(folder: Path):
    if not folder.is_dir():
        raise MlxVideoError(f"{folder} exists and is not a folder; choose another output path")
    strangers = [entry.name for entry in folder.iterdir() if entry.suffix.lower() != ".png"]
    if strangers:
        raise MlxVideoError(
            f"refusing to replace {folder}: it holds files that are not PNG frames"
            f" ({', '.join(sorted(strangers)[:3])}); remove them or choose another folder"
        )
