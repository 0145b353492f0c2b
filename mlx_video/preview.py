"""Live previews while denoising: a cheap, approximate picture of the clean sample the run is heading to.

Every `every` steps the hook estimates the clean latents from the last two iterates of the flow-matching
loop (x0 = x - sigma * v, with v taken as the step's finite difference: exact for a first-order Euler step,
an approximation for multistep samplers), projects the latent channels to RGB with a small linear map and
writes a PNG strip of a few frames beside the output (`NAME.preview.png`, replaced atomically each time).

The projection is approximate by design. It is, in this order: the pipeline's own `latent_rgb_factors`
((C, 3) weights to RGB in [0, 1], optionally with `latent_rgb_bias` (3,)), e.g. fitted once by least squares
(`fit_latent_rgb`) from latents and their decoded frames; the family's published factors for its latent
channel count, in the family's `latent_rgb` module (`Family.latent_rgb`, `FACTORS = {channels: (weights, bias)}`, RGB in
[-1, 1]); else the three principal components of the latents' channels (structure and motion are right,
colours are not).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PREVIEW_FRAMES = 4  # latent frames shown side by side
PREVIEW_HEIGHT = 128  # pixels


def preview_path(output: Path) -> Path:
    output = Path(output)
    from .io.video import is_video_file

    return output.with_name((output.stem if is_video_file(output) else output.name) + ".preview.png")


def fit_latent_rgb(latents: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (C, 3) weights and (3,) bias mapping latent channels to RGB in [0, 1]. `latents`: (T, h, w, C)
    channels-last; `frames`: (T', H, W, 3) uint8, the VAE's decoding of them (averaged down to the latent grid,
    the first decoded frame and then one per temporal stride)."""
    t, h, w, c = latents.shape
    stride = max(1, (frames.shape[0] - 1) // max(1, t - 1)) if t > 1 else 1
    picked = frames[::stride][:t].astype(np.float64) / 255.0
    _, fh, fw, _ = picked.shape
    small = picked.reshape(t, h, fh // h, w, fw // w, 3).mean(axis=(2, 4))
    x = np.concatenate([latents.reshape(-1, c), np.ones((t * h * w, 1))], axis=1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(x, small.reshape(-1, 3), rcond=None)
    return solution[:c].astype(np.float32), solution[c].astype(np.float32)


def latent_to_rgb(latents: np.ndarray, factors: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """(T, h, w, C) latents -> (T, h, w, 3) uint8, with `factors` or by principal components."""
    t, h, w, c = latents.shape
    flat = latents.reshape(-1, c).astype(np.float64)
    if factors is not None:
        rgb = flat @ np.asarray(factors, np.float64) + (0 if bias is None else np.asarray(bias, np.float64))
    else:
        centred = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 4096)], full_matrices=False)
        rgb = centred @ vt[:3].T
        if rgb.shape[1] < 3:
            rgb = np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1])))
        lo, hi = np.percentile(rgb, 2, axis=0), np.percentile(rgb, 98, axis=0)
        rgb = (rgb - lo) / np.maximum(hi - lo, 1e-6)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(t, h, w, 3)


def preview_strip(rgb: np.ndarray) -> np.ndarray:
    """A few evenly spaced frames side by side, scaled to PREVIEW_HEIGHT."""
    from PIL import Image

    t = rgb.shape[0]
    picks = sorted({round(i * (t - 1) / max(1, PREVIEW_FRAMES - 1)) for i in range(min(t, PREVIEW_FRAMES))})
    strip = np.concatenate([rgb[i] for i in picks], axis=1)
    scale = PREVIEW_HEIGHT / strip.shape[0]
    image = Image.fromarray(strip).resize((max(1, round(strip.shape[1] * scale)), PREVIEW_HEIGHT), Image.NEAREST)
    return np.asarray(image)


class PreviewHook:
    """A step hook `(i, t, latents)` writing a preview every `every` steps (and after the last)."""

    def __init__(self, path: Path, every: int, sigmas, initial, factors=None, bias=None, echo=None):
        self.path, self.every, self.sigmas = Path(path), int(every), np.asarray(sigmas, np.float64)
        self.previous = initial  # the iterate before step i (channels-last, any array type)
        self.factors, self.bias, self.echo = factors, bias, echo
        self.written = 0

    def __call__(self, i: int, t, latents) -> None:
        previous, self.previous = self.previous, latents
        last = i + 1 >= len(self.sigmas) - 1
        if self.every is None or ((i + 1) % self.every and not last):
            return
        try:
            x = np.asarray(latents, np.float32)[0]
            s0, s1 = self.sigmas[i], self.sigmas[min(i + 1, len(self.sigmas) - 1)]
            before = np.asarray(previous, np.float32)[0] if previous is not None else None
            if s1 > 0 and s0 != s1 and before is not None and before.shape == x.shape:
                x = x - s1 * (x - before) / (s1 - s0)
            if x.ndim != 4:
                raise ValueError(f"latents of shape {x.shape} are not (frames, height, width, channels)")
            self.write(preview_strip(latent_to_rgb(x, self.factors, self.bias)))
        except Exception as e:  # a preview must never stop a run
            self.every = None
            if self.echo is not None:
                self.echo(f"preview: stopped ({e})")
            return
        if self.echo is not None and self.written == 1:
            self.echo(f"preview: {self.path} (updated every {self.every} steps; approximate colours)")

    def write(self, pixels: np.ndarray) -> None:
        from PIL import Image

        tmp = self.path.with_name(f".{self.path.name}.part.png")
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, self.path)
        self.written += 1


def published_factors(family: str, channels: int):
    """(weights, bias) to RGB in [0, 1] from the family's `latent_rgb` module, or (None, None)."""
    from .families import FAMILIES, optional_table

    module = optional_table(family, "latent_rgb") if family in FAMILIES else None
    found = getattr(module, "FACTORS", {}).get(channels)
    if found is None:
        return None, None
    weights, bias = found
    return np.asarray(weights, np.float32) / 2, (np.asarray(bias, np.float32) + 1) / 2


def projection_for(pipe):
    factors = getattr(pipe, "latent_rgb_factors", None)
    if factors is not None:
        return factors, getattr(pipe, "latent_rgb_bias", None)
    try:
        channels = pipe.latent_channels
    except Exception:  # a pipeline that cannot say: principal components
        return None, None
    return published_factors(pipe.spec.family, channels)


def make_preview_hook(pipe, settings, init_latents, output: Path, every: int, echo=None) -> PreviewHook:
    """The hook for a run of `pipe` with resolved `settings` (built from the same sampler and starting latents)."""
    if every < 1:
        from .errors import MlxVideoError

        raise MlxVideoError(f"--preview-every must be at least 1, got {every}")
    sampler = pipe.make_sampler(settings)
    try:
        initial = np.asarray(pipe.initial_latents(settings, init_latents))
    except Exception:  # a family whose loop starts otherwise: the first preview shows the raw iterate
        initial = None
    factors, bias = projection_for(pipe)
    return PreviewHook(preview_path(output), every, sampler.sigmas, initial, factors, bias, echo)
