"""HunyuanVideo 1.5 generation: prompt -> Qwen2.5-VL states (+ ByT5 states of the quoted text) -> the shared
denoising loop over the transformer -> the 32-channel VAE.

As diffusers' `HunyuanVideo15Pipeline` / `HunyuanVideo15ImageToVideoPipeline` (0.42.1):
- the transformer sees [noisy latents, condition latents, mask] (65 channels): zeros for T2V; for I2V the image's
  latents on latent frame 0 (zeros elsewhere) and a mask that is 1 on frame 0, and the image's SigLIP features;
- `--guidance` is the classifier-free scale (6 by default; 1 for the distilled models: one pass per step); the
  unconditional pass encodes the negative prompt ("" by default); batched or sequential (`--guidance-mode`);
- flow Euler on linspace(1, 0) shifted by `--shift`, the model seeing σ·1000;
- the step-distilled model (MeanFlow) also sees the next step's timestep (0 at the last step).

The conditioning (`encode`) is a tuple of arrays with a leading batch axis (row 0 the prompt, row 1 the
negative prompt when guided): Qwen states and mask, ByT5 states and mask (zeros and an empty mask for a prompt
without quoted text, as the reference).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan15.config import Hunyuan15Config, radial_defaults
from mlx_video.pipelines.base import (
    DecodeTiling,
    GenerationSettings,
    Pipeline,
    Predict,
    available_memory_bytes,
    release,
)
from mlx_video.pipelines.loop import get_guidance, guidance_none


class ConditionedForward:
    """`model(x, t, context)` for the loop's guidance and the step caches, with what does not change between the
    two guidance passes: the condition latents and mask beside x, the image's features, and MeanFlow's
    timestep_r (set per step)."""

    def __init__(self, model, condition: mx.array | None, image: mx.array | None):
        self.model, self.condition, self.image, self.timestep_r = model, condition, image, None

    def inputs(self, x: mx.array):
        batch = x.shape[0]
        condition = self.condition
        if condition is None:  # T2V: zero condition latents and mask
            condition = mx.zeros((*x.shape[:-1], x.shape[-1] + 1), dtype=x.dtype)
        condition = mx.broadcast_to(condition, (batch, *condition.shape[1:]))
        image = None if self.image is None else mx.broadcast_to(self.image, (batch, *self.image.shape[1:]))
        r = None if self.timestep_r is None else mx.full((batch,), self.timestep_r, dtype=mx.float32)
        return mx.concatenate([x, condition.astype(x.dtype)], axis=-1), image, r

    def __call__(self, x: mx.array, t: mx.array, context) -> mx.array:
        return self.model.unembed(self.model.run_blocks(self.embed(x, t, context)))

    def embed(self, x: mx.array, t: mx.array, context):
        x, image, r = self.inputs(x)
        text, text_mask, glyph, glyph_mask = context
        return self.model.embed(x, t, text, text_mask, glyph, glyph_mask, image, r)

    def run_blocks(self, state, start: int = 0, stop: int | None = None):
        return self.model.run_blocks(state, start, stop)

    def unembed(self, state) -> mx.array:
        return self.model.unembed(state)


def meanflow_r(timesteps, i: int) -> float:
    """MeanFlow's timestep_r at step i: the next step's timestep, 0 at the last (as the reference pipelines)."""
    return float(timesteps[i + 1]) if i + 1 < len(timesteps) else 0.0


def image_condition(image_latents: mx.array, latent_frames: int) -> mx.array:
    """The I2V condition beside the noise, channels-last (1, T, h, w, C + 1): the image's latents (1, 1, h, w, C)
    on latent frame 0 and zeros after, then a mask channel that is 1 on frame 0."""
    _, _, h, w, c = image_latents.shape
    latents = mx.concatenate([image_latents, mx.zeros((1, latent_frames - 1, h, w, c))], axis=1)
    mask = (mx.arange(latent_frames) == 0).astype(mx.float32).reshape(1, latent_frames, 1, 1, 1)
    return mx.concatenate([latents, mx.broadcast_to(mask, (1, latent_frames, h, w, 1))], axis=-1)


def resolution_buckets(base: int, stride: int = 16, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The (height, width) buckets of a resolution base, in the reference's order (diffusers'
    `HunyuanVideo15ImageProcessor`): n = (base / stride)^2 patches; for each width-in-patches p from n down, the
    heights q from the largest that fitted p + 1 up to n // p (q x p <= n), aspect at most `max_ratio`."""
    n = round((base / stride) ** 2)
    buckets = []
    for p in range(n, 0, -1):
        for q in range(max(1, n // (p + 1)), n // p + 1):
            if max(p, q) / min(p, q) <= max_ratio:
                buckets.append((p * stride, q * stride))
    return buckets


def bucket_for(height: int, width: int, base: int, stride: int = 16) -> tuple[int, int]:
    """(height, width) of the bucket nearest the aspect height / width, never on the other side of square (the
    reference's rule: a portrait image takes a bucket at least as tall, a landscape one at least as wide)."""
    aspect = height / width
    best = None
    for h, w in resolution_buckets(base, stride):
        diff = round(h / w, 5) - aspect
        if (diff <= 0) if aspect >= 1 else (diff >= 0):
            if best is None or abs(diff) < best[0]:
                best = (abs(diff), (h, w))
    return best[1]


def refiner_slices(cfg: Hunyuan15Config) -> dict[str, tuple[int, ...]]:
    """Our fused layers that diffusers splits, with the slices' sizes along the output axis: the token refiner's
    q | k | v (the double-stream blocks keep separate q, k, v in every naming)."""
    dim = cfg.hidden_size
    return {f"txt_in.blocks.{i}.self_attn_qkv": (dim, dim, dim) for i in range(cfg.num_refiner_blocks)}


class Hunyuan15Pipeline(Pipeline):
    def __init__(self, folder):
        super().__init__(folder)
        self.transformer_config = Hunyuan15Config.from_dict(folder.config("transformer"))
        self._image = None  # the current I2V run's (condition, SigLIP features), set by generate

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.out_channels

    @property
    def radial_defaults(self):
        """`--attention radial`'s parameters for this model (`config.radial_defaults`)."""
        return radial_defaults(self.spec)

    @property
    def image_mode(self) -> str | None:
        return "channels" if self.spec.task == "i2v" else None

    def uses_cfg(self, s: GenerationSettings) -> bool:
        # diffusers' ClassifierFreeGuidance skips the unconditional pass at a scale of 1
        return not np.isclose(float(s.guidance), 1.0)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        pt, ph, pw = self.transformer_config.patch_size
        return latent_shape[1] // pt, (latent_shape[2] // ph) * (latent_shape[3] // pw)

    # ---- the stages ----

    def encode(self, s: GenerationSettings, progress: bool = False):
        """(text, text_mask, glyph, glyph_mask) of the prompt (and the negative prompt when guided)."""
        prompts = [s.prompt, s.negative_prompt] if self.uses_cfg(s) else [s.prompt]
        return self.encode_prompts(prompts, progress)

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """The shared checks, and the prompts' lengths against the 1000 Qwen tokens (before any weights load). An
        I2V run without a size takes the resolution bucket nearest its image's aspect."""
        s = GenerationSettings.from_dict(settings.to_dict())
        if s.width is None and s.height is None and s.image is not None and Path(s.image).is_file():
            from mlx_video.io.image import load_image

            h, w = load_image(s.image).shape[:2]  # the image's aspect picks the bucket, as the reference does
            s.height, s.width = bucket_for(h, w, self.transformer_config.target_size, self.spec.size_multiple)
        s = super().resolve(s)
        if self.folder.has("text_encoder"):
            from mlx_video.text_encoders.qwen25vl import CROP_START, TEXT_TOKENS, chat_text, qwen_tokenizer

            tokenizer = qwen_tokenizer(self.folder.path / "tokenizer")
            prompts = [("prompt", s.prompt)] + ([("negative prompt", s.negative_prompt)] if self.uses_cfg(s) else [])
            for what, text in prompts:
                n = len(tokenizer.encode(chat_text(text))) - CROP_START
                if n > TEXT_TOKENS:
                    raise MlxVideoError(f"the {what} is {n} tokens long with the template's closing tokens, more than "
                                        f"the {TEXT_TOKENS} the text encoder takes; shorten it")
        return s

    def encode_prompts(self, prompts: list[str], progress: bool = False):
        """(Qwen states (B, 1000, 3584), mask, ByT5 states (B, 256, 1472), mask): the converted encoders as
        diffusers runs them (`mlx_video.text_encoders.qwen25vl`, `.byt5`)."""

        from mlx_video.text_encoders.byt5 import GLYPH_TOKENS, ByT5Tokenizer, encode_glyphs, glyph_text
        from mlx_video.text_encoders.qwen25vl import Qwen25VLTextEncoder, encode_prompts, qwen_tokenizer
        from mlx_video.text_encoders.t5 import T5Config, T5Encoder

        if not self.folder.has("text_encoder"):
            raise MlxVideoError(f"{self.folder.path} has no text encoder (text_encoder/, Qwen2.5-VL): re-convert it "
                                "from a folder that has one")
        qwen = Qwen25VLTextEncoder(self.folder.config("text_encoder"))
        self.folder.load_module("text_encoder", qwen)
        text, text_mask = encode_prompts(qwen, qwen_tokenizer(self.folder.path / "tokenizer"), prompts)
        mx.eval(text, text_mask)
        del qwen
        release()
        if not any(glyph_text(p) is not None for p in prompts):  # what encode_glyphs gives without quotes
            glyph = mx.zeros((len(prompts), GLYPH_TOKENS, self.transformer_config.glyph_dim))
            return text, text_mask, glyph, mx.zeros((len(prompts), GLYPH_TOKENS), dtype=mx.int32)
        if not self.folder.has("text_encoder_2"):
            raise MlxVideoError(f"the prompt quotes text, which the ByT5 glyph encoder encodes, and "
                                f"{self.folder.path} has none (text_encoder_2/)")
        byt5 = T5Encoder(T5Config.from_dict(self.folder.config("text_encoder_2")))
        self.folder.load_module("text_encoder_2", byt5)
        glyph, glyph_mask = encode_glyphs(byt5, ByT5Tokenizer.from_folder(self.folder.path / "tokenizer_2"), prompts)
        mx.eval(glyph, glyph_mask)
        return text, text_mask, glyph, glyph_mask

    def encode_image(self, image: np.ndarray, s: GenerationSettings, progress: bool = False,
                     siglip_image: np.ndarray | None = None):
        """(condition (1, T, h, w, C + 1), SigLIP features (1, 729, 1152)) of the (height, width, 3) image in
        [-1, 1], already fitted to the video size: the VAE's latent mean of the image (x the scaling factor, as
        diffusers' `retrieve_latents(..., "argmax")`; in 256-pixel tiles beyond one tile, where diffusers' default
        encodes in one pass) on latent frame 0 with the mask channel, and SigLIP's states of the same pixels (as
        8-bit RGB, which they are: `mlx_video.io.image.fit_image` makes them from one), or of `siglip_image`
        (uint8 RGB of any size) where given (the super-resolution stage fits the image twice: `sr.py`)."""
        from mlx_video.families.hunyuan15.vae import Hunyuan15VAE, Hunyuan15VAEConfig, VAETiling
        from mlx_video.image_encoders.siglip import SiglipPreprocess, SiglipVisionConfig, SiglipVisionEncoder
        from mlx_video.image_encoders.siglip import encode_image as siglip_states

        for needed, what in (("vae", "VAE (vae/)"), ("image_encoder", "SigLIP image encoder (image_encoder/)")):
            if not self.folder.has(needed):
                raise MlxVideoError(f"{self.folder.path} has no {what}, which an image-to-video run needs")
        if image.shape != (s.height, s.width, 3):
            raise MlxVideoError(f"the conditioning image is {image.shape}, expected ({s.height}, {s.width}, 3)")
        vae = Hunyuan15VAE(Hunyuan15VAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        # in 256-pixel tiles (diffusers' enable_tiling()): an image within one tile is encoded as in one pass, as
        # the reference pipeline does it; a larger one would need tens of GB of convolution buffers untiled
        latents = vae.encode(mx.array(image, dtype=mx.float32)[None, None], tiling=VAETiling())
        mx.eval(latents)
        del vae
        siglip = SiglipVisionEncoder(SiglipVisionConfig.from_dict(self.folder.config("image_encoder")))
        self.folder.load_module("image_encoder", siglip)
        settings = self.folder.path / "feature_extractor" / "preprocessor_config.json"
        preprocess = SiglipPreprocess.from_file(settings) if settings.is_file() else SiglipPreprocess()
        rgb = siglip_image if siglip_image is not None else \
            np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        features = siglip_states(siglip, rgb, preprocess)
        mx.eval(features)
        del siglip
        release()
        latent_frames = self.spec.latent_grid(s.width, s.height, s.frames)[0]
        return image_condition(latents, latent_frames), features

    def generate(self, settings: GenerationSettings, init_latents=None, progress: bool = False, image=None, hooks=()):
        """The shared generate; an I2V run encodes its image first (the condition latents and SigLIP features)."""
        self._image = None
        if image is not None:
            s = self.resolve(settings)
            self.check_image_use(True)
            self._image = self.encode_image(image, s, progress)
        try:
            return super().generate(settings, init_latents, progress, image, hooks)
        finally:
            self._image = None

    def load_transformer(self):
        from mlx_video.families.hunyuan15.transformer import Hunyuan15Transformer

        model = Hunyuan15Transformer(self.transformer_config, dtype=self.dtype)
        self.folder.load_module("transformer", model)
        self.fuse_run_loras(model, "transformer")
        return model

    # ---- LoRAs (Pipeline.resolve_loras): the converter's tables; diffusers' refiner q/k/v onto our fused layer ----

    def lora_keymaps(self) -> list:
        from mlx_video.families.hunyuan15.keys import COMFY_LORA, DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER

        return [DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER, COMFY_LORA]

    def lora_model(self, component: str):
        from mlx_video.families.hunyuan15.transformer import Hunyuan15Transformer

        return Hunyuan15Transformer(self.transformer_config)

    def lora_parts(self, component: str) -> dict[str, tuple[int, ...]]:
        return refiner_slices(self.transformer_config)

    def lora_splits(self) -> list[tuple[str, tuple[str, ...]]]:
        from mlx_video.families.hunyuan15.keys import LORA_SPLITS

        return LORA_SPLITS

    def make_predict(self, s: GenerationSettings, model, context, step_cache=None, sampler=None) -> Predict:
        """`predict(latents, i, t)`: one pass, or the conditional and unconditional ones combined as
        uncond + guidance x (cond - uncond); the MeanFlow model also gets the next timestep."""
        cond = tuple(a[:1] for a in context)
        uncond = tuple(a[1:] for a in context) if self.uses_cfg(s) else None
        guide = get_guidance(s.guidance_mode) if uncond is not None else guidance_none
        condition, features = self._image if self._image is not None else (None, None)
        forward = ConditionedForward(model, condition, features)
        meanflow = self.transformer_config.use_meanflow
        if meanflow and sampler is None:
            raise MlxVideoError("the step-distilled (MeanFlow) model needs the sampler's timesteps")
        call = forward if step_cache is None else partial(step_cache, forward)

        def predict(latents: mx.array, i: int, t) -> mx.array:
            if step_cache is not None:
                step_cache.begin_step(i, model)
            forward.timestep_r = meanflow_r(sampler.timesteps, i) if meanflow else None
            return guide(call, latents, mx.array([float(t)], dtype=mx.float32), cond, uncond, float(s.guidance))

        return predict

    # ---- memory preflight ----

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes of each stage (`mlx_video/families/hunyuan15/cost_model.py` on this folder's
        configuration and stored bytes). Estimates, not measurements."""
        from mlx_video.families.hunyuan15 import cost_model as cost

        name = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[self.dtype]
        from mlx_video.families.hunyuan15.vae import Hunyuan15VAEConfig

        stored = {"transformer_expert": self.component_bytes("transformer"),
                  "text_encoder": self.component_bytes("text_encoder"), "vae": self.component_bytes("vae")}
        vae_config, tile = None, "tiled"
        if self.can_decode:
            vae_config = Hunyuan15VAEConfig.from_dict(self.folder.config("vae"))
            _, _, _, h, w = self.latent_shape(s)
            tile = self.vae_tile(tiling, (h, w), s.frames).plan
        estimate = cost.estimate_peak_memory(
            self.spec, s.width, s.height, s.frames, name,
            guidance=self.uses_cfg(s) and s.guidance_mode == "batched", fused_attention=mx.metal.is_available(),
            transformer=self.transformer_config, stored=stored, vae_config=vae_config, vae_tiling=tile,
            image_encoding=has_image and self.can_decode, attention=self.attention_estimate(s))
        stages = {k: v["total"] for k, v in estimate.stages.items()}
        if not self.can_decode:
            stages.pop("decoding")
        peak = max(stages, key=stages.get)
        return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak], "detail": estimate.stages}

    # ---- decoding ----

    def vae_tile(self, mode: str, latent_hw: tuple[int, int], frames: int | None = None) -> DecodeTiling:
        """The VAE's tiling (`plan`: a `mlx_video.families.hunyuan15.vae.VAETiling`): `off` decodes the whole
        frame two latent frames at a time (the same numbers as one pass), `on` also in overlapping 256-pixel
        tiles (diffusers' `enable_tiling()`), `auto` tiles when the untiled decode's estimate
        (`vae.decode_memory_bytes`) is more than half the memory available now."""
        from mlx_video.families.hunyuan15.vae import Hunyuan15VAEConfig, VAETiling, decode_memory_bytes

        if mode not in ("auto", "on", "off"):
            raise MlxVideoError(f"--vae-tiling takes auto, on or off, not {mode!r}")
        chunked, tiled = VAETiling(spatial=False), VAETiling()
        if mode != "auto" or not self.can_decode:
            plan = tiled if mode == "on" else chunked
        else:
            cfg = Hunyuan15VAEConfig.from_dict(self.folder.config("vae"))
            h, w = latent_hw
            s = cfg.spatial_compression
            untiled = decode_memory_bytes(w * s, h * s, frames or self.spec.frames, cfg, chunked)["total"]
            available = available_memory_bytes()
            plan = tiled if available is not None and untiled > available // 2 else chunked
        return DecodeTiling(spatial=plan.spatial, temporal=True, plan=plan)

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, 32, T, h, w) latents -> (frames, height, width, 3) uint8 video, and decoding statistics."""
        from tqdm.auto import tqdm

        from mlx_video.families.hunyuan15.vae import Hunyuan15VAE, Hunyuan15VAEConfig

        if not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no vae/ component; re-convert it from a folder with vae/")
        z = mx.array(latents).transpose(0, 2, 3, 4, 1)
        frames = (z.shape[1] - 1) * self.spec.frame_stride + 1
        tile = self.vae_tile(tiling, (z.shape[2], z.shape[3]), frames).plan
        vae = Hunyuan15VAE(Hunyuan15VAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        mx.reset_peak_memory()
        with tqdm(total=1, desc="decoding", disable=not progress) as bar:
            video = vae.decode(z, tiling=tile)[0]
            pixels = np.array(mx.clip(mx.round((video + 1.0) * 127.5), 0, 255).astype(mx.uint8))
            bar.update()
        stats = {"vae_peak_memory_bytes": int(mx.get_peak_memory()),
                 "vae_tile": {"spatial": tile.spatial, "temporal": True}}
        del vae
        release()
        return pixels, stats
