"""Conditioning-image loading (every colour mode we claim) and fitting (against diffusers' preprocessing)."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlx_video.errors import MlxVideoError
from mlx_video.io.image import fit_image, load_image

RNG_SEED = 1234


def _random_rgb(height, width, seed=RNG_SEED):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth_rgb(height, width, seed=RNG_SEED):
    """A picture with gradients and hard edges, so resampling differences show up."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / max(width, 1) * 7.0 + y / max(height, 1) * 3.0)
    g = 255.0 * (x + y) / (width + height)
    b = np.where((x // 7 + y // 5) % 2 == 0, 230.0, 20.0)
    noise = np.random.default_rng(seed).normal(0.0, 6.0, (height, width, 3))
    return np.clip(np.stack([r, g, b], axis=-1) + noise, 0, 255).round().astype(np.uint8)


def _png_16bit(array: np.ndarray, colour_type: int) -> bytes:
    """A minimal PNG writer for 16-bit samples (Pillow cannot write 16-bit RGB)."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- loading


def test_rgb_png_is_exact(tmp_path):
    pixels = _random_rgb(9, 13)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (9, 13, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)


def test_rgb_jpeg_matches_decoder(tmp_path):
    y, x = np.mgrid[0:24, 0:32]
    pixels = np.stack([x * 8, y * 10, 255 - x * 4], axis=-1).astype(np.uint8)
    path = tmp_path / "rgb.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    out = load_image(str(path))
    with Image.open(path) as reference:
        np.testing.assert_array_equal(out, np.asarray(reference.convert("RGB")))
    assert np.abs(out.astype(int) - pixels.astype(int)).max() < 16


def test_rgba_drops_alpha(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (7, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its stored colour
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    np.testing.assert_array_equal(load_image(path), rgba[:, :, :3])


def test_greyscale_l(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = tmp_path / "l.png"
    Image.fromarray(grey, "L").save(path)
    np.testing.assert_array_equal(load_image(path), np.repeat(grey[:, :, None], 3, axis=2))


def test_greyscale_la_drops_alpha(tmp_path):
    la = np.random.default_rng(2).integers(0, 256, (5, 7, 2), dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    np.testing.assert_array_equal(load_image(path), np.repeat(la[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette(tmp_path, transparency):
    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = np.random.default_rng(4).integers(0, 256, (6, 9), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    path = tmp_path / "p.png"
    if transparency is None:
        image.save(path)
    else:
        image.save(path, transparency=transparency)
    with Image.open(path) as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(load_image(path), palette[indices])


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 385, 386, 387], [1000, 32767, 32768, 65406, 65407, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
        clipped = np.asarray(check.convert("RGB"))[:, :, 0]
    expected = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(expected, [[0, 0, 1, 1, 2, 2], [4, 127, 128, 254, 255, 255]])
    out = load_image(path)
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    # What we avoid: Pillow's own conversion saturates everything above 255.
    assert clipped[1, 0] == 255 and out[1, 0, 0] == 4


def test_16bit_rgb_png_keeps_high_byte(tmp_path):
    samples = np.random.default_rng(5).integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_16bit(samples, colour_type=2))
    out = load_image(path)
    np.testing.assert_array_equal(out, (samples >> 8).astype(np.uint8))
    # Documented bound: within one level of round(v / 257).
    assert np.abs(np.round(samples / 257.0) - out).max() <= 1


def test_16bit_rgba_png(tmp_path):
    samples = np.random.default_rng(6).integers(0, 65536, (3, 5, 4)).astype(np.uint16)
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png_16bit(samples, colour_type=6))
    np.testing.assert_array_equal(load_image(path), (samples[:, :, :3] >> 8).astype(np.uint8))


# EXIF orientation -> how the stored pixels must be turned for display (EXIF 2.3, tag 0x0112).
_ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(_ORIENTATIONS))
def test_exif_orientation_applied(tmp_path, orientation):
    stored = np.zeros((16, 24, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)  # a red block in the stored top-left corner, nothing else symmetric
    stored[8:, 16:] = (0, 0, 255)
    path = tmp_path / f"orient{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        decoded = np.asarray(raw.convert("RGB"))
    out = load_image(path)
    np.testing.assert_array_equal(out, _ORIENTATIONS[orientation](decoded))
    assert out.flags.c_contiguous
    if orientation in (6, 8):
        assert out.shape == (24, 16, 3)
    if orientation == 6:  # rotate 90 degrees clockwise: the stored top-left lands top-right
        assert out[2, -3, 0] > 200 and out[2, 2, 0] < 50


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:8, :8] = (0, 255, 255, 0)  # red
    cmyk[:8, 8:] = (255, 0, 255, 0)  # green
    cmyk[8:, :8] = (0, 0, 0, 128)  # grey
    cmyk[8:, 8:] = (50, 100, 0, 30)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_image(path)
    expected = {(4, 4): (255, 0, 0), (4, 12): (0, 255, 0), (12, 4): (127, 127, 127), (12, 12): (181, 137, 225)}
    for (row, col), colour in expected.items():
        assert np.abs(out[row, col].astype(int) - colour).max() <= 8, (row, col, out[row, col])


def test_float_image_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), "F").save(path)
    with pytest.raises(MlxVideoError, match="float.tif.*floating-point"):
        load_image(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(MlxVideoError, match=re.escape(str(path)) + ".*no such file"):
        load_image(path)


def test_directory(tmp_path):
    with pytest.raises(MlxVideoError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a picture\n", b""], ids=["text", "empty"])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(MlxVideoError, match=r"notes\.png.*not an image"):
        load_image(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated(tmp_path, suffix):
    whole = tmp_path / f"whole.{suffix}"
    Image.fromarray(_random_rgb(64, 64)).save(whole)
    data = whole.read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxVideoError, match=rf"cut\.{suffix}.*(truncated|decoded)"):
        load_image(path)


# ---------------------------------------------------------------- fitting


def test_fit_output_contract():
    out = fit_image(_random_rgb(30, 50), 32, 16)
    assert out.dtype == np.float32 and out.shape == (16, 32, 3) and out.flags.c_contiguous
    assert out.min() >= -1.0 and out.max() <= 1.0
    grey = fit_image(np.full((8, 8, 3), 255, np.uint8), 16, 16)
    np.testing.assert_array_equal(grey, 1.0)
    np.testing.assert_array_equal(fit_image(np.zeros((8, 8, 3), np.uint8), 16, 16), -1.0)


def test_fit_rejects_bad_arguments():
    image = _random_rgb(8, 8)
    with pytest.raises(ValueError):
        fit_image(image.astype(np.float32), 16, 16)
    with pytest.raises(ValueError):
        fit_image(image[:, :, 0], 16, 16)
    with pytest.raises(MlxVideoError):
        fit_image(image, 0, 16)
    with pytest.raises(MlxVideoError):
        fit_image(image, 16, 16, mode="zoom")


def test_same_size_crop_is_identity():
    pixels = _random_rgb(16, 32)
    np.testing.assert_array_equal(fit_image(pixels, 32, 16), pixels.astype(np.float32) / 255 * 2 - 1)


def test_crop_keeps_the_centre():
    # A wide image onto a square target: only the middle columns survive, unscaled.
    pixels = _random_rgb(16, 48)
    np.testing.assert_array_equal(fit_image(pixels, 16, 16), pixels[:, 16:32].astype(np.float32) / 255 * 2 - 1)


def test_fit_mode_letterboxes():
    out = fit_image(np.full((20, 40, 3), 200, np.uint8), 40, 40, mode="fit")
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[:10], -1.0)
    np.testing.assert_array_equal(out[30:], -1.0)
    np.testing.assert_allclose(out[10:30], 200 / 255 * 2 - 1, atol=1e-6)


def test_extreme_aspect_ratio_crop_stays_small(monkeypatch):
    import mlx_video.io.image as image_module

    pixels = _smooth_rgb(20, 300)
    reference = fit_image(pixels, 32, 48)
    monkeypatch.setattr(image_module, "_MAX_COVER_PIXELS", 0)  # force the direct-box path
    direct = fit_image(pixels, 32, 48)
    assert np.abs(direct - reference).max() <= 2 * 2 / 255 + 1e-6


# Sources: landscape, portrait, square, and odd sizes; targets: landscape and portrait (multiples of 16).
_SOURCES = [(120, 200), (75, 131), (200, 112), (161, 90), (128, 128), (37, 37), (18, 30)]
_TARGETS = [(96, 64), (64, 96)]


@pytest.fixture(scope="module")
def video_processor():
    pytest.importorskip("torch")
    video_processor_module = pytest.importorskip("diffusers.video_processor")
    # The Wan I2V pipeline builds it as VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial), i.e. 8.
    return video_processor_module.VideoProcessor(vae_scale_factor=8)


def _diffusers(processor, pixels, width, height, resize_mode):
    tensor = processor.preprocess(Image.fromarray(pixels), height=height, width=width, resize_mode=resize_mode)
    assert tuple(tensor.shape) == (1, 3, height, width)
    return tensor[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("target", _TARGETS, ids=lambda t: f"to{t[0]}x{t[1]}")
@pytest.mark.parametrize("source", _SOURCES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_crop_matches_diffusers(video_processor, source, target):
    pixels = _smooth_rgb(*source)
    width, height = target
    ours = fit_image(pixels, width, height, mode="crop")
    theirs = _diffusers(video_processor, pixels, width, height, "crop")
    # Documented bound: bit-identical (same Pillow LANCZOS call, same integer crop, same float32 maths).
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("target", _TARGETS, ids=lambda t: f"to{t[0]}x{t[1]}")
@pytest.mark.parametrize("source", _SOURCES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_stretch_matches_wan_pipeline_preprocess(video_processor, source, target):
    # WanImageToVideoPipeline calls video_processor.preprocess(image, height=height, width=width): the
    # default resize_mode, which is a plain (aspect-ignoring) LANCZOS resize.
    pixels = _smooth_rgb(*source)
    width, height = target
    ours = fit_image(pixels, width, height, mode="stretch")
    tensor = video_processor.preprocess(Image.fromarray(pixels), height=height, width=width)
    np.testing.assert_array_equal(ours, tensor[0].permute(1, 2, 0).numpy())


def test_crop_equals_stretch_when_aspect_matches(video_processor):
    pixels = _smooth_rgb(90, 135)  # 3:2, like 96x64
    np.testing.assert_array_equal(fit_image(pixels, 96, 64, mode="crop"), fit_image(pixels, 96, 64, mode="stretch"))
