"""Wan2.2-S2V: a portrait and a voice track (a prompt, optionally a pose video) in, a talking video out.

The video is a chain of clips, made the way the official release makes it (Wan-Video/Wan2.2 wan/speech2video.py):

- the voice track becomes wav2vec2 features per video frame (`mlx_video.audio.features`); the clip count
  follows the audio (`--clips N` stops earlier);
- every clip denoises `frames // 4` latent frames (80 frames: 20) with its own seed (seed + clip index),
  conditioned on the portrait's latent (the reference), the latents of the last `motion_frames` pixel frames
  made so far (the motion context, none for the first clip) and its 80 frames of audio features; the
  unconditional pass of guidance takes the negative prompt and silence (audio features times zero);
- the first clip decodes [reference | new latents] and keeps frames 4..80 (77 frames); later clips decode
  [motion latents | new latents] and keep the last 80; the kept frames then refill the motion buffer,
  which the VAE encodes again for the next clip.

The transformer and the VAE stay loaded for the whole chain (the VAE both decodes and re-encodes between
clips); the text and audio encoders run once, before it.

The portrait is fitted as the official release fits it (`mlx_video.io.image`, mode "short-side", the default
for this pipeline; `--image-fit` picks another, recorded in the sidecar): its shorter side is resized to the
video's shorter side with Pillow's bilinear filter (torchvision's `Resize` on a PIL image), then centre-cropped
to the video size, with black where it does not cover. The pose video's frames get the same fit on their
[-1, 1] values, without 8-bit rounding, padded with 0 (see `pose_latents`).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.options import check_number
from mlx_video.pipelines.base import GenerationResult, GenerationSettings, reference_layout, release
from mlx_video.pipelines.attention_mode import prepare_model
from mlx_video.pipelines.loop import get_guidance
from mlx_video.families.wan.pipeline import HIGH_NOISE, WanPipeline

AUDIO_ENCODER = "audio_encoder"
# Frames of the first motion buffer that show the portrait with --start-from-portrait (the official value).
START_FRAMES = 6
# Pixel frames of the first clip's decode dropped at its start (the official pipeline's `image[:, :, 3:]`):
# with the reference latent in front, the decode has 1 + 4n frames and the clip keeps the last 4n - 3.
FIRST_CLIP_DROP = 3


def size_for_image(height: int, width: int, max_area: int, multiple: int = 64) -> tuple[int, int]:
    """The video (height, width) for a reference image, as the official pipeline chooses it: the largest scale
    of the image (at most 1, or the one that makes its area `max_area`) whose size, rounded up to a multiple
    of `multiple`, fits in `max_area`; scales are tried downward in 100 equal steps to a lower bound (0.1 for a
    small image, else the scale at which the rounding adds the most). The image is then fitted to that size
    (its shorter side resized to the video's, then centre-cropped or padded with black: `fit_image` "short-side")."""
    area = height * width
    if area <= max_area:
        low, high = 0.1, 1.0
    else:
        pad = multiple - 1
        a, b, c = area, pad * (height + width), pad**2 - max_area
        low, high = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a), math.sqrt(max_area / area)
    for i in range(100):
        scale = high - (high - low) * i / 100
        h = -(-int(height * scale) // multiple) * multiple
        w = -(-int(width * scale) // multiple) * multiple
        if h * w <= max_area:
            return h, w
    # No scale fits: the aspect ratio at the target area, rounded down, and never larger than the image.
    aspect = width / height
    w = int((max_area * aspect) ** 0.5 // multiple * multiple)
    h = int((max_area / aspect) ** 0.5 // multiple * multiple)
    if w >= width or h >= height:
        w, h = int(width // multiple * multiple), int(height // multiple * multiple)
    return h, w


class ClipInputs:
    """The transformer as the guidance and the step cache call it, `model(x, t, cond)`, for one clip: `cond` holds
    what differs between the conditional and the unconditional pass (the text, the audio features); the portrait,
    motion and pose latents are the clip's and are repeated over the batch (2 when the passes are batched)."""

    def __init__(self, model, prepared_context, text, reference, motion, pose, drop_motion: bool, dtype):
        self.model, self.prepared_context, self.text = model, prepared_context, text
        self.reference, self.motion, self.pose, self.drop_motion, self.dtype = reference, motion, pose, drop_motion, dtype

    def _inputs(self, x: mx.array, cond: dict) -> dict:
        batch = x.shape[0]
        key = "both" if batch == 2 else ("cond" if cond["context"] is self.text else "uncond")

        def tile(a):
            return None if a is None else mx.broadcast_to(a, (batch, *a.shape[1:]))

        return dict(ref_latents=tile(self.reference), motion_latents=tile(self.motion), audio=cond["audio"],
                    cond_latents=tile(self.pose), drop_motion=self.drop_motion), self.prepared_context(key)

    def __call__(self, x: mx.array, t: mx.array, cond: dict) -> mx.array:
        inputs, context = self._inputs(x, cond)
        return self.model(x.astype(self.dtype), t, context, **inputs)

    def embed(self, x: mx.array, t: mx.array, cond: dict):
        inputs, context = self._inputs(x, cond)
        return self.model.embed(x.astype(self.dtype), t, context, **inputs)

    def run_blocks(self, state, start: int = 0, stop: int | None = None):
        return self.model.run_blocks(state, start, stop)

    def unembed(self, state) -> mx.array:
        return self.model.unembed(state)


class WanS2VPipeline(WanPipeline):
    takes_audio = True
    takes_pose_video = True
    default_image_fit = "short-side"  # the official portrait fit (module docstring)

    def __init__(self, folder):
        super().__init__(folder)
        from mlx_video.families.wan.s2v_model import WanS2VConfig

        self.transformer_config = WanS2VConfig.from_dict(folder.config(HIGH_NOISE))
        self.text_len = self.transformer_config.text_len  # the model pads (or refuses) text to its own length
        if not folder.has(AUDIO_ENCODER):
            raise MlxVideoError(f"{folder.path} has no {AUDIO_ENCODER}/ (the wav2vec2 voice encoder); re-convert it "
                                "from the official folder with wav2vec2-large-xlsr-53-english/")
        self._audio_cache: dict = {}

    @property
    def image_mode(self) -> str | None:
        return "reference"

    def check_image_use(self, has_image: bool) -> None:
        if not has_image:
            raise MlxVideoError(f"{self.spec.id} animates a portrait: pass --image PATH (and --audio PATH)")
        super().check_image_use(has_image)

    @property
    def motion_frames(self) -> int:
        return self.transformer_config.motion_frames

    # ---- settings ----

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        s = GenerationSettings.from_dict(settings.to_dict())
        if s.width is None and s.height is None and s.image is not None and Path(s.image).is_file():
            from mlx_video.io.image import load_image

            h, w = load_image(s.image).shape[:2]
            s.height, s.width = size_for_image(h, w, int(self.default("max_area")), self.spec.size_multiple)
        s = super().resolve(s)
        if s.audio is None:
            raise MlxVideoError(f"{self.spec.id} is driven by a voice track: pass --audio PATH (wav, mp3, m4a, flac)")
        if s.clips is not None:
            check_number("--clips", s.clips, minimum=1, integer=True)
            s.clips = int(s.clips)
        self.read_voice(s.audio)  # unreadable, silent or too short: refused now, before any weights are read
        if s.pose_video is not None:
            from mlx_video.interpolate import open_input

            source = open_input(s.pose_video)
            source.frames.close()
        return s

    def read_voice(self, path: str):
        """The voice track as mono 16 kHz samples (read once per file and kept), checked."""
        from mlx_video.audio.features import WAV2VEC2_SAMPLE_RATE, min_samples
        from mlx_video.audio.wav2vec2 import Wav2Vec2Config
        from mlx_video.io.audio import check_audio, read_audio

        file = Path(path)
        if not file.is_file():
            raise MlxVideoError(f"--audio {path}: no such file")
        key = (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)
        if key not in self._audio_cache:
            audio = read_audio(file, WAV2VEC2_SAMPLE_RATE)
            shortest = min_samples(Wav2Vec2Config.from_dict(self.folder.config(AUDIO_ENCODER)))
            check_audio(audio, file, min_duration=max(shortest / WAV2VEC2_SAMPLE_RATE, 1.0 / self.spec.fps))
            self._audio_cache = {key: audio}
        return self._audio_cache[key]

    def clip_count(self, s: GenerationSettings) -> int:
        """Clips the voice track covers (at least one), or fewer with --clips."""
        from mlx_video.audio.features import FEATURE_RATE, resampled_length
        from mlx_video.audio.wav2vec2 import Wav2Vec2Config

        samples = self.read_voice(s.audio).samples.shape[0]
        steps = resampled_length(Wav2Vec2Config.from_dict(self.folder.config(AUDIO_ENCODER)).output_length(samples))
        covered = (steps * s.fps) // (s.frames * FEATURE_RATE) + 1
        return covered if s.clips is None else min(covered, s.clips)

    def drops_first_motion(self, s: GenerationSettings) -> bool:
        """Whether the first clip runs without motion tokens (the release's default) rather than with the portrait
        as its motion context (--start-from-portrait)."""
        return bool(self.spec.default("drop_first_motion", True)) and not s.start_from_image

    def output_frames(self, s: GenerationSettings, clips: int | None = None) -> int:
        clips = self.clip_count(s) if clips is None else clips
        first = s.frames - (FIRST_CLIP_DROP if self.drops_first_motion(s) else 0)
        return first + s.frames * (clips - 1)

    # ---- the stages ----

    def encode_audio(self, s: GenerationSettings, progress: bool = False):
        """Per-video-frame features of every wav2vec2 layer for the whole track (mlx_video.audio.features)."""
        from mlx_video.audio.features import frame_audio_features
        from mlx_video.audio.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

        audio = self.read_voice(s.audio)
        with tqdm(total=1, desc="audio encoding", disable=not progress, leave=False) as bar:
            model = Wav2Vec2Model(Wav2Vec2Config.from_dict(self.folder.config(AUDIO_ENCODER)))
            self.folder.load_module(AUDIO_ENCODER, model)
            features = frame_audio_features(model, audio.samples, fps=s.fps, frames_per_clip=s.frames)
            mx.eval(features.features)
            bar.update()
        del model
        release()
        return features

    def load_transformer(self, name: str = HIGH_NOISE):
        from mlx_video.families.wan.s2v_model import WanS2VTransformer

        model = WanS2VTransformer(self.transformer_config, dtype=self.dtype)
        self.folder.load_module(name, model)
        self.fuse_run_loras(model, name)
        return model

    # LoRAs: the backbone's keys are Wan 14B's, so Wan LoRAs in either naming apply; S2V-only layers too.

    def lora_keymaps(self) -> list:
        from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER
        from mlx_video.families.wan.s2v_keys import OFFICIAL_S2V_TRANSFORMER

        return [DIFFUSERS_TRANSFORMER, OFFICIAL_S2V_TRANSFORMER]

    def lora_model(self, component: str):
        from mlx_video.families.wan.s2v_model import WanS2VTransformer

        return WanS2VTransformer(self.transformer_config)

    def load_vae(self):
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        return vae

    def pose_latents(self, s: GenerationSettings, vae, clips: int) -> list[mx.array] | None:
        """Per clip, the pose video's latents (1, frames/4, h, w, z), or None without a pose video.

        The official pipeline (`load_pose_cond`) reads the pose video from its start at one frame per
        round(rate / fps) source frames, maps them to [-1, 1] and fits them to the video size as float tensors:
        the shorter side resized with antialiased bilinear filtering, a centre crop, and 0 (mid-grey) where a
        frame does not cover. It then pads with black (-1) frames to the length of the chain and encodes each
        clip's frames behind a copy of its first frame, dropping that latent."""
        if s.pose_video is None:
            return None
        from mlx_video.interpolate import open_input
        from mlx_video.io.image import fit_float_short_side

        source = open_input(s.pose_video)
        every = max(1, round(float(source.fps) / s.fps)) if source.fps else 1
        wanted = clips * s.frames
        frames = []
        for i, frame in enumerate(source.frames):
            if i % every == 0:
                pixels = frame.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
                frames.append(fit_float_short_side(pixels, s.width, s.height, fill=0.0))
                if len(frames) == wanted:
                    break
        source.frames.close()
        video = np.full((wanted, s.height, s.width, 3), -1.0, np.float32)
        video[: len(frames)] = np.stack(frames)
        latents = []
        for r in range(clips):
            clip = mx.array(video[r * s.frames : (r + 1) * s.frames])[None]
            latents.append(vae.encode(mx.concatenate([clip[:, :1], clip], axis=1))[:, 1:])
        return latents

    def clip_noise(self, s: GenerationSettings, clip: int) -> mx.array:
        """The starting noise of clip `clip`, channels-last (1, T, h, w, C), seeded with seed + clip."""
        _, c, t, h, w = self.latent_shape(s)
        return mx.random.normal((1, c, t, h, w), key=mx.random.key(s.seed + clip)).transpose(0, 2, 3, 4, 1)

    def generate(
        self,
        settings: GenerationSettings,
        init_latents: np.ndarray | None = None,
        progress: bool = False,
        image: np.ndarray | None = None,
        hooks=(),
    ) -> GenerationResult:
        """The whole chain: `image` is the portrait, (height, width, 3) float in [-1, 1] at the video size;
        `settings.audio` the voice track. Returns the decoded video in `result.video` (uint8) and every clip's
        latents, one after the other, in `result.latents`."""
        if image is not None and settings.image is None:
            settings = GenerationSettings.from_dict({**settings.to_dict(), "image": "<array>"})
        s = self.resolve(settings)
        self.check_image_use(image is not None)
        from mlx_video.distributed import current_split

        if current_split(self.uses_cfg(s)) is not None:
            raise MlxVideoError(f"{self.spec.id} runs in one process for now (not CFG- or sequence-parallel); "
                                "launch it without mlx.launch")
        if init_latents is not None:
            raise MlxVideoError(f"{self.spec.id} starts every clip from its own seeded noise; --init-latents is not supported")
        if image.shape != (s.height, s.width, 3):
            raise MlxVideoError(f"the portrait is {image.shape}, expected ({s.height}, {s.width}, 3)")
        clips = self.clip_count(s)
        drop_first = self.drops_first_motion(s)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        context = self.encode_text([s.prompt, s.negative_prompt] if self.uses_cfg(s) else [s.prompt], progress)
        timings["text_encoding"] = time.perf_counter() - start
        start = time.perf_counter()
        audio = self.encode_audio(s, progress)
        timings["audio_encoding"] = time.perf_counter() - start

        start = time.perf_counter()
        vae = self.load_vae()
        reference = vae.encode(mx.array(image, dtype=mx.float32)[None, None])
        poses = self.pose_latents(s, vae, clips)
        timings["image_encoding"] = time.perf_counter() - start
        motion_pixels = mx.zeros((1, self.motion_frames, s.height, s.width, 3))
        if s.start_from_image:  # the official init_first_frame: the portrait as the buffer's last 6 frames
            held = min(START_FRAMES, self.motion_frames)
            motion_pixels[:, -held:] = mx.array(image, dtype=mx.float32)
        motion = None if drop_first else vae.encode(motion_pixels)
        self._run_loras = s.loras or []
        model = self.load_transformer()
        # Radial attention over each clip's video tokens (the reference and motion tokens after them are kept
        # whole); every clip is a denoising run of its own, so its first dense steps are dense again.
        _, channels, frames, height, width = self.latent_shape(s)
        radial = self.radial_for(s, (1, frames, height, width, channels))
        prepare_model(model, radial)
        text, negative = context[:1], (context[1:] if context.shape[0] > 1 else None)
        contexts, prepared = {"cond": text, "uncond": negative, "both": context}, {}

        def prepared_context(key: str):
            """The text embedding and cross-attention K/V of one pass (or of both, batched): computed the first
            time a clip's guidance asks for it, then reused by every step and clip."""
            if key not in prepared:
                prepared[key] = model.prepare_context(contexts[key])
            return prepared[key]

        guide = get_guidance(s.guidance_mode)
        tile = self.vae_tile("auto", reference.shape[2:4]).plan

        from mlx_video.pipelines.cache import make_step_cache

        videos, clip_latents, caches = [], [], []
        timings["denoising"] = timings["decoding"] = 0.0
        try:
            for r in range(clips):
                drop_motion = drop_first and r == 0
                clip_audio = audio.clip(r)[None]
                cond = {"audio": clip_audio, "context": text}
                uncond = None if negative is None else {"audio": mx.zeros_like(clip_audio), "context": negative}
                motion_in = motion if motion is not None else mx.zeros((1, 0, *reference.shape[2:]))
                clip_model = ClipInputs(model, prepared_context, text, reference, motion_in, None if poses is None else poses[r],
                                        drop_motion, self.dtype)
                step_cache = make_step_cache(s.cache, s.steps, None, self.spec.id)  # fresh per clip
                caches.append(step_cache)
                forward = partial(step_cache, clip_model)

                def predict(latents, i, t, forward=forward, cond=cond, uncond=uncond, step_cache=step_cache):
                    step_cache.begin_step(i, model)
                    if radial is not None:
                        radial.begin_step(i)
                    return guide(forward, latents, mx.array([float(t)], dtype=mx.float32), cond, uncond, s.guidance)

                start = time.perf_counter()
                latents = self.run_denoising(self.make_sampler(s), self.clip_noise(s, r), predict, s.steps, progress,
                                             hooks, lambda i, r=r: f"clip {r + 1}/{clips}")
                timings["denoising"] += time.perf_counter() - start
                clip_latents.append(latents)

                start = time.perf_counter()
                before = reference if drop_motion else motion
                keep = s.frames - (FIRST_CLIP_DROP if drop_motion else 0)
                pixels = self._decode_last(vae, mx.concatenate([before, latents.astype(mx.float32)], axis=1), keep, tile)
                videos.append(np.array(mx.clip(mx.round((pixels[0] + 1.0) * 127.5), 0, 255).astype(mx.uint8)))
                if r + 1 < clips:
                    overlap = min(self.motion_frames, pixels.shape[1])
                    motion_pixels = mx.concatenate([motion_pixels[:, overlap:], pixels[:, -overlap:]], axis=1)
                    motion = vae.encode(motion_pixels)
                    mx.eval(motion)
                timings["decoding"] += time.perf_counter() - start
        finally:
            model = vae = None  # the closures above still name them: release the weights before returning
            release()
        latents = mx.concatenate(clip_latents, axis=1)
        result = GenerationResult(reference_layout(latents), s, timings, [HIGH_NOISE] * (s.steps * clips))
        result.video = np.concatenate(videos, axis=0)
        per_clip = [c.stats() for c in caches]
        result.stats = {
            "clips": clips, "cache": per_clip[0]["cache"], "cache_threshold": per_clip[0]["cache_threshold"],
            "transformer_evals": sum(c["transformer_evals"] for c in per_clip),
            "transformer_evals_uncached": sum(c["transformer_evals_uncached"] for c in per_clip),
            "reused_steps": [c["reused_steps"] for c in per_clip],  # per clip
            "forecast_steps": [c["forecast_steps"] for c in per_clip], "cache_config": per_clip[0]["cache_config"],
        }
        if radial is not None:
            result.stats.update(radial.stats())
        return result

    @staticmethod
    def _decode_last(vae, latents: mx.array, keep: int, tile) -> mx.array:
        """The last `keep` frames of the decoded `latents` (1, F, H, W, 3) float32 in [-1, 1]; earlier chunks are
        decoded (the decoder is causal) but not kept."""
        total = 1 + 4 * (latents.shape[1] - 1)
        kept, seen = [], 0
        for chunk in vae.decode_chunks(latents, tile):
            seen += chunk.shape[1]
            if seen > total - keep:
                kept.append(chunk[:, max(0, chunk.shape[1] - (seen - (total - keep))):].astype(mx.float32))
        return mx.concatenate(kept, axis=1)

    # ---- what the shared parts ask ----

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """The Wan cost model for one clip's video tokens, plus what S2V keeps beside them: the reference and
        motion tokens, and the VAE, which stays loaded through the chain. An estimate, not a measurement."""
        estimate = super().estimate_memory(s, tiling, has_image)
        _, _, t, _, _ = self.latent_shape(s)
        # In latent frames' worth of tokens: the reference (1), the nearest motion frame (1), the 2x-packed pair
        # (1/4: a quarter of the tokens per frame) and the 4x-packed 16 frames (4 groups of 1/16).
        extra_tokens = (1 + 1 + 1 / 4 + 4 / 16) / max(1, t)
        vae = self.component_bytes("vae")
        stages = dict(estimate["stages"])
        if "denoising" in stages:
            transformer = self.component_bytes(HIGH_NOISE)
            stages["denoising"] = int(transformer + (stages["denoising"] - transformer) * (1 + extra_tokens) + vae)
        stages["audio_encoding"] = self.component_bytes(AUDIO_ENCODER) * 2
        peak = max(stages, key=stages.get)
        estimate.update(stages=stages, peak_stage=peak, peak_bytes=stages[peak])
        return estimate

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False):
        raise MlxVideoError(f"{self.spec.id} decodes each clip as it makes it (the next clip starts from its pixels); "
                            "its latents cannot be decoded on their own")
