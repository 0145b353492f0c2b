"""The Wan2.2-S2V portrait and pose-frame fit (`fit_image(mode="short-side")`, `fit_float_short_side`) against
torchvision's `Resize(min(H, W))` and `CenterCrop((H, W))` as the official `wan/speech2video.py` calls them: on a PIL
image for the portrait, on a [-1, 1] float tensor for the pose frames. The official outputs were recorded by
`tests/fixtures/s2v/make_portrait_reference.py` (torchvision is not a test dependency: see that file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from mlx_video.io.image import fit_float_short_side, fit_image, load_image

FIXTURE = Path(__file__).parent / "fixtures" / "s2v" / "portrait_reference.safetensors"


@pytest.fixture(scope="module")
def recorded():
    with safe_open(str(FIXTURE), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def levels(fitted: np.ndarray) -> np.ndarray:
    """[-1, 1] floats back to the 8-bit levels they came from."""
    return np.round((fitted.astype(np.float64) + 1.0) * 127.5).astype(np.int32)


def test_portrait_files_are_fitted_as_torchvision_fits_them(recorded, tmp_path):
    """Downscales (antialiased), upscales, black padding, cropping with a half-way offset, both at once: from the
    file, every level equal to the official one; the LANCZOS cover-and-crop used before differs visibly."""
    tensors, meta = recorded
    cases = json.loads(meta["cases"])["fit_cases"]
    for n, (_, (height, width)) in enumerate(cases):
        path = tmp_path / f"portrait{n}.png"
        Image.fromarray(tensors[f"fit.{n}.image"]).save(path)
        official = tensors[f"fit.{n}.official"].astype(np.int32)
        ours = levels(fit_image(load_image(path), width, height, mode="short-side"))
        before = levels(fit_image(load_image(path), width, height, mode="crop"))
        diff, old = np.abs(ours - official), np.abs(before - official)
        print(f"{tensors[f'fit.{n}.image'].shape[:2]} -> {(height, width)}: max {diff.max()} mean {diff.mean():.3f} "
              f"levels (cover-and-crop LANCZOS: max {old.max()} mean {old.mean():.2f})")
        assert ours.shape == official.shape == (height, width, 3)
        assert diff.max() <= 1, (n, diff.max())
        assert old.max() > 20  # the comparison tells the two fits apart


def test_black_bars_where_the_portrait_does_not_cover():
    """A 100x60 portrait onto 128x64: resized to 106x64, so 11 black rows above and 11 below (no recorded data)."""
    image = np.full((100, 60, 3), 200, np.uint8)
    ours = levels(fit_image(image, 64, 128, mode="short-side"))
    assert (ours[:11] == 0).all() and (ours[-11:] == 0).all() and (ours[11:-11] == 200).all()


def test_pose_frames_are_fitted_as_torchvision_fits_tensors(recorded):
    """The official pose frames: [-1, 1] floats resized as a tensor (bilinear, antialiased: a 150x200 frame down
    to 64x85) and padded with 0 to 64x128. torch resamples with float32 weights and sums, up to 5e-6 from the
    float64 result; ours (Pillow, float64 weights and sums) is within 1e-7 of it."""
    tensors, meta = recorded
    block = int(meta["pose_block"])
    source = np.repeat(np.repeat(tensors["pose_blocks"], block, axis=1), block, axis=2)
    every = round(int(meta["pose_fps"]) / 16)  # the official reader's interval at the 16 fps of S2V
    sampled = source[::every]
    official = tensors["crop.pose_fitted"]  # sampled frames 0 and the last the chain uses
    height, width = official.shape[1:3]
    for frame, expected in zip((sampled[0], sampled[-1]), official):
        pixels = frame.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
        ours = fit_float_short_side(pixels, width, height, fill=0.0)
        err = float(np.abs(ours - expected).max())
        print(f"pose frame {frame.shape[:2]} -> {(height, width)}: max abs error {err:.2e}")
        assert err < 1e-5, err
        assert (ours[:, :21] == 0).all() and (ours[:, -22:] == 0).all()  # 43 columns of padding: 21 before, 22 after
