"""Load the conditioning image for image-to-video and fit it to the video's size.

Two steps, both on the CPU with Pillow and numpy (no torch, no MLX):

* `load_image(path)` reads a file into an (H, W, 3) uint8 RGB array. Call it before loading any model, so
  a bad path or a broken file fails in a second, not after minutes of loading weights.
* `fit_image(image, width, height, mode)` resizes that array to exactly (height, width) and returns float32
  in [-1, 1], the range the Wan VAE encoder takes.

Loading rules (`load_image`)
----------------------------
The references are diffusers' `load_image` (``ImageOps.exif_transpose`` then ``.convert("RGB")``) and the
official Wan `generate.py` (``Image.open(path).convert("RGB")``, no EXIF handling). We do what diffusers
does, except where `convert("RGB")` is wrong:

* EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo comes out the way it is shown.
* Alpha (RGBA, LA, PA, RGBa) is **dropped**, not composited onto a background: this is what
  ``convert("RGB")`` does, so the colour values of transparent pixels are kept as they are stored. An image
  whose transparent area holds junk colours should be flattened by the user first.
* Greyscale (L, 1-bit) is copied into the three channels. Palette images (P, PA) take their palette colours.
* 16-bit greyscale (modes I;16, I;16B, I;16L, and I, which is how older Pillow opens a 16-bit greyscale PNG)
  is scaled to 8 bits as ``round(v / 257)``, i.e. ``round(v * 255 / 65535)``. Pillow's own
  ``convert("RGB")`` **clips** instead (every value above 255 becomes white), which turns almost any real
  16-bit image into a white picture; we do not use it there. Values of mode I outside 0..65535 are clipped.
* 16-bit RGB and RGBA PNGs: Pillow opens them as 8-bit RGB / RGBA by keeping the high byte of each sample
  (``v >> 8``, i.e. ``floor(v / 256)``). We take that as it is: it is within one 8-bit level of
  ``round(v / 257)`` (it differs for about a quarter of all 16-bit values).
* CMYK (and YCbCr, LAB, HSV) use Pillow's ``convert("RGB")``. For CMYK this is the plain formula
  ``R = (255 - C) * (255 - K) / 255`` (likewise G from M, B from Y) with no colour management: embedded
  ICC profiles are ignored, as they are in the references. Pillow already undoes the inverted storage of
  Adobe CMYK JPEGs.
* 32-bit float images (mode F) are refused: their range is not defined.
* Animated or multi-page files (GIF, APNG, TIFF, MPO): the first frame is used.

Every failure (missing file, a directory, a file that is not an image, a truncated or corrupt image, an image
too large for Pillow's decompression-bomb limit) raises `MlxVideoError` naming the file and the reason. The
file is decoded completely inside `load_image`, so truncation is found there and not later.

Fitting rule (`fit_image`)
--------------------------
All modes resample with Pillow's LANCZOS filter (a=3, antialiased: the kernel is widened by the downscale
factor) on the 8-bit image, whose result is rounded back to uint8; the result is then mapped to
``2 * (v / 255) - 1`` in float32.

* ``mode="crop"`` (default): scale, keeping the aspect ratio, so the image covers the target, then cut the
  centre out. With source size (iw, ih) and target (width, height), in integer arithmetic:

      if width * ih > iw * height:   # target relatively wider: match widths
          sw, sh = width, ih * width // iw
      else:                          # match heights
          sw, sh = iw * height // ih, height
      resized = image.resize((sw, sh), LANCZOS)
      left, top = sw // 2 - width // 2, sh // 2 - height // 2
      result = resized[top:top + height, left:left + width]

  This is exactly diffusers' ``VaeImageProcessor.preprocess(..., resize_mode="crop")``
  (`_resize_and_crop`). The official TI2V-5B code (`textimage2video.py` `i2v`) does the same with
  ``round(iw * scale)`` instead of the floor and a crop offset of ``(sw - width) // 2``: for even targets
  the offsets agree and the scaled size can differ by one pixel.
  Only for absurd aspect ratios, where the covering image would exceed `_MAX_COVER_PIXELS` pixels, is the
  visible region resized directly from the source (Pillow's ``resize(box=...)``); that path is not
  bit-identical to the above (at most 2 levels of 255 in tests) but avoids allocating gigabytes.
* ``mode="stretch"``: resize straight to (width, height), ignoring the aspect ratio. This is what
  diffusers' ``WanImageToVideoPipeline`` actually does: it calls ``video_processor.preprocess(image,
  height=height, width=width)``, whose default ``resize_mode="default"`` is a plain
  ``image.resize((width, height), LANCZOS)``. The official A14B code (`image2video.py`) also stretches, but
  with ``torch.nn.functional.interpolate(mode="bicubic")`` on the [-1, 1] float tensor (no antialiasing,
  no rounding to 8 bits). The official A14B code picks the target size from the image's aspect ratio
  (``h = round(sqrt(max_area * ih / iw) // 8 // 2 * 2) * 8``: the ``//`` makes it a floor to a multiple of
  16, and likewise for w; Wan-Video/Wan2.2 wan/image2video.py) and diffusers' examples use a similar rule, so the stretch is then only
  a rounding of the aspect ratio, and "crop" and "stretch" give almost the same picture.
* ``mode="fit"``: scale so the whole image fits inside the target (same integer rule, matching the other
  side), centre it, and fill the bars with black (-1). Offsets are ``(width - sw) // 2``,
  ``(height - sh) // 2``.

We follow Pillow's LANCZOS (the diffusers path) rather than the official bicubic tensor interpolation:
it is what the diffusers reference we test against does, it is what the official TI2V-5B path does, and
without antialiasing a bicubic downscale of a large photo (4000 px onto 832 px) aliases. The difference to
the official A14B resize is a resampling difference, not a change in framing: on smooth content about 0.15
of a level on average and under 2 levels at most (of 255); on fine detail or noise, where the unfiltered
bicubic aliases, it is much larger. Note that diffusers also rounds the target size down to a multiple of
8 (`get_default_height_width`); `fit_image` uses the size it is given, so callers pass sizes that are
already multiples of 16.

* ``mode="short-side"``: the official Wan2.2-S2V fit (Wan-Video/Wan2.2 `wan/speech2video.py`, `generate`):
  torchvision's ``Resize(min(height, width))`` then ``CenterCrop((height, width))`` on the PIL image. For a PIL
  input, torchvision (0.17 and later) computes the size in `_compute_resized_output_size` and calls Pillow's
  ``Image.resize(size, BILINEAR)``, antialiased (the triangle filter is widened by the downscale factor), on the
  8-bit image. The shorter side becomes ``m = min(height, width)`` and the other ``int(m * long / short)`` (a
  float product truncated); an image already at that size is not resampled. ``CenterCrop`` then, per axis:
  where the resized side ``s`` is shorter than the target ``t``, pads ``(t - s) // 2`` before and
  ``(t - s + 1) // 2`` after with black (0); where it is longer, cuts from ``int(round((s - t) / 2))`` (Python's
  round, half to even: an odd surplus of 25 starts at 12). So unlike "crop", the image does not always cover
  the video: a portrait whose aspect is less elongated than the video's keeps black bars (a 3:4 photo of
  2048x1536 gives a 960x704 video, and the resize fills 938 of its 960 rows).

`fit_float_short_side` does the same fit on float data (the official S2V pose frames: their [-1, 1] values
are resized as torch tensors, `torch.nn.functional.interpolate(mode="bilinear", antialias=True)`, whose
weights are Pillow's, with no 8-bit rounding; the padding value is a parameter). It resamples with Pillow on
32-bit float images (mode "F"), which computes the same weights in double precision.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MlxVideoError

FIT_MODES = ("crop", "stretch", "fit", "short-side")

# Modes holding one 16-bit (or wider integer) grey channel, which `convert("RGB")` clips instead of scaling.
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Above this many pixels, "crop" resizes only the visible region of the source (see the module docstring).
_MAX_COVER_PIXELS = 1 << 25

_LANCZOS = Image.Resampling.LANCZOS
_BILINEAR = Image.Resampling.BILINEAR


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Alpha is dropped, greyscale and palette images become RGB, 16-bit greyscale is scaled (not clipped) to
    8 bits; see the module docstring for the exact rules. Raises `MlxVideoError` naming the file when it is
    missing, not a regular file, not an image, truncated or otherwise undecodable.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise MlxVideoError(f"conditioning image {path}: no such file")
    if not path.is_file():
        raise MlxVideoError(f"conditioning image {path}: not a regular file")
    try:
        with Image.open(path) as opened:
            # Decode everything now: a truncated or corrupt file fails here, not inside a later resize.
            opened.load()
            image = ImageOps.exif_transpose(opened)
            rgb = _to_rgb8(image, path)
    except MlxVideoError:
        raise
    except UnidentifiedImageError:
        raise MlxVideoError(f"conditioning image {path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise MlxVideoError(f"conditioning image {path}: too large to open safely ({error})") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow reports broken files through many exception types.
        reason = str(error) or type(error).__name__
        raise MlxVideoError(f"conditioning image {path}: could not be decoded ({reason})") from error
    return rgb


def _to_rgb8(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        rgb = np.asarray(image)
    elif mode in _SIXTEEN_BIT_GREY:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        # round(v / 257): no value of v lands exactly on .5, so (v + 128) // 257 is exact rounding.
        grey = ((values + 128) // 257).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode == "F":
        raise MlxVideoError(
            f"conditioning image {path}: 32-bit floating-point images are not supported; "
            "save it as an 8- or 16-bit PNG"
        )
    else:
        if mode in ("P", "PA"):
            # Through RGBA: the same colours as convert("RGB"), without Pillow's warning about palette
            # transparency; the alpha is then dropped like any other.
            image = image.convert("RGBA")
        try:
            rgb = np.asarray(image.convert("RGB"))
        except ValueError as error:
            raise MlxVideoError(
                f"conditioning image {path}: colour mode {mode} cannot be converted to RGB ({error})"
            ) from None
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise MlxVideoError(f"conditioning image {path}: decoded to an unusable shape {rgb.shape}")
    return rgb


def fit_image(image: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """Resize an (H, W, 3) uint8 RGB image to (height, width, 3) float32 in [-1, 1].

    `mode` is "crop" (keep the aspect ratio, cover the target, cut the centre; the default), "stretch"
    (ignore the aspect ratio; what diffusers' Wan I2V pipeline does), "fit" (keep the aspect ratio, fit
    inside, black bars) or "short-side" (the official Wan2.2-S2V fit: the shorter side to the target's shorter
    side with bilinear filtering, then a centre crop that pads with black where the image does not cover).
    Resampling is on 8-bit data: Pillow LANCZOS, BILINEAR for "short-side". The exact rule is in the module
    docstring; "crop" and "stretch" are bit-identical to diffusers' `VaeImageProcessor.preprocess` with
    `resize_mode="crop"` and `"default"`, "short-side" to torchvision's `Resize` and `CenterCrop` on a PIL image.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB")) if image.mode != "RGB" else np.asarray(image)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = (
            f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        )
        raise ValueError(f"fit_image expects an (H, W, 3) uint8 RGB array, got a {description}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"fit_image got an empty image of shape {image.shape}")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise MlxVideoError(f"target {name} must be a positive integer, got {value!r}")
    width, height = int(width), int(height)
    if mode not in FIT_MODES:
        raise MlxVideoError(f"image fit mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")

    source = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if mode == "stretch":
        fitted = source.resize((width, height), _LANCZOS)
    elif mode == "crop":
        fitted = _cover_and_crop(source, width, height)
    elif mode == "short-side":
        size = short_side_size(source.size[1], source.size[0], width, height)
        resized = source if size == source.size[::-1] else source.resize(size[::-1], _BILINEAR)
        fitted = center_crop(np.asarray(resized, dtype=np.uint8), width, height, 0)
    else:
        fitted = _fit_inside(source, width, height)

    pixels = np.asarray(fitted, dtype=np.uint8)
    # The same float32 operations as diffusers (x / 255, then 2x - 1), so the values are bit-identical.
    normalised = pixels.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.float32(2.0) * normalised - np.float32(1.0))


def _cover_and_crop(source: Image.Image, width: int, height: int) -> Image.Image:
    iw, ih = source.size
    if width * ih > iw * height:
        sw, sh = width, ih * width // iw
    else:
        sw, sh = iw * height // ih, height
    left, top = sw // 2 - width // 2, sh // 2 - height // 2
    if sw * sh > max(_MAX_COVER_PIXELS, 4 * width * height):
        box = (left * iw / sw, top * ih / sh, (left + width) * iw / sw, (top + height) * ih / sh)
        return source.resize((width, height), _LANCZOS, box=box)
    return source.resize((sw, sh), _LANCZOS).crop((left, top, left + width, top + height))


def _fit_inside(source: Image.Image, width: int, height: int) -> Image.Image:
    iw, ih = source.size
    if width * ih > iw * height:
        sw, sh = max(1, iw * height // ih), height
    else:
        sw, sh = width, max(1, ih * width // iw)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(source.resize((sw, sh), _LANCZOS), ((width - sw) // 2, (height - sh) // 2))
    return canvas


def short_side_size(image_height: int, image_width: int, width: int, height: int) -> tuple[int, int]:
    """The (height, width) torchvision's `Resize(min(height, width))` gives an image: its shorter side becomes
    min(height, width), the other side in proportion, truncated (see the module docstring)."""
    target = min(width, height)
    short, long = sorted((image_height, image_width))
    other = int(target * long / short)
    return (other, target) if image_width <= image_height else (target, other)


def center_crop(image: np.ndarray, width: int, height: int, fill) -> np.ndarray:
    """torchvision's `CenterCrop((height, width))` of an (H, W, C) array: per axis, a side shorter than the target
    is padded with `fill` ((t - s) // 2 before, the rest after), a longer one cut from int(round((s - t) / 2))."""
    out = np.full((height, width, image.shape[2]), fill, dtype=image.dtype)
    source, target = [], []
    for size, crop in ((image.shape[0], height), (image.shape[1], width)):
        if size < crop:
            start = (crop - size) // 2
            source.append(slice(0, size))
            target.append(slice(start, start + size))
        else:
            start = int(round((size - crop) / 2))
            source.append(slice(start, start + crop))
            target.append(slice(0, crop))
    out[target[0], target[1]] = image[source[0], source[1]]
    return out


def fit_float_short_side(image: np.ndarray, width: int, height: int, fill: float) -> np.ndarray:
    """The "short-side" fit of an (H, W, C) float image without 8-bit rounding: each channel resampled with
    Pillow's antialiased bilinear filter on a 32-bit float image (torch's `interpolate(mode="bilinear",
    antialias=True)` uses the same weights), then `center_crop` with `fill`. Returns float32."""
    image = np.asarray(image, dtype=np.float32)
    size = short_side_size(image.shape[0], image.shape[1], width, height)
    if size != image.shape[:2]:
        channels = [Image.fromarray(np.ascontiguousarray(image[:, :, c]), mode="F").resize(size[::-1], _BILINEAR)
                    for c in range(image.shape[2])]
        image = np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=2)
    return center_crop(image, width, height, np.float32(fill))
