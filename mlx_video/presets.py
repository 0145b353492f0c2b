"""Delivery presets, quality profiles and durations: how a run is described in delivery terms (a platform's
frame size and rate, a quality class, seconds) and turned into a model's render settings.

Rules (the README states the same):
- Render size. A preset asks for a delivery size W x H. The model renders at one of its published sizes: among
  the sizes of the quality's size class, the one with the delivery's aspect ratio (within 1%); if none has it,
  the one whose aspect is closest, and the decoded frames are then centre-cropped to the delivery aspect
  (`fit = "crop"`, the default) or letterboxed in black (`fit = "pad"`, for user presets). The frames are then
  scaled to W x H with Pillow's LANCZOS filter.
- Frame rate. The model renders at its own fps; the delivery fps is reached by picking, for each output frame,
  the rendered frame nearest in time (frames are duplicated or dropped; the duration is kept). Interpolation
  (`mlxvid interpolate`, RIFE) can be run on the result instead.
- Quality profiles: high = the model's largest published size class and its published steps; medium = its
  smallest size class (480p-class where published) and 60% of the steps; low = the smallest class and 40% of
  the steps (rounded, at least 4). A spec may publish its own table in `defaults["quality"]`.
- Duration: frames = stride*n + 1 (stride = the VAE's temporal stride) nearest to seconds * fps (ties round
  up; at least stride + 1); the longest clip is the model's published default frame count (or
  `defaults["max_frames"]` where a spec gives one); `frames_for_duration` refuses longer durations, which
  `mlxvid generate` makes as a chain of clips instead (`mlx_video.chains`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import MlxVideoError

ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Preset:
    name: str
    width: int
    height: int
    fps: float
    fit: str = "crop"  # how a render of another aspect meets the delivery size: crop | pad
    # safe margins as fractions of the delivery size: text and watermarks stay inside them
    margins: dict = field(default_factory=lambda: {"top": 0.05, "bottom": 0.05, "left": 0.05, "right": 0.05})
    watermark_corner: str = "bottom-right"
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN_PRESETS = {
    p.name: p
    for p in [
        Preset("linkedin-square", 1080, 1080, 24, description="LinkedIn feed, square"),
        Preset("linkedin-wide", 1920, 1080, 24, description="LinkedIn feed, landscape 16:9"),
        # The Shorts player covers the bottom (title, channel, subscribe) and the right edge (buttons).
        Preset("youtube-short", 1080, 1920, 30, margins={"top": 0.08, "bottom": 0.25, "left": 0.05, "right": 0.15},
               watermark_corner="top-left", description="YouTube Shorts, vertical 9:16"),
    ]
}

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def config_dir() -> Path:
    """$MLXVID_HOME if set, else ~/.config/mlxvid: where presets.toml lives."""
    home = os.environ.get("MLXVID_HOME")
    return Path(home) if home else Path.home() / ".config" / "mlxvid"


def user_presets_path() -> Path:
    return config_dir() / "presets.toml"


def load_user_presets(path: Path | None = None) -> dict[str, Preset]:
    """Presets from presets.toml, one table per preset:

        [instagram-reel]
        width = 1080
        height = 1920
        fps = 30
        fit = "crop"              # optional: crop | pad
        watermark_corner = "top-left"   # optional
        margins = { top = 0.1, bottom = 0.2, left = 0.05, right = 0.1 }   # optional
    """
    import tomllib

    path = user_presets_path() if path is None else Path(path)
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MlxVideoError(f"{path} is not valid TOML: {e}") from None
    presets = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise MlxVideoError(f"{path}: [{name}] must be a table with width, height and fps")
        unknown = set(table) - {"width", "height", "fps", "fit", "margins", "watermark_corner", "description"}
        if unknown:
            raise MlxVideoError(f"{path}: [{name}] has unknown keys {', '.join(sorted(unknown))}")
        try:
            margins = {**Preset("x", 2, 2, 1).margins, **table.get("margins", {})}
            preset = Preset(name, int(table["width"]), int(table["height"]), float(table["fps"]),
                            table.get("fit", "crop"), margins, table.get("watermark_corner", "bottom-right"),
                            table.get("description", f"from {path}"))
        except (KeyError, TypeError, ValueError) as e:
            raise MlxVideoError(f"{path}: [{name}] needs numbers width, height and fps ({e})") from None
        check_preset(preset, str(path))
        presets[name] = preset
    return presets


def check_preset(p: Preset, where: str = "preset") -> None:
    if p.width <= 0 or p.height <= 0 or p.width % 2 or p.height % 2:
        raise MlxVideoError(f"{where}: {p.name} must have an even, positive width and height (H.264), not {p.width}x{p.height}")
    if not 0 < p.fps <= 240:
        raise MlxVideoError(f"{where}: {p.name} fps must be in (0, 240], not {p.fps}")
    if p.fit not in ("crop", "pad"):
        raise MlxVideoError(f"{where}: {p.name} fit must be crop or pad, not {p.fit!r}")
    if p.watermark_corner not in CORNERS:
        raise MlxVideoError(f"{where}: {p.name} watermark_corner must be one of {', '.join(CORNERS)}")
    if set(p.margins) != {"top", "bottom", "left", "right"} or not all(0 <= v < 0.5 for v in p.margins.values()):
        raise MlxVideoError(f"{where}: {p.name} margins need top, bottom, left, right as fractions below 0.5")


def all_presets() -> dict[str, Preset]:
    return {**BUILTIN_PRESETS, **load_user_presets()}


def get_preset(name: str) -> Preset:
    presets = all_presets()
    try:
        return presets[name]
    except KeyError:
        raise MlxVideoError(f"unknown preset {name!r}; choose one of {', '.join(presets)} (or add it to "
                            f"{user_presets_path()})") from None


# ---- quality profiles ----

QUALITIES = ("high", "medium", "low")
STEP_FRACTIONS = {"high": 1.0, "medium": 0.6, "low": 0.4}


def size_classes(spec) -> list[list[tuple[int, int]]]:
    """The published sizes grouped by pixel count (orientations of one class together), largest first."""
    classes: dict[int, list] = {}
    for w, h in spec.sizes:
        classes.setdefault(min(w, h), []).append((w, h))
    return [classes[k] for k in sorted(classes, reverse=True)]


def quality_profiles(spec) -> dict[str, dict]:
    """{quality: {"sizes": [(w, h), ...], "steps": n}} for a model (see the module docstring)."""
    published = spec.default("quality")
    if published:
        return {q: {"sizes": [tuple(s) for s in v["sizes"]], "steps": int(v["steps"])} for q, v in published.items()}
    classes = size_classes(spec)
    steps = spec.default("steps") or 0
    return {q: {"sizes": classes[0] if q == "high" else classes[-1],
                "steps": steps if q == "high" else max(4, round(steps * STEP_FRACTIONS[q]))} for q in QUALITIES}


def _aspect_error(w: int, h: int, target: float) -> float:
    return abs((w / h) / target - 1.0)


def pick_render_size(spec, width: int, height: int, quality: str = "high") -> tuple[tuple[int, int], bool]:
    """The published size of the quality's class for a delivery of `width` x `height`: (size, exact aspect)."""
    sizes = quality_profiles(spec)[quality]["sizes"] or list(spec.sizes)
    target = width / height
    best = min(sizes, key=lambda s: (_aspect_error(*s, target), -s[0] * s[1]))
    return best, _aspect_error(*best, target) <= ASPECT_TOLERANCE


def frames_for_duration(spec, seconds: float, fps: float) -> int:
    """The frame count of the model's rule (stride*n + 1) nearest to `seconds` at `fps` (ties up)."""
    import math

    if not math.isfinite(seconds) or seconds <= 0:
        raise MlxVideoError(f"--duration must be a positive number of seconds, got {seconds}")
    stride = spec.frame_stride
    n = max(1, math.floor((seconds * fps - 1) / stride + 0.5))
    frames = stride * n + 1
    longest = int(spec.default("max_frames") or spec.default("frames"))
    if frames > longest:
        raise MlxVideoError(
            f"--duration {seconds:g} s needs {frames} frames at {fps:g} fps; {spec.id} makes at most {longest} frames "
            f"({longest / fps:.2f} s) in one clip"
        )
    return frames


# ---- delivery: size and frame rate ----

def fit_frames(frames: np.ndarray, width: int, height: int, fit: str = "crop") -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3): centre-crop (or pad) to the aspect, then LANCZOS scaling."""
    from PIL import Image

    t, h, w, _ = frames.shape
    target = width / height
    if fit == "crop":
        cw, ch = (w, round(w / target)) if w / h < target else (round(h * target), h)
        cw, ch = min(cw, w), min(ch, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        frames = frames[:, y0:y0 + ch, x0:x0 + cw]
        inner = (width, height)
    else:  # pad: scale to fit inside, letterbox in black
        scale = min(width / w, height / h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = np.zeros((t, height, width, 3), np.uint8)
    ox, oy = (width - inner[0]) // 2, (height - inner[1]) // 2
    for i in range(t):
        image = Image.fromarray(np.ascontiguousarray(frames[i]))
        if image.size != inner:
            image = image.resize(inner, Image.LANCZOS)
        out[i, oy:oy + inner[1], ox:ox + inner[0]] = np.asarray(image)
    return out


def retime_indices(count: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Indices of the rendered frames shown at each output frame: nearest in time, duration kept."""
    if src_fps == dst_fps:
        return np.arange(count)
    out = max(1, round(count * dst_fps / src_fps))
    return np.minimum(np.floor(np.arange(out) * src_fps / dst_fps + 0.5).astype(int), count - 1)


def retime(frames: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    return frames[retime_indices(frames.shape[0], src_fps, dst_fps)]
