"""Video, PNG-sequence and sidecar writing: read back with PyAV / Pillow and compare."""

from __future__ import annotations

import datetime
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mlx_video.errors import MlxVideoError
from mlx_video.io import sidecar, video
from mlx_video.io.sidecar import sidecar_path, write_sidecar
from mlx_video.io.video import write_frames_png, write_video

FRAMES, HEIGHT, WIDTH = 9, 48, 64

# Mean absolute error allowed after an H.264 round trip of smooth content at crf 18, in 0-255 units.
# Most of it is the yuv420p chroma subsampling, not the encoder (measured: 1.93 in all, 1.61 from yuv420p alone).
MEAN_ERROR_BOUND = 3.0


def moving_gradient(frames=FRAMES, height=HEIGHT, width=WIDTH) -> np.ndarray:
    """Float RGB in [0, 1], (T, H, W, 3): smooth colour ramps drifting over time."""
    t = np.arange(frames)[:, None, None] / frames
    y = np.arange(height)[None, :, None] / height
    x = np.arange(width)[None, None, :] / width
    red = 0.2 + 0.6 * np.sin(np.pi * (x / 2 + 0.3 * t)) ** 2
    green = 0.2 + 0.6 * y * (1 - 0.5 * t)
    blue = 0.5 + 0.3 * np.cos(np.pi * (x * y + t))
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(frames, 0, 1) * 255).astype(np.uint8)


def read_video(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "frames": stream.frames,
            "average_rate": stream.average_rate,
            "duration": float(stream.duration * stream.time_base),
            "colorspace": stream.codec_context.colorspace,
        }
        pixels = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    return info, pixels


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_video_round_trip(tmp_path):
    expected = to_uint8(moving_gradient())
    path = write_video(expected, tmp_path / "out.mp4", fps=24)

    assert path == tmp_path / "out.mp4"
    info, pixels = read_video(path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["colorspace"] == 1  # tagged BT.709
    assert info["frames"] == FRAMES
    assert info["average_rate"] == 24
    assert info["duration"] == pytest.approx(FRAMES / 24)
    assert pixels.shape == expected.shape
    assert mean_error(pixels, expected) < MEAN_ERROR_BOUND
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


@pytest.mark.parametrize("fps, expected_rate", [(16, Fraction(16)), (24000 / 1001, Fraction(24000, 1001))])
def test_video_frame_rate_is_exact(tmp_path, fps, expected_rate):
    path = write_video(to_uint8(moving_gradient(frames=5)), tmp_path / "out.mov", fps=fps)

    info, _ = read_video(path)
    assert info["average_rate"] == expected_rate
    assert info["duration"] == pytest.approx(float(5 / expected_rate))


def test_video_refuses_bad_crf(tmp_path):
    with pytest.raises(MlxVideoError, match="crf"):
        write_video(to_uint8(moving_gradient()), tmp_path / "out.mp4", fps=24, crf=52)
    assert list(tmp_path.iterdir()) == []


def test_video_from_float_frames(tmp_path):
    frames = moving_gradient()
    frames[0, 0, 0] = [-0.5, 1.5, 0.5]  # out of range: clipped, not wrapped
    path = write_video(frames.astype(np.float32), tmp_path / "out.mp4", fps=24)

    _, pixels = read_video(path)
    assert mean_error(pixels, to_uint8(frames)) < MEAN_ERROR_BOUND


def test_video_overwrite(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous")

    with pytest.raises(MlxVideoError, match="already exists"):
        write_video(to_uint8(moving_gradient()), path, fps=24)
    assert path.read_bytes() == b"previous"

    write_video(to_uint8(moving_gradient()), path, fps=24, overwrite=True)
    info, _ = read_video(path)
    assert info["frames"] == FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


@pytest.mark.parametrize(
    "frames, name, fps, message",
    [
        (np.zeros((4, 48, 64), np.uint8), "out.mp4", 24, "shaped"),
        (np.zeros((4, 48, 64, 4), np.uint8), "out.mp4", 24, "shaped"),
        (np.zeros((0, 48, 64, 3), np.uint8), "out.mp4", 24, "no frames"),
        (np.zeros((4, 47, 64, 3), np.uint8), "out.mp4", 24, "even width and height"),
        (np.zeros((4, 48, 63, 3), np.uint8), "out.mp4", 24, "even width and height"),
        (np.zeros((4, 48, 64, 3), np.int32), "out.mp4", 24, "dtype"),
        (np.full((4, 48, 64, 3), np.nan), "out.mp4", 24, "NaN"),
        (np.zeros((4, 48, 64, 3), np.uint8), "out.avi", 24, r"\.mp4 or \.mov"),
        (np.zeros((4, 48, 64, 3), np.uint8), "out", 24, r"\.mp4 or \.mov"),
        (np.zeros((4, 48, 64, 3), np.uint8), "out.mp4", 0, "positive"),
        (np.zeros((4, 48, 64, 3), np.uint8), "out.mp4", float("inf"), "positive"),
    ],
)
def test_video_refuses_bad_input_before_writing(tmp_path, frames, name, fps, message):
    with pytest.raises(MlxVideoError, match=message):
        write_video(frames, tmp_path / name, fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_video_failure_mid_encode_leaves_nothing(tmp_path, monkeypatch):
    converted = []
    real_frame_to_uint8 = video._frame_to_uint8

    def fail_on_fourth_frame(frame):
        converted.append(frame)
        if len(converted) == 4:
            raise RuntimeError("interrupted")
        return real_frame_to_uint8(frame)

    monkeypatch.setattr(video, "_frame_to_uint8", fail_on_fourth_frame)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_video(to_uint8(moving_gradient()), tmp_path / "out.mp4", fps=24)
    assert list(tmp_path.iterdir()) == []

    # With --overwrite, a failed write keeps the previous file intact.
    previous = tmp_path / "old.mp4"
    previous.write_bytes(b"previous")
    converted.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        write_video(to_uint8(moving_gradient()), previous, fps=24, overwrite=True)
    assert previous.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [previous]


def test_png_sequence_round_trips_exactly(tmp_path):
    expected = to_uint8(moving_gradient(height=7, width=5))  # odd sizes are fine for PNG
    folder = write_frames_png(expected, tmp_path / "frames")

    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(FRAMES)]
    pixels = np.stack([np.asarray(Image.open(folder / name)) for name in names])
    np.testing.assert_array_equal(pixels, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_png_sequence_from_floats_and_overwrite(tmp_path):
    frames = moving_gradient(frames=3)
    folder = write_frames_png(frames, tmp_path / "frames")
    with pytest.raises(MlxVideoError, match="already exists"):
        write_frames_png(frames[:2], folder)

    write_frames_png(frames[:2], folder, overwrite=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["frame_00000.png", "frame_00001.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / names[1])), to_uint8(frames[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_png_overwrite_refuses_folder_with_other_files(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")

    with pytest.raises(MlxVideoError, match="not PNG frames"):
        write_frames_png(moving_gradient(frames=2), folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_png_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail(frame):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(video, "_frame_to_uint8", fail)
    with pytest.raises(RuntimeError):
        write_frames_png(moving_gradient(frames=2), tmp_path / "frames")
    assert list(tmp_path.iterdir()) == []


def test_sidecar_content_and_placement(tmp_path):
    output = tmp_path / "out.mp4"
    output.write_bytes(b"video")
    settings = {
        "prompt": "a cat",
        "seed": np.int64(7),
        "guidance": np.float32(5.0),
        "size": (480, 832),
        "model_dir": Path("/models/wan"),
        "shift": float("nan"),
        "flags": np.array([True, False]),
    }
    path = write_sidecar(output, settings, {"text_encoder": 1.25, "denoise": np.float64(30.5)})

    assert path == tmp_path / "out.json"
    record = json.loads(path.read_text())
    assert set(record) == {"settings", "timings", "versions", "created"}
    assert record["settings"] == {
        "prompt": "a cat",
        "seed": 7,
        "guidance": 5.0,
        "size": [480, 832],
        "model_dir": "/models/wan",
        "shift": "nan",
        "flags": [True, False],
    }
    assert record["timings"] == {"text_encoder": 1.25, "denoise": 30.5}
    assert record["versions"] == sidecar.versions()
    assert record["versions"]["mlxvid"] == __import__("mlx_video").__version__
    assert isinstance(record["versions"]["metal_available"], bool)
    created = datetime.datetime.fromisoformat(record["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(minutes=1)

    with pytest.raises(MlxVideoError, match="already exists"):
        write_sidecar(output, {}, {})
    write_sidecar(output, {"seed": 8}, {}, overwrite=True)
    assert json.loads(path.read_text())["settings"] == {"seed": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.mp4"]


def test_sidecar_beside_png_folder(tmp_path):
    folder = write_frames_png(to_uint8(moving_gradient(frames=2)), tmp_path / "frames.v2")

    assert sidecar_path(str(folder) + "/") == tmp_path / "frames.v2.json"
    path = write_sidecar(folder, {}, {})
    assert path == tmp_path / "frames.v2.json"
    assert sorted(p.name for p in folder.iterdir()) == ["frame_00000.png", "frame_00001.png"]
