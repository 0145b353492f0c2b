"""HunyuanVideo 1.5 super-resolution (480p -> 720p, 720p -> 1080p): a finished run's latents -> latents at the
higher resolution, by the latent upsampler and the step-distilled SR transformer on the shared loop.

As the official SR pipeline (Tencent-Hunyuan/HunyuanVideo-1.5, `hyvideo/pipelines/hunyuan_video_sr_pipeline.py`):
1. the low-resolution latents are resized bilinearly to the high-resolution latent grid and run through the
   upsampler (`upsampler.py`), in float32;
2. they are re-noised at strength 0.7: (1 - 0.7) x lq + 0.7 x noise (fresh noise, not the run's);
3. the transformer (98 input channels) sees [noisy latents (C), the base condition (C latents + 1 mask: zeros for
   T2V, the image's latents and a mask on frame 0 for I2V), the re-noised upsampled latents (C), a mask of ones];
4. from the first step whose timestep is below 1000 x 0.7 on, the last C + 1 channels are zeros (the model
   then refines without the low-resolution guide);
5. flow Euler on the shifted linear schedule (shift 2), 6 steps (720p) / 8 (1080p), guidance 1 (one pass).
The T2V run's SigLIP input is all zeros, which the transformer masks out: the same as no image tokens here.

An I2V run's condition is made again at the high resolution from the run's own image file (the official pipeline
passes its `reference_image` on to the SR stage): the image scaled to cover the SR size and centre-cut
(`reference_fit`), encoded by the VAE onto latent frame 0 beside the mask, and SigLIP's features of the image fitted
to the bucket nearest its aspect at the SR model's resolution (`reference_bucket`). The base model's folder encodes
them (an SR folder holds no VAE or image encoder): `encode_reference`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan15.pipeline import ConditionedForward, Hunyuan15Pipeline, meanflow_r
from mlx_video.families.hunyuan15.upsampler import UpsamplerConfig, build_upsampler, upsample_latents
from mlx_video.pipelines.base import GenerationResult, GenerationSettings, Predict
from mlx_video.pipelines.loop import get_guidance, guidance_none

NOISE_STRENGTH = 0.7  # the official SR pipeline's `noise_scale`


def bucket_sizes(base: int, stride: int = 16, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The release's resolution buckets: (width, height) in multiples of `stride` whose patch count is at most
    (base / stride)^2, from the widest to the tallest, aspect at most `max_ratio` (the official
    `hyvideo/utils/data_utils.py` `generate_crop_size_list`)."""
    patches = round((base / stride) ** 2)
    sizes, w, h = [], patches, 1
    while w > 0:
        if max(w, h) / min(w, h) <= max_ratio:
            sizes.append((w * stride, h * stride))
        if (h + 1) * w <= patches:
            h += 1
        else:
            w -= 1
    return sizes


def high_res_size(width: int, height: int, base: int) -> tuple[int, int]:
    """The SR output size of a (width, height) run: the bucket at `base` (960 for 720p, 1440 for 1080p) whose aspect
    is nearest, the first such on a tie (the official SR pipeline's `BucketMap`)."""
    sizes = bucket_sizes(base)
    aspects = np.array([w / h for w, h in sizes])
    return sizes[int(np.abs(aspects - width / height).argmin())]


def reference_bucket(width: int, height: int, base: int) -> tuple[int, int]:
    """(width, height) of the bucket at `base` an image of width x height is fitted to for SigLIP in the SR stage:
    the official `get_closest_resolution_given_reference_image` reads each bucket (w, h) as (h, w) and takes the
    first whose h / w, rounded to 5 places, is nearest the image's height / width."""
    sizes = bucket_sizes(base)
    ratios = np.array([round(a / b, 5) for a, b in sizes])
    a, b = sizes[int(np.abs(ratios - height / width).argmin())]
    return b, a


def reference_fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 image as the official pipelines fit a reference image, (height, width, 3) uint8: scaled
    by max(width / W, height / H) with Pillow's LANCZOS to the rounded size, then cut from round((size - target) / 2)
    (the official `resize_and_center_crop`; torchvision's Resize + CenterCrop on a PIL image, which the SR pipeline's
    `get_image_condition_latents` uses, cut the same way). Unchanged when already of that size."""
    from PIL import Image

    ih, iw = image.shape[:2]
    if (ih, iw) == (height, width):
        return image
    scale = max(width / iw, height / ih)
    rw, rh = int(round(iw * scale)), int(round(ih * scale))
    left, top = int(round((rw - width) / 2)), int(round((rh - height) / 2))
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((rw, rh), Image.LANCZOS)
    return np.asarray(resized.crop((left, top, left + width, top + height)))


def renoise_low_res(latents: mx.array, noise: mx.array, strength: float = NOISE_STRENGTH) -> mx.array:
    """(1 - strength) x latents + strength x noise (the official `add_noise_to_lq`)."""
    return (1 - strength) * latents + strength * noise


def sr_conditions(low_res: mx.array, base: mx.array | None) -> tuple[mx.array, mx.array]:
    """The SR transformer's condition channels (1, T, H, W, 2C + 2), channels-last: with the re-noised upsampled
    latents `low_res` (1, T, H, W, C) and a mask of ones after the base condition (zeros for T2V, else the I2V
    condition (1, T, H, W, C + 1)); and the same with those last C + 1 channels zero (the later steps')."""
    if base is None:
        base = mx.zeros((*low_res.shape[:-1], low_res.shape[-1] + 1), dtype=low_res.dtype)
    ones = mx.ones((*low_res.shape[:-1], 1), dtype=low_res.dtype)
    with_low_res = mx.concatenate([base.astype(low_res.dtype), low_res, ones], axis=-1)
    without = mx.concatenate([base.astype(low_res.dtype), mx.zeros_like(low_res), mx.zeros_like(ones)], axis=-1)
    return with_low_res, without


def uses_low_res(timesteps, i: int, strength: float = NOISE_STRENGTH) -> bool:
    """Whether step i still sees the low-resolution latents: every step before the first whose timestep is
    below 1000 x strength (the official loop switches once and keeps the switch)."""
    return all(float(t) >= 1000 * strength for t in list(timesteps)[: i + 1])


class Hunyuan15SRPipeline(Hunyuan15Pipeline):
    """An SR model folder: the SR transformer (`transformer/`) and its latent upsampler (`upsampler/`).
    `upscale` takes a finished run's latents; the settings' size is the high-resolution one."""

    def __init__(self, folder):
        super().__init__(folder)
        self._sr = None  # the current run's (condition with the low-res latents, condition without)
        self._context = None  # prompt states given to `upscale` (encoded by the base model's folder)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size this model upscales a width x height run to."""
        return high_res_size(width, height, self.transformer_config.target_size)

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """The family's estimate of the denoising stage (the SR transformer at the high resolution), the only stage
        this folder runs when another folder encodes the prompt and decodes (`mlxvid upscale`)."""
        full = super().estimate_memory(s, tiling, has_image)
        stages = {k: v for k, v in full["stages"].items() if k == "denoising" or self.folder.has("text_encoder")}
        peak = max(stages, key=stages.get)
        return {**full, "stages": stages, "peak_stage": peak, "peak_bytes": stages[peak]}

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """The shared checks (`--attention radial` is refused there: an SR model has no radial parameters), and no
        step cache: the condition switches mid-run (`uses_low_res`), which a cache reusing an earlier step's output
        does not see, and the 6 / 8 distilled steps leave it nothing to skip."""
        if settings.cache not in (None, "", "none", "off"):
            raise MlxVideoError(f"--cache {settings.cache}: {self.spec.id} is a step-distilled super-resolution model "
                                "whose condition changes mid-run; it runs without a step cache (leave out --cache)")
        return super().resolve(settings)

    def encode(self, s: GenerationSettings, progress: bool = False):
        return super().encode(s, progress) if self._context is None else self._context

    def load_upsampler(self):
        if not self.folder.has("upsampler"):
            raise MlxVideoError(f"{self.folder.path} has no latent upsampler (upsampler/): re-convert it from the "
                                "release layout, which holds upsampler/<variant>/ beside transformer/<variant>/")
        model = build_upsampler(UpsamplerConfig.from_dict(self.folder.config("upsampler")))
        self.folder.load_module("upsampler", model)
        return model

    def encode_reference(self, encoder, reference: np.ndarray, settings: GenerationSettings, progress: bool = False):
        """An I2V run's (condition, SigLIP features) at the high-resolution `settings`, from its (H, W, 3) uint8 image,
        encoded by `encoder` (the base model's pipeline, which holds the VAE and SigLIP); see the module docstring."""
        s = self.resolve(settings)
        pixels = reference_fit(reference, s.width, s.height).astype(np.float32) / np.float32(255.0)
        image = (pixels - np.float32(0.5)) / np.float32(0.5)  # torchvision's ToTensor + Normalize([0.5], [0.5])
        w, h = reference_bucket(reference.shape[1], reference.shape[0], self.transformer_config.target_size)
        return encoder.encode_image(image, s, progress, siglip_image=reference_fit(reference, w, h))

    def low_res_condition(self, s: GenerationSettings, low_res: np.ndarray, noise: mx.array | None):
        """Upsample and re-noise the (1, C, T, h, w) latents onto the settings' grid; (with, without)."""
        _, c, frames, height, width = self.latent_shape(s)
        if low_res.ndim != 5 or low_res.shape[:3] != (1, c, frames):
            raise MlxVideoError(f"the low-resolution latents have shape {tuple(low_res.shape)}; {s.frames} frames "
                                f"need (1, {c}, {frames}, height, width)")
        upsampled = upsample_latents(self.load_upsampler(), mx.array(low_res).transpose(0, 2, 3, 4, 1), height, width)
        if noise is None:
            noise = mx.random.normal(upsampled.shape, key=mx.random.split(mx.random.key(s.seed))[1])
        base = None if self._image is None else self._image[0]
        return sr_conditions(renoise_low_res(upsampled, noise), base)

    def upscale(self, settings: GenerationSettings, low_res: np.ndarray, init_latents=None, low_res_noise=None,
                progress: bool = False, image_states=None, hooks=(), context=None) -> GenerationResult:
        """The SR run: `low_res` (1, C, T, h, w) -> (1, C, T, H, W) at the settings' size. `context`: the prompt
        states (as `encode` gives them), when another folder encodes them (else this folder's encoders).
        `image_states`: an I2V run's (condition, SigLIP features) at this size (`encode_reference`).
        `low_res_noise` (1, T, H, W, C), for tests: the re-noising's draw (else seeded from the settings' seed)."""
        s = self.resolve(settings)
        self._image = image_states
        self._context = context
        try:
            self._sr = self.low_res_condition(s, np.asarray(low_res, dtype=np.float32), low_res_noise)
            return super(Hunyuan15Pipeline, self).generate(settings, init_latents, progress, None, hooks)
        finally:
            self._sr, self._image, self._context = None, None, None

    def generate(self, settings, init_latents=None, progress=False, image=None, hooks=()):
        raise MlxVideoError(f"{self.spec.id} is a super-resolution model: it upscales a finished run's latents "
                            "(Hunyuan15SRPipeline.upscale), it does not generate from a prompt alone")

    def make_predict(self, s: GenerationSettings, model, context, step_cache=None, sampler=None) -> Predict:
        """One pass per step (or guided), the condition switching once the timestep drops below 700."""
        if self._sr is None or sampler is None:
            raise MlxVideoError("the SR transformer runs inside `upscale` (it needs the low-resolution latents)")
        if step_cache is not None and step_cache.name is not None:  # `resolve` refuses --cache; the loop's counter only
            raise MlxVideoError(f"{self.spec.id} runs without a step cache, not {step_cache.name}")
        with_low_res, without = self._sr
        cond = tuple(a[:1] for a in context)
        uncond = tuple(a[1:] for a in context) if self.uses_cfg(s) else None
        guide = get_guidance(s.guidance_mode) if uncond is not None else guidance_none
        forward = ConditionedForward(model, with_low_res, None if self._image is None else self._image[1])
        meanflow = self.transformer_config.use_meanflow

        def predict(latents: mx.array, i: int, t) -> mx.array:
            forward.condition = with_low_res if uses_low_res(sampler.timesteps, i) else without
            forward.timestep_r = meanflow_r(sampler.timesteps, i) if meanflow else None
            return guide(forward, latents, mx.array([float(t)], dtype=mx.float32), cond, uncond, float(s.guidance))

        return predict
