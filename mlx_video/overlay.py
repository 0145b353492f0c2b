"""Text overlays and a watermark burned into delivered frames.

Placement (stated in the README): overlays are centred horizontally, their top on the top safe margin, in a
font whose size is 6% of the frame's shorter side, white with a dark outline, wrapped to the safe width.
The watermark sits in a corner inside the safe margins: text at 3.5% of the shorter side, or an image scaled to
15% of the frame width; 80% opaque. Safe margins come from the preset (Shorts' UI covers the bottom and right).
Text uses Noto Sans (the `fontpkg-noto-sans` dependency; Pillow's built-in font where it is missing) unless a font
file is given; characters the font cannot draw are reported before the run. An overlay never overlaps a watermark
in a top corner: it starts under it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxVideoError

DEFAULT_MARGINS = {"top": 0.05, "bottom": 0.05, "left": 0.05, "right": 0.05}
OVERLAY_SIZE, WATERMARK_SIZE, WATERMARK_IMAGE_WIDTH, WATERMARK_OPACITY = 0.06, 0.035, 0.15, 0.8
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
_TIMES = re.compile(r"^(\d+(?:\.\d*)?)?-(\d+(?:\.\d*)?)?$")


@dataclass(frozen=True)
class Overlay:
    text: str
    start: float = 0.0  # seconds of the delivered video
    end: float = math.inf

    def shown_at(self, seconds: float) -> bool:
        return self.start <= seconds < self.end


def parse_overlay(value: str) -> Overlay:
    """`TEXT`, `TEXT@START-END`, `TEXT@START-` or `TEXT@-END` (seconds). A last `@` followed by one word is a time
    window, unless the word is a handle or an address (`_attempted_window`); a window that does not read as one is
    refused, not drawn as text."""
    text, at, times = value.rpartition("@")
    if at and _attempted_window(text, times.strip()):
        raise MlxVideoError(f"--overlay {value!r}: after the last @ comes the time window in seconds (START-END, "
                            f"START- or -END, e.g. @0-2.5), not {times.strip()!r}; to keep an @ in the text, add a "
                            f"window: {value}@0-")
    if at and (m := _TIMES.match(times.strip())):
        start = float(m.group(1)) if m.group(1) else 0.0
        end = float(m.group(2)) if m.group(2) else math.inf
        if not text:
            raise MlxVideoError(f"--overlay {value!r} has no text before @")
        if end <= start:
            raise MlxVideoError(f"--overlay {value!r}: the end must come after the start")
        return Overlay(text, start, end)
    if not value.strip():
        raise MlxVideoError("--overlay needs some text")
    return Overlay(value)


def default_font_file() -> Path | None:
    """The default font: Noto Sans (Latin, Greek, Cyrillic, Vietnamese; SIL Open Font License) from the
    `fontpkg-noto-sans` dependency; None where it is not installed (Pillow's built-in font is used then)."""
    import importlib.util

    spec = importlib.util.find_spec("fontpkg_noto_sans")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "files" / "NotoSans[wdth,wght].ttf"
    return path if path.is_file() else None


def _attempted_window(text: str, times: str) -> bool:
    """Whether what follows the last @ was meant as a time window but is not one: a single word that is not a
    window, unless it is text: a handle (`Follow @me`, the @ after a space) or an address (`me@example.com`)."""
    if not times or any(c.isspace() for c in times) or _TIMES.match(times):
        return False
    if times[0].isdigit() or times[0] in ".-":
        return True
    handle = not text or text[-1].isspace()
    address = re.fullmatch(r"[^\W\d_][\w-]*(\.[\w-]+)+", times) is not None
    return not (handle or address)


def load_font(size: int, font: str | Path | None = None):
    from PIL import ImageFont

    if font is None:
        font = default_font_file()
        if font is None:
            return ImageFont.load_default(size=size)
    if Path(font).is_dir():
        raise MlxVideoError(f"--font {font} is a folder; give a .ttf or .otf file")
    try:
        return ImageFont.truetype(str(font), size)
    except OSError as e:
        raise MlxVideoError(f"cannot read --font {font}: {e}") from None


def check_font(font) -> None:
    if font is not None:
        load_font(12, font)


def missing_glyphs(text: str, font=None) -> list[str]:
    """The characters of `text` the font has no glyph for (drawn as empty boxes): those drawn exactly as a
    character no font has (a private-use code point) is drawn."""
    face = load_font(24, font)
    box = face.getmask("\U0010fffd")
    missing_mask = (box.size, bytes(box))
    missing = []
    for char in dict.fromkeys(text):
        if char.isspace() or char in missing:
            continue
        mask = face.getmask(char)
        if (mask.size, bytes(mask)) == missing_mask:
            missing.append(char)
    return missing


def check_delivery(overlays, watermark: str | None, font) -> list[str]:
    """Open and check every delivery input before any weights load (the font, an image watermark); returns
    warnings (characters the font cannot draw)."""
    check_font(font)
    check_watermark(watermark)
    texts = [o.text for o in overlays] + ([watermark] if watermark is not None and not is_image(watermark) else [])
    missing = missing_glyphs("".join(texts), font)
    if not missing:
        return []
    name = Path(font).name if font is not None else "the default font"
    return [f"{name} has no glyph for {' '.join(repr(c) for c in missing)}: drawn as empty boxes; give --font with a "
            "font that has them"]


def _wrap(draw, text: str, font, width: int) -> str:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return "\n".join(lines)


def safe_box(width: int, height: int, margins: dict | None = None) -> tuple[int, int, int, int]:
    m = margins or DEFAULT_MARGINS
    return (round(width * m["left"]), round(height * m["top"]),
            width - round(width * m["right"]), height - round(height * m["bottom"]))


def overlay_box(width: int, height: int, text: str, margins=None, font=None, below=None) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) an overlay's text occupies (under the box `below`, a watermark in a top
    corner, if given)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (width, height)))
    return _layout_overlay(draw, width, height, text, margins, font, below)[2]


def _layout_overlay(draw, width, height, text, margins, font_path, below=None):
    """Overlays are centred, their top on the top safe margin, or under a watermark in a top corner (`below`, its
    box) so that the two never overlap."""
    left, top, right, _ = safe_box(width, height, margins)
    if below is not None:
        top = max(top, below[3] + max(2, round(0.01 * min(width, height))))
    size = max(8, round(OVERLAY_SIZE * min(width, height)))
    font = load_font(size, font_path)
    stroke = max(1, size // 12)
    wrapped = _wrap(draw, text, font, right - left)
    box = draw.multiline_textbbox((0, 0), wrapped, font=font, align="center", stroke_width=stroke)
    x = left + (right - left - (box[2] - box[0])) // 2 - box[0]
    y = top - box[1]
    bbox = draw.multiline_textbbox((x, y), wrapped, font=font, align="center", stroke_width=stroke)
    return wrapped, (x, y, font, stroke), bbox


def watermark_box(width: int, height: int, size: tuple[int, int], corner: str, margins=None) -> tuple[int, int, int, int]:
    left, top, right, bottom = safe_box(width, height, margins)
    w, h = size
    x = left if corner.endswith("left") else right - w
    y = top if corner.startswith("top") else bottom - h
    return x, y, x + w, y + h


def _watermark_image(watermark: str, width: int, height: int, font_path):
    """An RGBA image of the watermark: the image file scaled, or the text rendered."""
    from PIL import Image, ImageDraw

    path = Path(watermark)
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        mark = Image.open(path).convert("RGBA")
        w = max(1, round(WATERMARK_IMAGE_WIDTH * width))
        mark = mark.resize((w, max(1, round(mark.height * w / mark.width))), Image.LANCZOS)
    else:
        size = max(8, round(WATERMARK_SIZE * min(width, height)))
        font = load_font(size, font_path)
        stroke = max(1, size // 12)
        probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        box = probe.textbbox((0, 0), watermark, font=font, stroke_width=stroke)
        mark = Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), (0, 0, 0, 0))
        ImageDraw.Draw(mark).text((-box[0], -box[1]), watermark, font=font, fill=(255, 255, 255, 255),
                                  stroke_width=stroke, stroke_fill=(0, 0, 0, 255))
    alpha = mark.getchannel("A").point(lambda a: round(a * WATERMARK_OPACITY))
    mark.putalpha(alpha)
    return mark


def is_image(watermark: str) -> bool:
    return Path(watermark).suffix.lower() in IMAGE_SUFFIXES


def check_watermark(watermark: str | None) -> None:
    """A watermark is an image file (by its suffix), read now, or a text; never a folder."""
    if watermark is None:
        return
    if not str(watermark).strip():
        raise MlxVideoError("--watermark needs a text or an image file")
    path = Path(watermark)
    if path.is_dir():
        raise MlxVideoError(f"--watermark {watermark} is a folder; give an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                            "or a text")
    if not is_image(watermark):
        return
    if not path.is_file():
        raise MlxVideoError(f"--watermark {watermark}: no such image file (text watermarks have no image suffix)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise MlxVideoError(f"--watermark {watermark}: the image is empty")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise MlxVideoError(f"--watermark {watermark} cannot be read as an image ({e})") from None


def burn(frames: np.ndarray, fps: float, overlays=(), watermark: str | None = None, corner: str = "bottom-right",
         margins: dict | None = None, font: str | Path | None = None, in_place: bool = False,
         first_index: int = 0) -> np.ndarray:
    """Draw `overlays` (shown in their time windows) and `watermark` (always) on (T, H, W, 3) uint8 frames
    (on a copy unless `in_place`); frames[i] is frame first_index + i of the delivered video."""
    from PIL import Image, ImageDraw

    if not overlays and watermark is None:
        return frames
    t, height, width, _ = frames.shape
    mark = _watermark_image(watermark, width, height, font) if watermark is not None else None
    mark_box = watermark_box(width, height, mark.size, corner, margins) if mark is not None else None
    mark_at = mark_box[:2] if mark is not None else None
    below = mark_box if mark is not None and corner.startswith("top") else None
    out = frames if in_place else frames.copy()
    for i in range(t):
        shown = [o for o in overlays if o.shown_at((first_index + i) / fps)]
        if not shown and mark is None:
            continue
        image = Image.fromarray(out[i]).convert("RGBA")
        draw = ImageDraw.Draw(image)
        if shown:  # overlays shown at the same time stack as lines of one block
            text = "\n".join(o.text for o in shown)
            wrapped, (x, y, f, stroke), _ = _layout_overlay(draw, width, height, text, margins, font, below)
            draw.multiline_text((x, y), wrapped, font=f, fill=(255, 255, 255, 255), align="center",
                                stroke_width=stroke, stroke_fill=(0, 0, 0, 255))
        if mark is not None:
            image.alpha_composite(mark, dest=mark_at)
        out[i] = np.asarray(image.convert("RGB"))
    return out
