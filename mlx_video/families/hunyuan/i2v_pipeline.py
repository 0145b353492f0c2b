"""HunyuanVideo-I2V (1.0) generation, as diffusers' `HunyuanVideoImageToVideoPipeline` runs it: the T2V pipeline
(`pipeline.py`) with the image in three places.

- Text: the LLaVA encoder reads the prompt with the image (`mlx_video.text_encoders.llava`): every 4th (token
  replace) or 2nd (latent concat) of its 576 image tokens, then the prompt's tokens. With true CFG the negative
  prompt is read with a black image and every 2nd image token, whichever the transformer (diffusers does so).
- Latents: the image's VAE latents (the latent mean x the scaling factor) start the run blended into the noise,
  0.999 x noise + 0.001 x image on every frame (`--init-latents` is the noise before the blend).
- Transformer: "token_replace" sees the image's latents as latent frame 0 at every step (its tokens modulated as
  at timestep 0, see transformer.py) and the final latents keep them there; "latent_concat" sees the image's
  latents on frame 0 (zeros elsewhere) and a mask that is 1 on frame 0 beside the noise (33 channels).

`--guidance` is the embedded guidance scale as for T2V (the token-replace model embeds it; the latent-concat one
has no guidance embedding and is run with `--true-cfg` and a negative prompt).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan.pipeline import HunyuanPipeline
from mlx_video.pipelines.base import GenerationSettings, release
from mlx_video.pipelines.cache import ContextArgs
from mlx_video.text_encoders.llava import I2V_TEMPLATE, I2V_TEMPLATE_CROP_START

NOISE_KEEP = 0.999  # diffusers: latents * 0.999 + image_latents * (1 - 0.999) before the first step
NEGATIVE_INTERLEAVE = 2  # diffusers encodes the negative prompt with its default image_embed_interleave


class ImageForward(ContextArgs):
    """The transformer's input with the image in it: frame 0 replaced (token replace) or the image's latents and
    mask beside the noise (latent concat); `model(x, t, *context, guidance=...)` otherwise."""

    def __init__(self, model, image_latents: mx.array, condition: str, **fixed):
        super().__init__(model, **fixed)
        self.image_latents, self.condition = image_latents, condition

    def inputs(self, x: mx.array) -> mx.array:
        batch = x.shape[0]
        image = mx.broadcast_to(self.image_latents, (batch, *self.image_latents.shape[1:])).astype(x.dtype)
        if self.condition == "token_replace":
            return mx.concatenate([image, x[:, 1:]], axis=1)
        rest = mx.zeros((batch, x.shape[1] - 1, *x.shape[2:]), dtype=x.dtype)
        mask = mx.concatenate([mx.ones((batch, 1, *x.shape[2:4], 1)), mx.zeros((batch, x.shape[1] - 1, *x.shape[2:4], 1))],
                              axis=1).astype(x.dtype)
        return mx.concatenate([x, mx.concatenate([image, rest], axis=1), mask], axis=-1)

    def __call__(self, x: mx.array, t: mx.array, context) -> mx.array:
        return super().__call__(self.inputs(x), t, context)

    def embed(self, x: mx.array, t: mx.array, context):
        return super().embed(self.inputs(x), t, context)


def pad_tokens(states: mx.array, mask: mx.array, length: int) -> tuple[mx.array, mx.array]:
    """Text states and mask padded on the right (masked) to `length` tokens."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    b, _, d = states.shape
    return (mx.concatenate([states, mx.zeros((b, extra, d), dtype=states.dtype)], axis=1),
            mx.concatenate([mask, mx.zeros((b, extra), dtype=mask.dtype)], axis=1))


class HunyuanI2VPipeline(HunyuanPipeline):
    prompt_template = I2V_TEMPLATE

    def __init__(self, folder):
        super().__init__(folder)
        self.crop_start = int(self.spec.default("template_crop", I2V_TEMPLATE_CROP_START))
        self.condition = self.transformer_config.image_condition
        if self.condition is None:
            raise MlxVideoError(f"{folder.path}: the transformer has no image condition; it is not an I2V model")
        self._image = None  # the current run's (uint8 RGB image, image latents (1, 1, h, w, C)), set by generate

    @property
    def image_mode(self) -> str | None:
        return "first_frame"

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.out_channels

    @property
    def interleave(self) -> int:
        """Which image tokens the prompt keeps (diffusers' image_embed_interleave for the transformer)."""
        return 4 if self.condition == "token_replace" else 2

    def encoder_image_tokens(self) -> int:
        """LLaVA's image features, which take the place of the template's <image> token (its folder's tower)."""
        from mlx_video.families.hunyuan.cost_model import LLAVA_IMAGE_TOKENS
        from mlx_video.text_encoders.llava import LlavaImageConfig

        if not self.folder.has("image_encoder"):
            return LLAVA_IMAGE_TOKENS
        return LlavaImageConfig.from_dict(self.folder.config("image_encoder")).image_tokens

    def component_bytes(self, component: str) -> int:
        """The preflight's text-encoding stage holds LLaVA's vision tower and projector beside the Llama."""
        stored = super().component_bytes(component)
        return stored + super().component_bytes("image_encoder") if component == "text_encoder" else stored

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """The T2V checks (with the image template); a run without a size takes the published size nearest the
        image's aspect."""
        s = GenerationSettings.from_dict(settings.to_dict())
        if s.width is None and s.height is None and s.image is not None and Path(s.image).is_file():
            from mlx_video.io.image import load_image

            h, w = load_image(s.image).shape[:2]
            s.width, s.height = min(self.spec.sizes, key=lambda size: abs(np.log(size[0] / size[1] * h / w)))
        return super().resolve(s)

    # ---- the stages ----

    def encode(self, s: GenerationSettings, progress: bool = False):
        """(states, mask, pooled) of the prompt read with the image (and of the negative prompt with a black image,
        both padded to one length, when true CFG runs)."""
        if self._image is None:
            raise MlxVideoError(f"{self.spec.id} animates an image: pass --image PATH")
        rgb = self._image[0]
        runs = [([s.prompt], rgb, self.interleave)]
        if self.uses_true_cfg(s):
            runs.append(([s.negative_prompt], np.zeros_like(rgb), NEGATIVE_INTERLEAVE))
        states, masks = self.encode_llava(runs, progress)
        length = max(a.shape[1] for a in states)
        padded = [pad_tokens(a, m, length) for a, m in zip(states, masks)]
        pooled = self.encode_pooled([p for prompts, _, _ in runs for p in prompts])
        return mx.concatenate([a for a, _ in padded]), mx.concatenate([m for _, m in padded]), pooled

    def encode_llava(self, runs, progress: bool = False) -> tuple[list, list]:
        from mlx_video.text_encoders.llama import LlamaTextEncoder
        from mlx_video.text_encoders.llava import LlavaImageConfig, LlavaImageEncoder, encode_prompts_with_image

        if not self.folder.has("image_encoder"):
            raise MlxVideoError(f"{self.folder.path} has no image_encoder/ (LLaVA's vision tower); re-convert it")
        with tqdm(total=len(runs), desc="text encoding", disable=not progress, leave=False) as bar:
            llama = LlamaTextEncoder(self.folder.config("text_encoder"))
            self.folder.load_module("text_encoder", llama)
            vision = LlavaImageEncoder(LlavaImageConfig.from_dict(self.folder.config("image_encoder")))
            self.folder.load_module("image_encoder", vision)
            states, masks = [], []
            for prompts, image, interleave in runs:
                a, m = encode_prompts_with_image(llama, vision, self.tokenizer, prompts, image, interleave,
                                                 self.crop_start, self.text_len)
                mx.eval(a, m)
                states.append(a)
                masks.append(m)
                bar.update()
            del llama, vision
            release()
        return states, masks

    def encode_image(self, image: np.ndarray, s: GenerationSettings) -> tuple[np.ndarray, mx.array]:
        """(the image as uint8 RGB, its latents (1, 1, h, w, C) float32) from the (height, width, 3) image in
        [-1, 1] fitted to the video size: the VAE's latent mean x the scaling factor (diffusers' "argmax"). The
        VAE encodes in 256-pixel tiles (its default, diffusers' `enable_tiling()`), where diffusers' pipeline
        encodes in one pass by default: the same within one tile, blended tiles beyond."""
        from mlx_video.families.hunyuan.config import HunyuanVAEConfig
        from mlx_video.families.hunyuan.vae import HunyuanVAE

        if image.shape != (s.height, s.width, 3):
            raise MlxVideoError(f"the conditioning image is {image.shape}, expected ({s.height}, {s.width}, 3)")
        vae = HunyuanVAE(HunyuanVAEConfig.from_dict(self.folder.config("vae")), dtype=mx.float32)
        self.folder.load_module("vae", vae)
        latents = vae.encode(mx.array(image, dtype=mx.float32)[None, None])
        mx.eval(latents)
        del vae
        release()
        rgb = np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return rgb, latents

    def generate(self, settings: GenerationSettings, init_latents=None, progress: bool = False, image=None, hooks=()):
        """The shared generate around the image: encoded first; the final latents keep it on frame 0 (token
        replace)."""
        self._image = None
        s = self.resolve(settings)
        self.check_image_use(image is not None)
        self._image = self.encode_image(image, s)
        try:
            result = super().generate(settings, init_latents, progress, image, hooks)
        finally:
            image_latents, self._image = self._image[1], None
        if self.condition == "token_replace":
            result.latents[:, :, :1] = np.array(image_latents.transpose(0, 4, 1, 2, 3))
        return result

    def initial_latents(self, s: GenerationSettings, init_latents: np.ndarray | None) -> mx.array:
        """The noise blended with the image's latents on every frame (channels-last, float32)."""
        noise = super().initial_latents(s, init_latents)
        keep = mx.array(NOISE_KEEP, dtype=mx.float32)
        return noise * keep + self._image[1] * (1 - keep)

    def forward_args(self, model, guidance: mx.array | None) -> ImageForward:
        return ImageForward(model, self._image[1], self.condition, guidance=guidance)
