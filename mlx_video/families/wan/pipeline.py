"""Wan 2.2 generation: prompt -> UMT5 -> the shared denoising loop over the transformer(s) -> Wan VAE.

One pipeline serves every Wan 2.2 variant: the model's spec and the converted folder say whether there are
two experts (A14B) and where the boundary between them lies, and how an image conditions the model.
"""

from __future__ import annotations

import time
import weakref

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.wan.config import RADIAL_DEFAULTS, WanTransformerConfig
from mlx_video.text_encoders.prompt import clean_prompt
from mlx_video.text_encoders.tokenizer import T5Tokenizer
from mlx_video.pipelines.base import DecodeTiling, GenerationResult, GenerationSettings, Pipeline, Predict, available_memory_bytes, reference_layout, release
from mlx_video.distributed import check_same_model, current_split, guidance_cfg_parallel
from mlx_video.pipelines.attention_mode import prepare_model
from mlx_video.pipelines.loop import get_guidance

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"
IMAGE_ENCODER = "image_encoder"

# Kept as names of the Python API (the settings and result are the shared ones).
WanSettings = GenerationSettings


class WanPipeline(Pipeline):
    radial_defaults = RADIAL_DEFAULTS
    def __init__(self, folder):
        super().__init__(folder)
        self.transformer_config = transformer_config(folder.config(HIGH_NOISE))
        # Wan2.1 I2V / FLF2V: the CLIP tokens of the image (and the last image) beside the text, set per run
        self.image_context = hasattr(self.transformer_config, "image_positions")
        self._image_tokens = None
        self.two_experts = folder.has(LOW_NOISE)
        self.uses_guidance_2 = self.two_experts
        self.boundary = self.spec.default("boundary")
        if self.two_experts and self.boundary is None:
            self.default("boundary")  # raises, naming the missing default
        self.vae_stride = self.spec.vae_stride
        self.text_len = self.spec.default("text_len", 512)
        self.tokenizer = T5Tokenizer.from_folder(folder.path / "tokenizer")
        self._split = None  # set per run when launched on several processes (mlx_video.distributed)

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.out_channels

    @property
    def size_multiple(self) -> int:
        return self.spec.size_multiple

    @property
    def image_mode(self) -> str | None:
        """How the model takes an image: "channels" (I2V-A14B: mask and image latent beside the noise), "first_frame"
        (TI2V-5B: the first latent frame replaced by the image's), or None (text only)."""
        if self.spec.task == "i2v":
            return "channels"
        if self.spec.task == "ti2v" and self.spec.default("per_frame_timesteps"):
            return "first_frame"  # the image's latent frame held at timestep 0 needs one timestep per frame
        return None

    @classmethod
    def capable(cls, spec, need: str) -> bool:
        if need == "takes_last_image":  # the mask-and-image channels can hold an image at either end
            # (not Wan2.1 I2V-14B: its image context is trained on the first image alone)
            return spec.task == "i2v" and _image_positions(spec.transformer) != "none"
        if need == "takes_video":  # a video's latents in place of noise: the models whose input is the noise alone
            return spec.task in ("t2v", "ti2v")
        return super().capable(spec, need)

    @property
    def takes_last_image(self) -> bool:
        return self.capable(self.spec, "takes_last_image")

    @property
    def takes_video(self) -> bool:
        return self.capable(self.spec, "takes_video")

    def check_image_use(self, has_image: bool) -> None:
        if has_image and self.image_mode is None:
            raise MlxVideoError(f"{self.spec.id} is a text-to-video model: it takes no --image (try wan2.2-i2v-a14b or wan2.2-ti2v-5b)")
        super().check_image_use(has_image)

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        s = super().resolve(settings)
        self.check_image_context(s)
        if s.last_image is not None and s.frames < 1 + self.vae_stride[0]:
            raise MlxVideoError(f"--last-image needs a first and a last latent frame: at least {1 + self.vae_stride[0]} "
                                f"--frames, got {s.frames}")
        own = s.negative_prompt == self.spec.default("negative_prompt")  # the model's own: cut to fit, as officially
        for what, text in [("prompt", s.prompt)] + ([] if own else [("negative prompt", s.negative_prompt)]):
            # one position more than the encoder takes: if it is used, the prompt (with EOS) would be cut
            _, mask = self.tokenizer([clean_prompt(text)], max_length=self.text_len + 1)
            if mask[0, -1]:
                raise MlxVideoError(f"the {what} is longer than the {self.text_len - 1} tokens (plus the closing one) "
                                    f"the text encoder of {self.spec.id} takes; shorten it")
        return s

    def check_image_context(self, s: GenerationSettings) -> None:
        """Wan2.1 I2V / FLF2V: the CLIP image encoder is there, and FLF2V has its last image."""
        if not self.image_context:
            return
        if not self.folder.has(IMAGE_ENCODER):
            raise MlxVideoError(f"{self.folder.path} has no {IMAGE_ENCODER}/ (the CLIP image encoder {self.spec.id} "
                                "needs); re-convert it from a folder with it")
        if self.transformer_config.image_positions is not None and s.image is not None and s.last_image is None:
            raise MlxVideoError(f"{self.spec.id} goes from a first to a last frame: give the last one with "
                                "--last-image (for one image use wan2.1-i2v-14b-720p / -480p)")

    # ---- the stages ----

    def encode_text(self, prompts: list[str], progress: bool = False) -> mx.array:
        """(len(prompts), text_len, dim) embeddings, zero past each prompt's length, as the reference pads them."""
        from mlx_video.text_encoders.umt5 import UMT5Config, UMT5Encoder

        ids, mask = self.tokenizer([clean_prompt(p) for p in prompts], max_length=self.text_len)
        # Positions past the longest prompt are zeroed afterwards, and padding keys are masked, so the valid
        # positions do not depend on how far the batch is padded: encode only up to the longest prompt.
        longest = max(1, int(mask.sum(axis=1).max()))
        with tqdm(total=1, desc="text encoding", disable=not progress, leave=False) as bar:
            encoder = UMT5Encoder(UMT5Config.from_dict(self.folder.config("text_encoder")))
            self.folder.load_module("text_encoder", encoder)
            valid = mx.array(mask[:, :longest])
            hidden = encoder(mx.array(ids[:, :longest]), valid)
            hidden = hidden * valid[..., None].astype(hidden.dtype)
            hidden = mx.pad(hidden, [(0, 0), (0, self.text_len - longest), (0, 0)]).astype(self.dtype)
            mx.eval(hidden)
            bar.update()
        del encoder
        release()
        return hidden

    def encode_image(self, image: np.ndarray, s: GenerationSettings, progress: bool = False,
                     last_image: np.ndarray | None = None) -> mx.array:
        """The image conditioning, channels-last: (1, T, h, w, 4 + z) mask and latents for I2V-A14B, (1, 1, h, w, z)
        for TI2V-5B. `image` (and `last_image`, first-last frame on I2V-A14B) is (height, width, 3) float in
        [-1, 1], already fitted to the video size."""
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        for what, pixels in (("conditioning image", image), ("last image", last_image)):
            if pixels is not None and pixels.shape != (s.height, s.width, 3):
                raise MlxVideoError(f"the {what} is {pixels.shape}, expected ({s.height}, {s.width}, 3)")
        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        with tqdm(total=1, desc="image encoding", disable=not progress, leave=False) as bar:
            first = mx.array(image, dtype=mx.float32)[None, None]
            cond = vae.encode(first) if self.image_mode == "first_frame" else self.channel_condition(vae, first, s, last_image)
            mx.eval(cond)
            bar.update()
        del vae
        release()
        if self.image_context:
            from mlx_video.families.wan.clip_tokens import clip_tokens

            images = [_as_read(s.image, image)] + ([] if last_image is None else [_as_read(s.last_image, last_image)])
            self._image_tokens = clip_tokens(self.folder, images, progress)
        return cond

    def channel_condition(self, vae, first: mx.array, s: GenerationSettings, last_image: np.ndarray | None) -> mx.array:
        """I2V-A14B's (1, T, h, w, 4 + z) mask and latents: the reference (diffusers WanImageToVideoPipeline
        .prepare_latents) encodes the image followed by black (zero) frames for the whole clip, the last of them
        replaced by `last_image` when given; the mask marks the pixel frames given."""
        frames = [first, mx.zeros((1, s.frames - (1 if last_image is None else 2), s.height, s.width, 3))]
        if last_image is not None:
            frames.append(mx.array(last_image, dtype=mx.float32)[None, None])
        latents = vae.encode(mx.concatenate(frames, axis=1))
        mask = mx.zeros(latents.shape[:-1] + (self.vae_stride[0],))
        mask[:, 0] = 1.0  # latent frame 0 stands for pixel frames that all show the image
        if last_image is not None:
            mask[:, -1, :, :, -1] = 1.0  # the last pixel frame is the last of the last latent frame's group
        return mx.concatenate([mask, latents], axis=-1)

    def position_limit(self) -> tuple[int, tuple[int, int, int]] | None:
        return self.transformer_config.rope_max_positions, tuple(self.transformer_config.patch_size)

    def encode_video(self, video: np.ndarray, s: GenerationSettings, progress: bool = False) -> mx.array:
        """Video-to-video: the (frames, height, width, 3) [-1, 1] clip, fitted to the video size, as (1, T, h, w, z)
        normalised latents (the VAE's mode, as diffusers' `retrieve_latents(..., "argmax")`)."""
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        if video.shape != (s.frames, s.height, s.width, 3):
            raise MlxVideoError(f"the input video is {video.shape}, expected ({s.frames}, {s.height}, {s.width}, 3)")
        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        with tqdm(total=1, desc="video encoding", disable=not progress, leave=False) as bar:
            latents = vae.encode(mx.array(video, dtype=mx.float32)[None])
            mx.eval(latents)
            bar.update()
        del vae
        release()
        return latents

    def load_transformer(self, name: str):
        config = self.transformer_config if name == HIGH_NOISE else transformer_config(self.folder.config(name))
        model = transformer_class(config)(config, dtype=self.dtype)
        self.folder.load_module(name, model)
        self.fuse_run_loras(model, name)
        warm_up(model, config, self.dtype)
        return model

    # ---- LoRAs: checked in resolve() (Pipeline.resolve_loras), fused when an expert loads ----

    @property
    def transformer_components(self) -> tuple[str, ...]:
        return (HIGH_NOISE, LOW_NOISE) if self.two_experts else (HIGH_NOISE,)

    def lora_experts(self, target: str) -> list[str]:
        if target == "all" or not self.two_experts:
            return super().lora_experts(target)
        return [HIGH_NOISE if target == "high" else LOW_NOISE]

    def lora_keymaps(self) -> list:
        from mlx_video.families.wan import keys

        if self.image_context:  # Wan2.1 I2V / FLF2V: the image embedding and image keys/values too
            return [keys.DIFFUSERS_IMAGE_TRANSFORMER, keys.OFFICIAL_IMAGE_TRANSFORMER]
        return [keys.DIFFUSERS_TRANSFORMER, keys.OFFICIAL_TRANSFORMER]

    def lora_model(self, component: str):
        config = transformer_config(self.folder.config(component))
        return transformer_class(config)(config)

    def expert_label(self, component: str) -> str:
        return _expert_label(component, self.two_experts)

    def expert_schedule(self, timesteps: np.ndarray) -> list[str]:
        if not self.two_experts:
            return [HIGH_NOISE] * len(timesteps)
        boundary_t = self.boundary * 1000  # num_train_timesteps
        return [HIGH_NOISE if t >= boundary_t else LOW_NOISE for t in timesteps]

    def uses_cfg(self, s: GenerationSettings) -> bool:
        return s.guidance != 1.0 or (self.two_experts and s.guidance_2 != 1.0)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        pt, ph, pw = self.transformer_config.patch_size
        return latent_shape[1] // pt, (latent_shape[2] // ph) * (latent_shape[3] // pw)

    def radial_for(self, s: GenerationSettings, latent_shape: tuple[int, ...]):
        """The run's radial attention over the patched latent grid of `latent_shape` (B, T, H, W, C)."""
        radial = self.radial_run(s, *self.token_grid(latent_shape))
        if radial is not None and self._split is not None and self._split.seq_ranks > 1:
            raise MlxVideoError("--attention radial does not run sequence-parallel yet; use dense attention or "
                                "CFG-parallel alone")
        return radial

    def encode(self, s: GenerationSettings, progress: bool = False) -> mx.array:
        return self.encode_text([s.prompt, s.negative_prompt] if self.uses_cfg(s) else [s.prompt], progress)

    def make_predict(self, s: GenerationSettings, cond: mx.array | None, context: mx.array, model_for_step,
                     latent_frames: int, step_cache=None) -> Predict:
        """`predict(latents, i, t)` for the shared loop: the model input (image conditioning), the timestep as the
        model takes it, and guidance. `model_for_step(i)` returns (transformer, its guidance scale)."""
        split = self._split
        guide = guidance_cfg_parallel(split) if split is not None and split.cfg_ranks == 2 else get_guidance(s.guidance_mode)
        text, negative = context[:1], (context[1:] if context.shape[0] > 1 else None)
        first_frame = cond is not None and self.image_mode == "first_frame"
        if first_frame:
            # TI2V-5B image mode: the first latent frame is the image's, at timestep 0
            keep = first_frame_mask(latent_frames)
            frame_timestep = 1.0 - keep.reshape(1, -1)

        prepared = {"model": lambda: None}
        image_tokens = self._image_tokens if cond is not None else None

        def prepared_context(model, ctx):
            return prepare_context(model, ctx, image_tokens)

        def prepare(model, ctx):
            """The text embedding and every block's cross-attention K/V, computed once per prompt and expert."""
            if ctx is text:
                key = "cond"
            elif negative is not None and ctx is negative:
                key = "uncond"
            elif negative is not None and ctx.shape == (2, *text.shape[1:]):
                key = "both"  # the batched guidance pass: text and negative, in this order
            else:
                return prepared_context(model, ctx) if image_tokens is not None else ctx
            if prepared["model"]() is not model:  # a weak reference: an expert that left is not kept alive
                prepared.clear()
                prepared["model"] = weakref.ref(model)
            if key not in prepared:
                prepared[key] = prepared_context(model, mx.concatenate([text, negative]) if key == "both" else ctx)
            return prepared[key]

        def predict(latents: mx.array, i: int, t) -> mx.array:
            model, scale = model_for_step(i)
            if step_cache is not None:
                step_cache.begin_step(i, model)
            x, timestep = latents, mx.array([float(t)], dtype=mx.float32)
            if cond is not None and self.image_mode == "channels":
                x = mx.concatenate([latents, cond], axis=-1)
            elif first_frame:
                x = keep * cond + (1.0 - keep) * latents
                timestep = frame_timestep * float(t)

            def forward(xb, tb, ctx):
                ctx = prepare(model, ctx)
                if step_cache is not None:
                    return step_cache(model, xb.astype(self.dtype), tb, ctx)
                return model(xb.astype(self.dtype), tb, ctx)

            return guide(forward, x, timestep, text, negative, scale)

        return predict

    def generate(
        self,
        settings: GenerationSettings,
        init_latents: np.ndarray | None = None,
        progress: bool = False,
        image: np.ndarray | None = None,
        hooks=(),
        last_image: np.ndarray | None = None,
        video: np.ndarray | None = None,
    ) -> GenerationResult:
        """Run text (and image) encoding and the denoising loop. `image`: (height, width, 3) float in [-1, 1] at
        the video size (see `mlx_video.io.image.fit_image`); required by I2V-A14B, optional for TI2V-5B.
        `hooks`: extra per-step callables `(i, t, latents)` run after each step. `last_image`: first-last frame
        (I2V-A14B), the frame the video ends on, as `image`. `video`: video-to-video (T2V-A14B, TI2V-5B), the
        (frames, height, width, 3) clip in [-1, 1] at the video size, re-noised by `settings.strength`;
        `init_latents` is then the noise before it is mixed with the video's latents."""
        given = {"image": image, "last_image": last_image, "video": video}
        unnamed = {k: "<array>" for k, v in given.items() if v is not None and getattr(settings, k) is None}
        if unnamed:
            settings = GenerationSettings.from_dict({**settings.to_dict(), **unnamed})
        s = self.resolve(settings)
        check_same_model(self.folder.path)
        self._split = current_split(self.uses_cfg(s))
        if self._split is not None:  # refuse a token count the group cannot split before any weights are read
            _, _, t, h, w = self.latent_shape(s)
            pt, ph, pw = self.transformer_config.patch_size
            per_frame_groups = image is not None and self.image_mode == "first_frame"
            tokens = (h // ph) * (w // pw) * (1 if per_frame_groups else t // pt)
            self._split.token_slice(tokens, "tokens per frame group" if per_frame_groups else "video tokens")
        self.check_image_use(image is not None)
        if init_latents is not None:
            init_latents = self.check_init_latents(s, init_latents)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        context = self.encode(s, progress)
        timings["text_encoding"] = time.perf_counter() - start
        cond = None
        if image is not None:
            start = time.perf_counter()
            cond = self.encode_image(image, s, progress, last_image)
            timings["image_encoding"] = time.perf_counter() - start

        latents = self.initial_latents(s, init_latents)
        sampler = self.make_sampler(s)
        if video is not None:
            start = time.perf_counter()
            latents = self.renoise(self.encode_video(video, s, progress), latents, sampler)
            timings["video_encoding"] = time.perf_counter() - start
        steps = len(sampler.timesteps)
        schedule = self.expert_schedule(sampler.timesteps)
        resident = {"name": None, "model": None}
        radial = self.radial_for(s, latents.shape)

        def model_for_step(i: int):
            name = schedule[i]
            if name != resident["name"]:  # only the active expert is resident
                resident["model"] = None
                release()
                resident["model"] = self.load_transformer(name)
                resident["model"].set_sequence_split(self._split)
                prepare_model(resident["model"], radial)
                resident["name"] = name
            return resident["model"], (s.guidance if name == HIGH_NOISE else s.guidance_2)

        def label(i: int) -> str:
            return _expert_label(schedule[i], self.two_experts)

        from mlx_video.pipelines.cache import make_step_cache

        step_cache = make_step_cache(s.cache, steps, schedule, self.spec.id,
                                     image_mode=cond is not None and self.image_mode == "first_frame")
        if self._split is not None and step_cache.name in ("easycache", "fbcache"):
            raise MlxVideoError(f"--cache {step_cache.name} decides from each process's own tokens; across several "
                                "processes use --cache magcache (its decisions come from a table)")
        self._run_loras = s.loras or []
        predict = self.make_predict(s, cond, context, model_for_step, latents.shape[1], step_cache)
        if radial is not None:
            predict = radial.wrap(predict)
        start = time.perf_counter()
        try:
            latents = self.run_denoising(sampler, latents, predict, steps, progress, hooks, label)
        finally:
            resident["model"] = None
            release()
        timings["denoising"] = time.perf_counter() - start
        if cond is not None and self.image_mode == "first_frame":
            keep = first_frame_mask(latents.shape[1])
            latents = keep * cond + (1.0 - keep) * latents
        result = GenerationResult(reference_layout(latents), s, timings, schedule)
        result.stats = step_cache.stats()
        if radial is not None:
            result.stats.update(radial.stats())
        if self._split is not None:
            result.parallel = self._split.describe()
            result.parallel["denoising_seconds_per_rank"] = self._split.gather_scalar(timings["denoising"])
        return result

    # ---- memory preflight ----

    def component_bytes(self, component: str) -> int:
        return sum(p.stat().st_size for p in (self.folder.path / component).glob("*.safetensors"))

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes of each stage, run one after the other: the family's cost model
        (`mlx_video/families/wan/cost_model.py`, the same estimate the benchmarks use) on this folder's configuration
        and the bytes its components store. Not modelled: the allocator's cache and the rest of the process;
        the figures are estimates, not measurements."""
        from mlx_video.families.wan import cost_model as cost
        from mlx_video.families.wan.vae import WanVAEConfig

        name = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[self.dtype]
        _, _, _, h, w = self.latent_shape(s)
        stored = {
            "text_encoder": self.component_bytes("text_encoder"),
            "transformer_expert": max(self.component_bytes(c) for c in (HIGH_NOISE, LOW_NOISE) if self.folder.has(c)),
            "vae": self.component_bytes("vae"),
        }
        vae_cfg, tile_px = None, None
        if self.can_decode:
            vae_cfg = WanVAEConfig.from_dict(self.folder.config("vae"))
            tile = self.vae_tile(tiling, (h, w)).plan
            if tile:
                tile_px = (tile[1] * self.vae_stride[2], tile[0] * self.vae_stride[1])
        split = current_split(self.uses_cfg(s))
        cfg_parallel = split is not None and split.cfg_ranks == 2
        estimate = cost.estimate_peak_memory(
            self.spec, s.width, s.height, s.frames, name,
            guidance=self.uses_cfg(s) and s.guidance_mode == "batched" and not cfg_parallel,
            sequence_ranks=split.seq_ranks if split is not None else 1,
            fused_attention=mx.metal.is_available(), vae_tile=tile_px, transformer=self.transformer_config,
            vae_config=vae_cfg, stored=stored, text_len=self.text_len, image_encoding=has_image,
            attention=self.attention_estimate(s),
        )
        stages = {k: v["total"] for k, v in estimate.stages.items()}
        if split is not None and split.rank != 0:
            stages.pop("decoding", None)  # rank 0 alone decodes
        if self.image_context and has_image:  # the CLIP encoder runs after the VAE has gone: its weights, twice
            stages["image_encoding"] = max(stages.get("image_encoding", 0), 2 * self.component_bytes(IMAGE_ENCODER))
        peak = max(stages, key=stages.get)
        return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak], "detail": estimate.stages,
                "per_rank": split is not None}

    # ---- decoding ----

    @property
    def can_decode(self) -> bool:
        return self.folder.has("vae")

    def vae_tile(self, mode: str, latent_hw: tuple[int, int], frames: int | None = None) -> DecodeTiling:
        """Spatial tiling for decoding: `off`, `on`, or `auto` (tile when one untiled chunk would not fit); the
        decoder always walks the latent frames in its causal chunks. `plan`: the (tile height, tile width,
        overlap) in latent pixels, or None untiled.

        Tiles are 256 output pixels with 64 pixels of overlap, as diffusers tiles the Wan VAE.
        """
        tile = self._spatial_tile(mode, latent_hw)
        return DecodeTiling(spatial=tile is not None, temporal=True, plan=tile)

    def _spatial_tile(self, mode: str, latent_hw: tuple[int, int]) -> tuple[int, int, int] | None:
        if mode not in ("auto", "on", "off"):
            raise MlxVideoError(f"--vae-tiling takes auto, on or off, not {mode!r}")
        s = self.vae_stride[1]
        tile = (256 // s, 256 // s, 64 // s)
        h, w = latent_hw
        if mode == "off" or (h <= tile[0] and w <= tile[1]):
            return None
        if mode == "on":
            return tile
        # one untiled chunk, by the measured rule of the cost model
        from mlx_video.families.wan.cost_model import vae_decode_chunk_bytes
        from mlx_video.families.wan.vae import WanVAEConfig

        estimate = vae_decode_chunk_bytes(WanVAEConfig.from_dict(self.folder.config("vae")), w * s, h * s)
        available = available_memory_bytes()
        return tile if available is not None and estimate > available // 2 else None

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, C, T, H, W) latents -> (frames, height, width, 3) uint8 video, and decoding statistics."""
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        if not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no vae/ component; re-convert it from a folder with vae/")
        z = mx.array(latents).transpose(0, 2, 3, 4, 1)
        tile = self.vae_tile(tiling, (z.shape[2], z.shape[3])).plan
        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        mx.reset_peak_memory()
        frames = []
        total = 1 + (z.shape[1] - 1) * self.vae_stride[0]
        with tqdm(total=total, desc="decoding", unit="frame", disable=not progress) as bar:
            for chunk in vae.decode_chunks(z, tile):
                pixels = mx.round((chunk[0].astype(mx.float32) + 1.0) * 127.5)
                frames.append(np.array(mx.clip(pixels, 0, 255).astype(mx.uint8)))
                bar.update(frames[-1].shape[0])
        stats = {"vae_peak_memory_bytes": int(mx.get_peak_memory()), "vae_tile": list(tile) if tile else None}
        del vae
        release()
        return np.concatenate(frames, axis=0), stats

def warm_up(model, config: WanTransformerConfig, dtype) -> None:
    """Check the custom kernels once on a minimal input (one latent patch, one text token) before the loop;
    a no-op where only the portable path exists (see `mlx_video.kernels.warm_up`)."""
    from mlx_video.kernels import warm_up as kernel_warm_up

    pt, ph, pw = config.patch_size
    x = mx.zeros((1, pt, ph, pw, config.in_channels), dtype=dtype)
    text = mx.zeros((1, 1, config.text_dim), dtype=dtype)
    if not hasattr(config, "image_positions"):
        kernel_warm_up(lambda: model(x, mx.array([500.0]), text))
    else:
        image = mx.zeros((1, config.image_positions or 1, config.image_dim), dtype=dtype)
        kernel_warm_up(lambda: model(x, mx.array([500.0]), text, image))


def prepare_context(model, ctx: mx.array, image_tokens: mx.array | None):
    """The model's prepared text context, with the CLIP image tokens (one set for every row) where it reads them."""
    if image_tokens is None:
        return model.prepare_context(ctx)
    return model.prepare_context(ctx, mx.broadcast_to(image_tokens, (ctx.shape[0], *image_tokens.shape[1:])))


def transformer_config(config: dict) -> WanTransformerConfig:
    """A converted transformer's config: Wan2.1 I2V / FLF2V's (`image_positions`, None for I2V: its CLIP image
    context) or the backbone's (Animate's pipeline reads its own)."""
    if "image_positions" in config:
        from mlx_video.families.wan.image_model import WanImageConfig

        return WanImageConfig.from_dict(config)
    return WanTransformerConfig.from_dict(config)


def transformer_class(config: WanTransformerConfig):
    if hasattr(config, "image_positions"):
        from mlx_video.families.wan.image_model import WanImageTransformer

        return WanImageTransformer
    from mlx_video.families.wan.transformer import WanTransformer

    return WanTransformer


def _image_positions(config) -> str:
    """"none" for an image context of one image (Wan2.1 I2V), "first_last" for FLF2V's, "" without one."""
    if not hasattr(config, "image_positions"):
        return ""
    return "none" if config.image_positions is None else "first_last"


def _as_read(path, fitted: np.ndarray) -> np.ndarray:
    """The image as read from its file (what the reference's CLIP encoder sees), else the fitted pixels in uint8."""
    from pathlib import Path

    from mlx_video.io.image import load_image

    if path is not None and Path(str(path)).is_file():
        return load_image(path)
    return np.clip(np.round((fitted + 1.0) * 127.5), 0, 255).astype(np.uint8)


def first_frame_mask(latent_frames: int) -> mx.array:
    """1 on latent frame 0 (the image's), 0 elsewhere, shaped to broadcast over (1, T, H, W, C)."""
    return mx.zeros((1, latent_frames, 1, 1, 1)).at[:, 0].add(1.0)


def _expert_label(name: str, two_experts: bool) -> str:
    if not two_experts:
        return "model"
    return "high-noise expert" if name == HIGH_NOISE else "low-noise expert"
