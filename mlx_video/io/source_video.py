"""An input video (video-to-video's `--video`): an .mp4/.mov or a folder of PNG frames, read with PyAV as RGB
(`mlx_video.interpolate.open_input`), its frame count settled against the model's, each frame fitted to the
video size as `--image` is (`mlx_video.io.image.fit_image`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import MlxVideoError


def read_frames(path, most: int, flag: str = "--video") -> np.ndarray:
    """Up to `most` frames of the video or PNG folder at `path`, (n, H, W, 3) uint8; refused when unreadable or
    when its frames change size."""
    from ..interpolate import open_input

    if not Path(path).exists():
        raise MlxVideoError(f"{flag} {path}: no such file or folder")
    source = open_input(path)
    frames = []
    for frame in source.frames:
        if frame.shape != (source.height, source.width, 3):
            raise MlxVideoError(f"{flag} {path}: frame {len(frames)} is {frame.shape[1]}x{frame.shape[0]}, the first "
                                f"is {source.width}x{source.height}; every frame must have the same size")
        frames.append(frame)
        if len(frames) == most:
            break
    if hasattr(source.frames, "close"):
        source.frames.close()  # a video's container closes with its frame iterator
    return np.stack(frames)


def settle_frame_count(count: int, frames: int | None, stride: int, longest: int, label: str, model: str,
                       flag: str = "--video", shorter: bool = False) -> int:
    """The run's frame count for a video of `count` frames (read up to `longest + 1`): `frames` when given (the
    video must hold that many, unless `shorter`: a video the run extends), else the most frames of the model's
    form (stride x n + 1) the video holds."""
    if frames is not None:
        if count < frames and not shorter:
            raise MlxVideoError(f"{flag} {label} has {count} frames; --frames {frames} needs at least {frames}")
        return frames
    if count > longest:
        raise MlxVideoError(f"{flag} {label} is longer than one clip of {model} ({longest} frames): give --frames N "
                            f"(of the form {stride}n+1, at most {longest}) to use its first N frames")
    return stride * ((count - 1) // stride) + 1


def fit_frames_to(frames: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, height, width, 3) float32 in [-1, 1], each frame as `fit_image` fits --image."""
    from .image import fit_image

    return np.stack([fit_image(frame, width, height, mode=mode) for frame in frames])


def input_sha256(path) -> str | None:
    """sha256 of a file's bytes, or of a PNG folder's frames (each name and its bytes, in name order)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        return None
    for file in files:
        if path.is_dir():
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
