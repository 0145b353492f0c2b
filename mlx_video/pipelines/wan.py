"""Wan 2.2 generation: prompt -> UMT5 -> sampler loop over the transformer (-> VAE, next release).

One pipeline serves every Wan 2.2 variant: the registry entry and the converted folder say whether there
are two experts (A14B) and where the boundary between them lies.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from ..errors import MlxVideoError, NonFiniteLatentsError
from ..model_folder import ModelFolder, resolve_model
from ..models.wan.config import WanTransformerConfig
from ..samplers import SAMPLERS, make_sampler
from ..text_encoders.prompt import clean_prompt
from ..text_encoders.tokenizer import T5Tokenizer

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"


@dataclass
class WanSettings:
    """Everything that decides a Wan generation. `None` fields take the model's published default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int = 0
    fps: int | None = None
    image: str | None = None  # the conditioning image's path, for the record; its pixels are passed to generate()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WanResult:
    latents: np.ndarray  # (1, C, T, H, W) float32, the layout the reference pipelines use
    settings: WanSettings
    timings: dict = field(default_factory=dict)
    experts: list = field(default_factory=list)  # which expert ran at each step


class WanPipeline:
    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self.spec = folder.spec
        self.dtype = folder.dtype
        self.transformer_config = WanTransformerConfig.from_dict(folder.config(HIGH_NOISE))
        self.two_experts = folder.has(LOW_NOISE)
        self.boundary = folder.manifest.get("boundary")
        self.vae_stride = tuple(folder.manifest["vae_stride"])
        self.text_len = folder.manifest.get("text_len", self.spec.text_len)
        self.tokenizer = T5Tokenizer.from_folder(folder.path / "tokenizer")

    @classmethod
    def from_pretrained(cls, model: str) -> "WanPipeline":
        """`model` is a converted folder or a registry id whose converted folder is in the models home."""
        return cls(resolve_model(model))

    @property
    def size_multiple(self) -> int:
        return self.vae_stride[1] * self.transformer_config.patch_size[1]

    # ---- settings and validation: all of it happens before any weights are read ----

    def resolve(self, settings: WanSettings) -> WanSettings:
        spec = self.spec
        s = WanSettings(**settings.to_dict())
        if s.negative_prompt is None:
            s.negative_prompt = spec.negative_prompt
        if s.width is None or s.height is None:
            s.width, s.height = spec.default_size if s.width is None and s.height is None else (s.width, s.height)
        if s.width is None or s.height is None:
            raise MlxVideoError("give both width and height (--size WxH)")
        s.frames = spec.frames if s.frames is None else s.frames
        s.steps = spec.steps if s.steps is None else s.steps
        s.guidance = spec.guidance if s.guidance is None else s.guidance
        if self.two_experts:
            s.guidance_2 = (spec.guidance_2 if spec.guidance_2 is not None else s.guidance) if s.guidance_2 is None else s.guidance_2
        elif s.guidance_2 is not None:
            raise MlxVideoError(f"--guidance-2 sets the low-noise expert's guidance; {spec.id} has a single model")
        s.shift = spec.shift if s.shift is None else s.shift
        s.sampler = spec.sampler if s.sampler is None else s.sampler
        s.fps = spec.fps if s.fps is None else s.fps

        m = self.size_multiple
        if s.width <= 0 or s.height <= 0 or s.width % m or s.height % m:
            raise MlxVideoError(
                f"size {s.width}x{s.height} is not supported by {spec.id}: width and height must be positive multiples "
                f"of {m} (published sizes: {', '.join(f'{w}x{h}' for w, h in spec.sizes)})"
            )
        t = self.vae_stride[0]
        if s.frames < 1 or (s.frames - 1) % t:
            lo = max(1, (s.frames - 1) // t * t + 1)
            raise MlxVideoError(f"--frames must be of the form {t}n+1 (e.g. {lo} or {lo + t}), got {s.frames}")
        if s.steps < 1:
            raise MlxVideoError(f"--steps must be at least 1, got {s.steps}")
        if s.shift <= 0:
            raise MlxVideoError(f"--shift must be positive, got {s.shift}")
        if s.sampler not in SAMPLERS:
            raise MlxVideoError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if s.fps <= 0:
            raise MlxVideoError(f"--fps must be positive, got {s.fps}")
        self.check_image_use(s.image is not None)
        return s

    @property
    def image_mode(self) -> str | None:
        """How the model takes an image: "channels" (I2V-A14B: mask and image latent beside the noise), "first_frame"
        (TI2V-5B: the first latent frame replaced by the image's), or None (text only)."""
        if self.spec.task == "i2v":
            return "channels"
        if self.spec.task == "ti2v":
            return "first_frame"
        return None

    def check_image_use(self, has_image: bool) -> None:
        if has_image and self.image_mode is None:
            raise MlxVideoError(f"{self.spec.id} is a text-to-video model: it takes no --image (try wan2.2-i2v-a14b or wan2.2-ti2v-5b)")
        if not has_image and self.spec.task == "i2v":
            raise MlxVideoError(f"{self.spec.id} animates an image: pass --image PATH")
        if has_image and not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no VAE (vae/), which encoding the --image needs")

    def latent_shape(self, s: WanSettings) -> tuple[int, int, int, int, int]:
        """(1, C, T, H, W): the reference pipelines' layout."""
        st, sh, sw = self.vae_stride
        return (1, self.transformer_config.out_channels, (s.frames - 1) // st + 1, s.height // sh, s.width // sw)

    def check_init_latents(self, s: WanSettings, latents: np.ndarray) -> np.ndarray:
        expected = self.latent_shape(s)
        if latents.ndim != 5 or tuple(latents.shape) != expected:
            raise MlxVideoError(
                f"--init-latents has shape {tuple(latents.shape)}; {s.width}x{s.height} with {s.frames} frames needs "
                f"{expected} (batch, channels, latent frames, height/{self.vae_stride[1]}, width/{self.vae_stride[2]})"
            )
        if not np.issubdtype(latents.dtype, np.floating):
            raise MlxVideoError(f"--init-latents must hold floats, not {latents.dtype}")
        if not np.isfinite(latents).all():
            raise MlxVideoError("--init-latents contains NaN or infinite values")
        return latents.astype(np.float32)

    # ---- the stages ----

    def encode_text(self, prompts: list[str], progress: bool = False) -> mx.array:
        """(len(prompts), text_len, dim) embeddings, zero past each prompt's length, as the reference pads them."""
        from ..text_encoders.umt5 import UMT5Config, UMT5Encoder

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
        _release()
        return hidden

    def encode_image(self, image: np.ndarray, s: WanSettings, progress: bool = False) -> mx.array:
        """The image conditioning, channels-last: (1, T, h, w, 4 + z) mask and latents for I2V-A14B, (1, 1, h, w, z)
        for TI2V-5B. `image` is (height, width, 3) float in [-1, 1], already fitted to the video size."""
        from ..models.wan.vae import WanVAE, WanVAEConfig

        if image.shape != (s.height, s.width, 3):
            raise MlxVideoError(f"the conditioning image is {image.shape}, expected ({s.height}, {s.width}, 3)")
        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        with tqdm(total=1, desc="image encoding", disable=not progress, leave=False) as bar:
            first = mx.array(image, dtype=mx.float32)[None, None]
            if self.image_mode == "first_frame":
                cond = vae.encode(first)
            else:
                # the reference encodes the image followed by black (zero) frames for the whole clip
                video = mx.concatenate([first, mx.zeros((1, s.frames - 1, s.height, s.width, 3))], axis=1)
                latents = vae.encode(video)
                mask = mx.zeros(latents.shape[:-1] + (self.vae_stride[0],))
                mask[:, 0] = 1.0  # latent frame 0 stands for pixel frames that all show the image
                cond = mx.concatenate([mask, latents], axis=-1)
            mx.eval(cond)
            bar.update()
        del vae
        _release()
        return cond

    def load_transformer(self, name: str):
        from ..models.wan.transformer import WanTransformer

        config = self.transformer_config if name == HIGH_NOISE else WanTransformerConfig.from_dict(self.folder.config(name))
        model = WanTransformer(config)
        self.folder.load_module(name, model)
        return model

    def expert_schedule(self, timesteps: np.ndarray) -> list[str]:
        if not self.two_experts:
            return [HIGH_NOISE] * len(timesteps)
        boundary_t = self.boundary * 1000  # num_train_timesteps
        return [HIGH_NOISE if t >= boundary_t else LOW_NOISE for t in timesteps]

    def generate(
        self,
        settings: WanSettings,
        init_latents: np.ndarray | None = None,
        progress: bool = False,
        image: np.ndarray | None = None,
    ) -> WanResult:
        """Run text (and image) encoding and the denoising loop. `image`: (height, width, 3) float in [-1, 1] at
        the video size (see `mlx_video.io.image.fit_image`); required by I2V-A14B, optional for TI2V-5B."""
        s = self.resolve(settings)
        self.check_image_use(image is not None)
        if init_latents is not None:
            init_latents = self.check_init_latents(s, init_latents)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        uses_cfg = s.guidance != 1.0 or (self.two_experts and s.guidance_2 != 1.0)
        context = self.encode_text([s.prompt, s.negative_prompt] if uses_cfg else [s.prompt], progress)
        timings["text_encoding"] = time.perf_counter() - start
        cond = None
        if image is not None:
            start = time.perf_counter()
            cond = self.encode_image(image, s, progress)
            timings["image_encoding"] = time.perf_counter() - start

        shape = self.latent_shape(s)
        if init_latents is None:
            latents = mx.random.normal(shape, key=mx.random.key(s.seed))
        else:
            latents = mx.array(init_latents)
        latents = latents.transpose(0, 2, 3, 4, 1)  # channels-last inside
        first_frame = cond is not None and self.image_mode == "first_frame"
        if first_frame:
            # TI2V-5B image mode: the first latent frame is the image's, at timestep 0
            keep = mx.zeros((1, latents.shape[1], 1, 1, 1)).at[:, 0].add(1.0)
            frame_timestep = 1.0 - keep.reshape(1, -1)

        sampler = make_sampler(s.sampler, s.steps, s.shift)
        sampler.reset()
        schedule = self.expert_schedule(sampler.timesteps)
        start = time.perf_counter()
        model, active = None, None
        bar = tqdm(total=s.steps, desc="denoising", disable=not progress)
        try:
            for i, t in enumerate(sampler.timesteps):
                name = schedule[i]
                if name != active:  # only the active expert is resident
                    model = None
                    _release()
                    model = self.load_transformer(name)
                    active = name
                guidance = s.guidance if name == HIGH_NOISE else s.guidance_2
                x, timestep = latents, mx.array([float(t)], dtype=mx.float32)
                if cond is not None and self.image_mode == "channels":
                    x = mx.concatenate([latents, cond], axis=-1)
                elif first_frame:
                    x = keep * cond + (1.0 - keep) * latents
                    timestep = frame_timestep * float(t)
                velocity = self._velocity(model, x, timestep, context, guidance)
                latents = sampler.step(velocity, i, latents)
                mx.eval(latents)
                if not mx.all(mx.isfinite(latents)).item():
                    raise NonFiniteLatentsError(
                        f"step {i + 1}/{s.steps} (timestep {t}, {_expert_label(name, self.two_experts)}) produced NaN or "
                        "infinite latents; stopping now instead of producing noise. Check that the weights converted "
                        "cleanly, or try --dtype fp32 at conversion"
                    )
                bar.set_postfix_str(_expert_label(name, self.two_experts))
                bar.update()
        finally:
            bar.close()
            model = None
            _release()
        timings["denoising"] = time.perf_counter() - start
        if first_frame:
            latents = keep * cond + (1.0 - keep) * latents
        out = np.array(latents.transpose(0, 4, 1, 2, 3).astype(mx.float32))
        return WanResult(out, s, timings, schedule)

    # ---- memory preflight ----

    def component_bytes(self, component: str) -> int:
        return sum(p.stat().st_size for p in (self.folder.path / component).glob("*.safetensors"))

    def estimate_memory(self, s: WanSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes of each stage, run one after the other: the weights as stored in this folder
        plus `mlx_video.flops`' activation estimates. Not modelled: the allocator's cache and the rest of the
        process; the figures are estimates, not measurements."""
        from .. import flops
        from ..models.wan.vae import WanVAEConfig

        name = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[self.dtype]
        _, _, t, h, w = self.latent_shape(s)
        pt, ph, pw = self.transformer_config.patch_size
        n_tokens = (t // pt) * (h // ph) * (w // pw)
        uses_cfg = s.guidance != 1.0 or (self.two_experts and s.guidance_2 != 1.0)
        batch = 2 if uses_cfg else 1
        fused = mx.metal.is_available()
        act = flops.activation_bytes(self.transformer_config, n_tokens, batch, name, self.text_len, fused)["peak"]
        expert = max(self.component_bytes(c) for c in (HIGH_NOISE, LOW_NOISE) if self.folder.has(c))
        text_dim = self.transformer_config.text_dim
        stages = {
            "text_encoding": self.component_bytes("text_encoder") + batch * self.text_len * text_dim * 4 * 8,
            "denoising": expert + act + batch * self.text_len * self.transformer_config.dim * 4,
        }
        if self.can_decode:
            vae_cfg = WanVAEConfig.from_dict(self.folder.config("vae"))
            tile = self.vae_tile(tiling, (h, w))
            th, tw = (tile[0] * self.vae_stride[1], tile[1] * self.vae_stride[2]) if tile else (s.height, s.width)
            decode = self.component_bytes("vae") + flops.vae_decode_chunk_bytes(vae_cfg, tw, th)
            stages["decoding"] = decode + s.frames * s.width * s.height * 3
            if has_image:
                stages["image_encoding"] = decode
        peak = max(stages, key=stages.get)
        return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak]}

    def check_memory(self, s: WanSettings, limit_bytes: int | None, tiling: str = "auto", has_image: bool = False) -> dict:
        """Refuse, before any weights are read, a run whose estimated peak exceeds `limit_bytes` (default: the
        memory available now). Returns the estimate, for the record."""
        estimate = self.estimate_memory(s, tiling, has_image)
        limit = available_memory_bytes() if limit_bytes is None else limit_bytes
        estimate["limit_bytes"] = limit
        if limit is not None and estimate["peak_bytes"] > limit:
            gib = 1024**3
            stages = ", ".join(f"{k} {v / gib:.1f}" for k, v in estimate["stages"].items())
            hints = ["a smaller --size or fewer --frames"]
            if self.folder.manifest.get("quantization") is None:
                hints.append("a quantized conversion (mlxvid convert ... --quantize q8 or q4)")
            if estimate["peak_stage"] == "decoding":
                hints.append("--vae-tiling on")
            raise MlxVideoError(
                f"this run needs about {estimate['peak_bytes'] / gib:.1f} GiB at its peak ({estimate['peak_stage']}; "
                f"per stage in GiB: {stages}) but {limit / gib:.1f} GiB are available. Try "
                + ", or ".join(hints) + "; --max-memory GB overrides the limit (the figures are estimates)"
            )
        return estimate

    # ---- decoding ----

    @property
    def can_decode(self) -> bool:
        return self.folder.has("vae")

    def vae_tile(self, mode: str, latent_hw: tuple[int, int]) -> tuple[int, int, int] | None:
        """Spatial tiling for decoding: `off`, `on`, or `auto` (tile when one untiled chunk would not fit).

        Tiles are 256 output pixels with 64 pixels of overlap, as diffusers tiles the Wan VAE.
        """
        if mode not in ("auto", "on", "off"):
            raise MlxVideoError(f"--vae-tiling takes auto, on or off, not {mode!r}")
        s = self.vae_stride[1]
        tile = (256 // s, 256 // s, 64 // s)
        h, w = latent_hw
        if mode == "off" or (h <= tile[0] and w <= tile[1]):
            return None
        if mode == "on":
            return tile
        # Estimate of one untiled chunk: the widest decoder stage holds about 6 float32 copies of a
        # (6 frames x H x W x C) activation (4 output frames plus 2 cached). An estimate, not a measurement.
        cfg = self.folder.config("vae")
        channels = (cfg.get("decoder_base_dim") or cfg["base_dim"]) // max(1, (cfg.get("patch_size") or 1))
        estimate = 6 * 6 * (h * s) * (w * s) * channels * 4
        available = available_memory_bytes()
        return tile if available is not None and estimate > available // 2 else None

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, C, T, H, W) latents -> (frames, height, width, 3) uint8 video, and decoding statistics."""
        from ..models.wan.vae import WanVAE, WanVAEConfig

        if not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no vae/ component; re-convert it from a folder with vae/")
        z = mx.array(latents).transpose(0, 2, 3, 4, 1)
        tile = self.vae_tile(tiling, (z.shape[2], z.shape[3]))
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
        _release()
        return np.concatenate(frames, axis=0), stats

    def _velocity(self, model, x: mx.array, timestep: mx.array, context: mx.array, guidance: float) -> mx.array:
        x = x.astype(self.dtype)
        if context.shape[0] == 1 or guidance == 1.0:
            # no guidance: the conditional pass alone
            return model(x, timestep, context[:1])
        # conditional and unconditional passes batched into one forward
        out = model(mx.concatenate([x, x]), mx.concatenate([timestep, timestep]), context)
        cond, uncond = out[:1], out[1:]
        return uncond + guidance * (cond - uncond)


def available_memory_bytes() -> int | None:
    """Memory a run can count on: the GPU's working set on a Mac, MemAvailable elsewhere (None if unknown)."""
    try:
        if mx.metal.is_available():
            info = mx.metal.device_info()
            return int(info.get("max_recommended_working_set_size", info.get("memory_size")))
    except Exception:  # device_info is missing on some builds; fall through to the OS figure
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _expert_label(name: str, two_experts: bool) -> str:
    if not two_experts:
        return "model"
    return "high-noise expert" if name == HIGH_NOISE else "low-noise expert"


def _release() -> None:
    gc.collect()
    mx.clear_cache()
