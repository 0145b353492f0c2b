"""VACE's conditioning, as arrays: the reference images on their canvas, the mask's channels, and the latents
the context branch reads. Written from the published description (diffusers 0.42.1
`pipelines/wan/pipeline_wan_vace.py`, the same as Wan-Video/Wan2.1 wan/vace.py):

- the video (a control video, or the clip to inpaint; mid grey, 0, where nothing is given) is split by the
  binarized mask into what is kept (`video x (1 - mask)`) and what is regenerated (`video x mask`); each is
  encoded by the VAE, giving 2 x z channels per latent frame;
- the mask itself becomes stride_h x stride_w channels per latent pixel (each latent pixel's block of pixels,
  row by row), resampled in time to the latent frames with nearest-exact; its values are not binarized;
- each reference image, fitted on a white canvas of the video size, is one more latent frame in front of the
  video's (its latents, then z zero channels; all-zero mask channels), the last one given first.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError


def bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) float32 resized as torch's `interpolate(mode="bilinear", align_corners=False)` (no antialias):
    each output pixel samples the input at (i + 0.5) x in / out - 0.5, clamped to the edges."""

    def taps(size_in: int, size_out: int):
        src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * np.float32(size_in / size_out) - np.float32(0.5)
        src = np.maximum(src, np.float32(0.0))
        low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, (src - low).astype(np.float32)[:, None]

    y0, y1, wy = taps(image.shape[0], height)
    x0, x1, wx = taps(image.shape[1], width)
    rows = image[y0] * (1 - wy)[:, :, None] + image[y1] * wy[:, :, None]
    return (rows[:, x0] * (1 - wx)[None] + rows[:, x1] * wx[None]).astype(np.float32)


def reference_canvas(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 reference image as VACE takes it: cut to a multiple of 8 pixels (Pillow LANCZOS, as
    diffusers' image processor), scaled to fit inside width x height (bilinear), centred on a white canvas;
    (height, width, 3) float32 in [-1, 1]."""
    from mlx_video.io.image import fit_image

    h8, w8 = image.shape[0] - image.shape[0] % 8, image.shape[1] - image.shape[1] % 8
    if h8 == 0 or w8 == 0:
        raise MlxVideoError(f"a reference image of {image.shape[1]}x{image.shape[0]} is smaller than 8x8 pixels")
    pixels = fit_image(image, w8, h8, mode="stretch")  # exact when already a multiple of 8
    scale = min(height / h8, width / w8)
    new_h, new_w = int(h8 * scale), int(w8 * scale)
    canvas = np.ones((height, width, 3), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = bilinear_resize(pixels, new_h, new_w)
    return canvas


def mask_channels(mask: np.ndarray, latent_frames: int, stride_h: int, stride_w: int) -> np.ndarray:
    """(F, H, W) mask in [0, 1] -> (latent_frames, H / sh, W / sw, sh x sw): each latent pixel's block of mask
    pixels as channels (row-major within the block), frames picked with nearest-exact."""
    frames, height, width = mask.shape
    h, w = height // stride_h, width // stride_w
    blocks = mask[:, :h * stride_h, :w * stride_w].reshape(frames, h, stride_h, w, stride_w)
    blocks = blocks.transpose(0, 1, 3, 2, 4).reshape(frames, h, w, stride_h * stride_w)
    picks = np.minimum(np.floor((np.arange(latent_frames) + 0.5) * (frames / latent_frames)).astype(np.int64),
                       frames - 1)
    return blocks[picks]


def conditioning_latents(encode, video: np.ndarray, mask: np.ndarray, references: list[np.ndarray],
                         vae_stride: tuple[int, int, int]) -> mx.array:
    """The context branch's input (1, R + T, h, w, 2z + sh x sw), channels-last. `encode`: (1, F, H, W, 3) [-1, 1]
    -> (1, T, h, w, z) normalised latents (the VAE's mode). `video` (F, H, W, 3) in [-1, 1], `mask` (F, H, W) in
    [0, 1], `references` the canvases (`reference_canvas`), the first given first."""
    st, sh, sw = vae_stride
    keep = (mask > 0.5).astype(np.float32)[..., None]
    inactive = encode(mx.array(video * (1.0 - keep))[None])
    reactive = encode(mx.array(video * keep)[None])
    latents = mx.concatenate([inactive, reactive], axis=-1)
    masks = mx.array(mask_channels(mask.astype(np.float32), latents.shape[1], sh, sw))[None]
    for reference in references:  # each in front of the last: the last reference ends up first
        ref = encode(mx.array(reference)[None, None])
        latents = mx.concatenate([mx.concatenate([ref, mx.zeros_like(ref)], axis=-1), latents], axis=1)
        masks = mx.concatenate([mx.zeros_like(masks[:, :1]), masks], axis=1)
    return mx.concatenate([latents, masks.astype(latents.dtype)], axis=-1)


def extended(video: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Extension: the given (G, H, W, 3) frames followed by mid grey (0) up to `frames`, and the mask that keeps
    the given frames (0) and generates the rest (1)."""
    given = video.shape[0]
    pad = np.zeros((frames - given, *video.shape[1:]), dtype=np.float32)
    mask = np.concatenate([np.zeros((given, *video.shape[1:3]), np.float32),
                           np.ones((frames - given, *video.shape[1:3]), np.float32)])
    return np.concatenate([video.astype(np.float32), pad]), mask


def parse_outpaint(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """`LEFT,TOP,RIGHT,BOTTOM` pixels of new content around the video; the video keeps the rest of the frame."""
    parts = str(text).split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise MlxVideoError(f"--outpaint takes LEFT,TOP,RIGHT,BOTTOM: four whole numbers of pixels >= 0, not {text!r}")
    left, top, right, bottom = values
    if left + right >= width or top + bottom >= height:
        raise MlxVideoError(f"--outpaint {text} leaves no room for the video in the {width}x{height} frame")
    return values


def outpainted(frames: np.ndarray, box: tuple[int, int, int, int], width: int, height: int,
               fit_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Outpainting: the (F, H, W, 3) uint8 frames fitted into the frame less `box` (LEFT, TOP, RIGHT, BOTTOM),
    mid grey (0) around them, and the mask that generates the border (1) and keeps the video (0)."""
    from mlx_video.io.source_video import fit_frames_to

    left, top, right, bottom = box
    inner = fit_frames_to(frames, width - left - right, height - top - bottom, fit_mode)
    video = np.zeros((frames.shape[0], height, width, 3), dtype=np.float32)
    video[:, top:height - bottom, left:width - right] = inner
    mask = np.ones(video.shape[:3], dtype=np.float32)
    mask[:, top:height - bottom, left:width - right] = 0.0
    return video, mask
