"""Frame sinks: writing a video or a PNG folder one frame at a time, under a temporary name published atomically,
so that a long video is never held in memory whole (generation, chains of clips, interpolation, delivery)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import MlxVideoError
from .atomic import atomic_dir, atomic_file
from .video import PNG_FRAME_PATTERN, VIDEO_FORMATS, check_replaceable_frame_folder, frame_rate, is_video_file


class CountedFrames:
    """An iterator that counts what passed through it."""

    def __init__(self, items):
        self.items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.count += 1
        return item


class PngSink:
    """PNG frames, one file per frame, into a folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = 0

    def write(self, frame: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(frame).save(self.folder / PNG_FRAME_PATTERN.format(index=self.index), format="PNG")
        self.index += 1

    def close(self) -> None:
        pass


class VideoSink:
    """H.264 yuv420p with the settings of `io.video.write_video`, fed one frame at a time."""

    def __init__(self, path: Path, container_format: str, width: int, height: int, rate: Fraction, crf: int = 18):
        import av

        self.container = av.open(str(path), mode="w", format=container_format, options={"movflags": "+faststart"})
        stream = self.container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.colorspace = 1  # BT.709
        stream.codec_context.color_primaries = 1
        stream.codec_context.color_trc = 1
        stream.codec_context.color_range = 1  # limited
        self.stream = stream
        self.index = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", dst_colorspace="ITU709")
        yuv.pts = self.index
        self.container.mux(self.stream.encode(yuv))
        self.index += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()


def stream_frames(frames, output: Path, overwrite: bool, width: int, height: int, fps) -> int:
    """Write frames one by one into OUTPUT (a .mp4/.mov or a PNG folder), under a temporary name."""
    is_video = is_video_file(output)
    if is_video and (width % 2 or height % 2):
        raise MlxVideoError(f"video frames are {width}x{height}; H.264 in yuv420p needs an even width and height")
    if not is_video and output.exists() and overwrite:
        check_replaceable_frame_folder(output)
    written = 0
    context = atomic_file(output, overwrite) if is_video else atomic_dir(output, overwrite)
    with context as tmp:
        if is_video:
            sink = VideoSink(tmp, VIDEO_FORMATS[output.suffix.lower()], width, height, frame_rate(fps))
        else:
            sink = PngSink(tmp)
        try:
            for frame in frames:
                sink.write(frame)
                written += 1
        finally:
            sink.close()
    return written
