"""Wan2.2-Animate-14B: a character image driven by a performer's pose and face videos (animate mode), or put in
place of the performer in the original video (replace mode, with the background video and a mask of where the
character goes).

The video is made in segments, as diffusers' `WanAnimatePipeline` (0.42.1) makes it:

- the pose video's length N sets the frame count; the pose, face, background and mask videos are padded to
  1 + k (L - 1) frames by reflection (frames ..., N-2, N-1, N-2, ...), where L = --segment-frames (77);
- segment j covers frames [j (L - 1), j (L - 1) + L): it denoises 1 + (L - 1) / 4 latent frames plus one in
  front for the character, its input being [noise | mask (4 channels) | conditioning latents]. The
  conditioning is the character's latent (mask 1) followed by the latents of a conditioning video: the
  previous segment's last decoded frame (float, not rounded; none for the first segment), then black frames
  (animate) or the background video (replace). The mask is 1 on the carried frame, and in replace mode it is
  1 - the mask video, sampled to the latent grid with nearest-neighbour;
- the pose video's latents are added to the video tokens; the face crops go through the motion encoder and
  face blocks; with guidance > 1 the unconditional pass takes the negative prompt and a face video of -1;
- each segment decodes its latents after the character frame and keeps its frames, less the carried one
  after the first segment; the video is cut to N frames.

The character image is fitted as diffusers fits it (inside the video size, Lanczos, centred on black) for the
VAE, and preprocessed as `CLIPImageProcessor` does for the CLIP image encoder (`clip_vision.py`).

`--init-latents` holds one noise draw per segment, stacked on axis 0: (segments, C, T + 1, h, w); the saved
latents have the same layout (each segment's final latents). Without it, segment j's noise is seeded with
seed + j.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.wan.pipeline import HIGH_NOISE, WanPipeline
from mlx_video.pipelines.base import GenerationResult, GenerationSettings, reference_layout, release
from mlx_video.pipelines.loop import get_guidance

IMAGE_ENCODER = "image_encoder"
CARRIED = 1  # frames each segment takes from the one before (diffusers' prev_segment_conditioning_frames)
MODES = ("animate", "replace")


def reflect_indices(count: int, target: int) -> list[int]:
    """Frame indices padding `count` frames to `target` by reflection: 0, 1, ..., count-1, count-2, ..., 0, 1, ..."""
    if count < 2:
        raise MlxVideoError("the pose video needs at least 2 frames")
    period = 2 * (count - 1)
    return [i % period if i % period < count else period - i % period for i in range(target)]


def segment_plan(count: int, length: int) -> tuple[int, int]:
    """(segments, padded frame count) for `count` pose frames in segments of `length` carrying CARRIED frames."""
    step = length - CARRIED
    segments = max(1, -(-(count - CARRIED) // step))
    return segments, segments * step + CARRIED


def fit_character(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """diffusers' `WanAnimateImageProcessor` "fill" with fill colour 0: the image scaled to fit inside
    (Lanczos, on 8 bits; the scaled side truncated), centred on black; float32 in [-1, 1]. The pipeline asks for
    bilinear, but its processor's `super().__init__()` registers the defaults again, so Lanczos is what runs
    (diffusers 0.42.1)."""
    from PIL import Image

    ih, iw = image.shape[:2]
    if width / height < iw / ih:
        sw, sh = width, ih * width // iw
    else:
        sw, sh = iw * height // ih, height
    canvas = Image.new("RGB", (width, height))
    canvas.paste(Image.fromarray(image).resize((sw, sh), Image.Resampling.LANCZOS),
                 (width // 2 - sw // 2, height // 2 - sh // 2))
    return np.asarray(canvas).astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def latent_mask(pixel_mask: np.ndarray | None, frames: int, grid: tuple[int, int], carried: int) -> mx.array:
    """The (1, T, h, w, 4) mask channels of a segment: per pixel frame 1 where it is given (the first `carried`
    frames; in replace mode also where the mask video is black), the first frame counted four times, then four
    pixel frames per latent frame as channels (diffusers' `get_i2v_mask`)."""
    h, w = grid
    if pixel_mask is None:
        m = np.zeros((frames, h, w), np.float32)
    else:  # nearest-neighbour to the latent grid (torch's "nearest": source index floor(i * in / out))
        rows = (np.arange(h) * pixel_mask.shape[1]) // h
        cols = (np.arange(w) * pixel_mask.shape[2]) // w
        m = (1.0 - pixel_mask[:, rows][:, :, cols]).astype(np.float32)
    m[:carried] = 1.0
    m = np.concatenate([np.repeat(m[:1], 4, axis=0), m[1:]], axis=0)
    return mx.array(m.reshape(-1, 4, h, w).transpose(0, 2, 3, 1))[None]


@dataclass
class AnimateInputs:
    """What drives a run, at the video size, padded to the segments: 8-bit frames (a quarter of float32's memory;
    `unit_range` and `mask_values` give each segment's floats, the values diffusers' processors make)."""

    character: np.ndarray  # (H0, W0, 3) uint8, as read
    pose: np.ndarray  # (F, height, width, 3) uint8
    face: np.ndarray  # (F, S, S, 3) uint8, S the motion encoder's crop size
    background: np.ndarray | None  # (F, height, width, 3) uint8, replace mode
    mask: np.ndarray | None  # (F, height, width) uint8 greyscale (white = the character), replace mode
    count: int  # the pose video's frames: the output's length


class SegmentModel:
    """The transformer as the guidance calls it, `forward(x, t, cond)`, for one segment: `cond` holds what differs
    between the passes (the embedded text, the face motion tokens); the character's CLIP tokens, the pose latents
    and the conditioning channels are the segment's, repeated over the batch."""

    def __init__(self, model, image: mx.array, pose: mx.array, reference: mx.array, dtype):
        self.model, self.image, self.pose, self.reference, self.dtype = model, image, pose, reference, dtype

    def __call__(self, latents: mx.array, t: mx.array, cond: dict) -> mx.array:
        from mlx_video.families.wan.image_context import ImageContext

        batch = latents.shape[0]

        def tile(a):
            return mx.broadcast_to(a, (batch, *a.shape[1:]))

        x = mx.concatenate([latents, tile(self.reference)], axis=-1).astype(self.dtype)
        context = ImageContext(cond["text"], None, tile(self.image))
        return self.model(x, t, context, pose=tile(self.pose).astype(self.dtype), motion=cond["motion"])


class WanAnimatePipeline(WanPipeline):
    takes_pose_video = True
    takes_mask_video = True  # replace mode
    takes_animate = True

    def __init__(self, folder):
        super().__init__(folder)
        from mlx_video.families.wan.animate_model import WanAnimateConfig

        self.transformer_config = WanAnimateConfig.from_dict(folder.config(HIGH_NOISE))
        self._inputs_cache: dict = {}

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.out_channels

    @property
    def image_mode(self) -> str | None:
        return "reference"

    def check_image_use(self, has_image: bool) -> None:
        if not has_image:
            raise MlxVideoError(f"{self.spec.id} animates a character: pass --image PATH (with --pose-video and "
                                "--face-video)")

    # ---- settings and inputs, checked before any weights are read ----

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        s = super().resolve(settings)
        if not self.folder.has(IMAGE_ENCODER):
            raise MlxVideoError(f"{self.folder.path} has no {IMAGE_ENCODER}/ (the CLIP image encoder); re-convert it "
                                "from a folder with it")
        if s.cache is not None:
            raise MlxVideoError(f"--cache is not supported for {self.spec.id} yet: its face blocks sit between the "
                                "transformer blocks a step cache skips")
        if s.attention not in (None, "dense"):
            raise MlxVideoError(f"--attention {s.attention} is not supported for {self.spec.id} yet (dense only)")
        mode = s.animate_mode or ("replace" if s.background_video or s.mask_video else "animate")
        if mode not in MODES:
            raise MlxVideoError(f"--animate-mode takes animate or replace, not {mode!r}")
        s.animate_mode = mode
        if s.image is None:
            self.check_image_use(False)
        for name, flag in (("pose_video", "--pose-video"), ("face_video", "--face-video")):
            if getattr(s, name) is None:
                raise MlxVideoError(f"{self.spec.id} needs {flag} (the preprocessed {name.split('_')[0]} video; see "
                                    "the README's Animate section)")
        missing = [f for f, v in (("--background-video", s.background_video), ("--mask-video", s.mask_video)) if v is None]
        if mode == "replace" and missing:
            raise MlxVideoError(f"--animate-mode replace needs {' and '.join(missing)}")
        if mode == "animate" and not missing:
            raise MlxVideoError("--background-video and --mask-video are for --animate-mode replace")
        if mode == "animate" and len(missing) == 1:
            given = "--mask-video" if s.mask_video else "--background-video"
            raise MlxVideoError(f"{given} is for --animate-mode replace, which needs both --background-video and --mask-video")
        self.read_inputs(s)
        return s

    def read_inputs(self, s: GenerationSettings) -> AnimateInputs:
        """The character and the driving videos, read, checked and fitted (kept for the run that follows)."""
        key = tuple(str(v) for v in (s.image, s.pose_video, s.face_video, s.background_video, s.mask_video,
                                     s.width, s.height, s.frames, s.animate_mode))
        if key not in self._inputs_cache:
            self._inputs_cache = {key: self._read_inputs(s)}
        return self._inputs_cache[key]

    def _read_inputs(self, s: GenerationSettings) -> AnimateInputs:
        from mlx_video.io.image import load_image

        if not Path(s.image).is_file():
            raise MlxVideoError(f"--image {s.image}: no such file")
        character = load_image(s.image)
        pose = _read_video("--pose-video", s.pose_video)
        count = pose.shape[0]
        if count <= CARRIED:
            raise MlxVideoError(f"--pose-video {s.pose_video} has {count} frame; Animate needs at least 2")
        _, padded = segment_plan(count, s.frames)
        size = self.transformer_config.motion_size
        videos = {"pose": pose}
        for name, path in (("face", s.face_video), ("background", s.background_video), ("mask", s.mask_video)):
            if path is not None:
                videos[name] = _read_video(f"--{name}-video", path)
                if videos[name].shape[0] < count:
                    raise MlxVideoError(f"--{name}-video {path} has {videos[name].shape[0]} frames; the pose video "
                                        f"has {count}, and each segment needs all of them")
        # each video padded by reflecting its own frames, as diffusers' pad_video_frames does
        videos = {k: v[reflect_indices(v.shape[0], padded)] for k, v in videos.items()}
        face = _fit("face", videos["face"], size, size)
        background = mask = None
        if "background" in videos:
            background = _fit("background", videos["background"], s.width, s.height)
            mask = _fit_mask(videos["mask"], s.width, s.height)
        return AnimateInputs(character, _fit("pose", videos["pose"], s.width, s.height), face, background, mask, count)

    def check_init_latents(self, s: GenerationSettings, latents: np.ndarray) -> np.ndarray:
        segments, _ = segment_plan(self.read_inputs(s).count, s.frames)
        _, c, t, h, w = self.latent_shape(s)
        expected = (segments, c, t + 1, h, w)
        if latents.ndim != 5 or tuple(latents.shape) != expected:
            raise MlxVideoError(f"--init-latents has shape {tuple(latents.shape)}; this run needs {expected} (one noise "
                                "draw per segment: segments, channels, 1 + latent frames, height/8, width/8)")
        if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
            raise MlxVideoError("--init-latents must hold finite floats")
        return latents.astype(np.float32)

    def output_frames(self, s: GenerationSettings) -> int:
        return self.read_inputs(s).count

    # ---- the stages ----

    def encode_character(self, character: np.ndarray, progress: bool) -> mx.array:
        """The CLIP image encoder's `hidden_states[-2]` for the character, (1, tokens, width)."""
        from mlx_video.families.wan.clip_tokens import clip_tokens

        return clip_tokens(self.folder, [character], progress)

    def load_transformer(self, name: str = HIGH_NOISE):
        from mlx_video.families.wan.animate_model import WanAnimateTransformer

        model = WanAnimateTransformer(self.transformer_config, dtype=self.dtype)
        self.folder.load_module(name, model)
        self.fuse_run_loras(model, name)
        return model

    def lora_keymaps(self) -> list:
        from mlx_video.families.wan.animate_keys import DIFFUSERS_ANIMATE, OFFICIAL_ANIMATE

        return [DIFFUSERS_ANIMATE, OFFICIAL_ANIMATE]

    def lora_parts(self, component: str) -> dict[str, tuple[int, ...]]:
        """The face blocks' fused k|v (diffusers' to_k and to_v): two slices of the width."""
        dim = self.transformer_config.dim
        return {f"face_blocks.{i}.kv": (dim, dim) for i in range(self.transformer_config.face_blocks)}

    def lora_model(self, component: str):
        from mlx_video.families.wan.animate_model import WanAnimateTransformer

        return WanAnimateTransformer(self.transformer_config)

    def load_vae(self):
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        return vae

    def segment_condition(self, vae, inputs: AnimateInputs, s: GenerationSettings, start: int, previous) -> mx.array:
        """(1, T, h, w, 4 + z): the mask channels and latents of the segment's conditioning video."""
        length, grid = s.frames, (s.height // self.vae_stride[1], s.width // self.vae_stride[2])
        if inputs.background is not None:
            video = mx.array(unit_range(inputs.background[start:start + length]))[None]
            if previous is not None:
                video = mx.concatenate([previous, video[:, CARRIED:]], axis=1)
            mask = mask_values(inputs.mask[start:start + length])
        else:
            video = mx.zeros((1, length, s.height, s.width, 3))
            if previous is not None:
                video = mx.concatenate([previous, video[:, CARRIED:]], axis=1)
            mask = None
        latents = vae.encode(video)
        return mx.concatenate([latent_mask(mask, length, grid, CARRIED if start > 0 else 0), latents], axis=-1)

    def segment_noise(self, s: GenerationSettings, index: int, init_latents) -> mx.array:
        if init_latents is not None:
            return mx.array(init_latents[index][None]).transpose(0, 2, 3, 4, 1)
        _, c, t, h, w = self.latent_shape(s)
        return mx.random.normal((1, c, t + 1, h, w), key=mx.random.key(s.seed + index)).transpose(0, 2, 3, 4, 1)

    def segment_store(self, s: GenerationSettings, init_latents, beside: Path | None):
        """Where finished segments are kept (beside the output) so that an interrupted run resumes: keyed on the
        model folder, the settings, every input file's bytes and the initial noise (mlx_video.chains.SegmentStore)."""
        if beside is None:
            return None
        import hashlib

        from mlx_video.chains import SegmentStore
        from mlx_video.distributed import folder_fingerprint
        from mlx_video.io.source_video import input_sha256

        files = {name: input_sha256(getattr(s, name)) for name in ("image", "pose_video", "face_video",
                                                                   "background_video", "mask_video")
                 if getattr(s, name) is not None}
        noise = None if init_latents is None else hashlib.sha256(np.ascontiguousarray(init_latents).tobytes()).hexdigest()
        key = {"model": folder_fingerprint(self.folder.path), "settings": s.to_dict(), "files": files, "noise": noise}
        return SegmentStore(Path(beside), key)

    def generate(self, settings: GenerationSettings, init_latents: np.ndarray | None = None, progress: bool = False,
                 image: np.ndarray | None = None, hooks=(), segments_beside: Path | None = None) -> GenerationResult:
        """Every segment, one after the other; returns the video (`result.video`, uint8) and each segment's final
        latents stacked on axis 0 (`result.latents`). The character comes from `settings.image` (its file: CLIP
        takes it unfitted); `image` is not used. `segments_beside`: the output, beside which finished segments
        are kept until the run ends, and read back by the same command after an interruption."""
        s = self.resolve(settings)
        from mlx_video.distributed import current_split

        if current_split(self.uses_cfg(s)) is not None:
            raise MlxVideoError(f"{self.spec.id} runs in one process for now; launch it without mlx.launch")
        inputs = self.read_inputs(s)
        segments, _ = segment_plan(inputs.count, s.frames)
        if init_latents is not None:
            init_latents = self.check_init_latents(s, init_latents)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        context = self.encode_text([s.prompt, s.negative_prompt] if self.uses_cfg(s) else [s.prompt], progress)
        timings["text_encoding"] = time.perf_counter() - start
        start = time.perf_counter()
        clip_tokens = self.encode_character(inputs.character, progress)
        vae = self.load_vae()
        reference = vae.encode(mx.array(fit_character(inputs.character, s.width, s.height))[None, None])
        reference = mx.concatenate([mx.ones(reference.shape[:-1] + (4,)), reference], axis=-1)
        timings["image_encoding"] = time.perf_counter() - start
        self._run_loras = s.loras or []
        model = self.load_transformer()
        text = model.text_embedding(context)
        image_tokens = model.image_embedding(clip_tokens.astype(self.dtype))
        guide = get_guidance(s.guidance_mode)
        store = self.segment_store(s, init_latents, segments_beside)
        videos, finals, previous = [], [], None
        done = 0 if store is None else min(store.finished(), segments)
        for j in range(done):  # kept by an interrupted run of the same command
            kept = store.load(j)
            videos.append(kept["frames"])
            finals.append(kept["latents"])
            previous = mx.array(kept["last_frame"])
        if done and progress:
            tqdm.write(f"resuming: segments 1-{done} of {segments} read back from {store.folder}")
        timings["denoising"] = timings["decoding"] = timings["conditioning"] = 0.0
        try:
            for j in range(done, segments):
                latents, pixels = self.run_segment(j, s, inputs, vae, model, text, image_tokens, reference, previous,
                                                   init_latents, guide, progress, hooks, timings)
                finals.append(reference_layout(latents))
                keep = pixels if j == 0 else pixels[:, CARRIED:]
                videos.append(np.array(mx.clip(mx.round((keep[0] + 1.0) * 127.5), 0, 255).astype(mx.uint8)))
                previous = pixels[:, -CARRIED:]
                if store is not None:
                    store.save(j, videos[-1], None, finals[-1], np.array(previous), {}, {})
        finally:
            model = vae = None
            release()
        if store is not None:
            store.remove()
        stacked = np.concatenate(finals, axis=0)
        result = GenerationResult(stacked, s, timings, [HIGH_NOISE] * (s.steps * segments))
        result.video = np.concatenate(videos, axis=0)[:inputs.count]
        result.stats = {"segments": segments, "animate_mode": s.animate_mode, "transformer_evals":
                        s.steps * segments * (2 if self.uses_cfg(s) else 1)}
        return result

    def run_segment(self, j, s, inputs, vae, model, text, image_tokens, reference, previous, init_latents, guide,
                    progress, hooks, timings):
        """Denoise and decode segment j: its final latents (1, T + 1, h, w, z) and decoded frames (1, L, H, W, 3)."""
        length = s.frames
        begin = j * (length - CARRIED)
        start = time.perf_counter()
        pose = vae.encode(mx.array(unit_range(inputs.pose[begin:begin + length]))[None])
        condition = mx.concatenate([reference, self.segment_condition(vae, inputs, s, begin, previous)], axis=1)
        faces = mx.array(unit_range(inputs.face[begin:begin + length]))[None]
        cond = {"text": text[:1], "motion": model.encode_face(faces)}
        uncond = None
        if self.uses_cfg(s):  # the unconditional pass: the negative prompt and a face video of -1
            uncond = {"text": text[1:], "motion": model.encode_face(mx.full(faces.shape, -1.0))}
        mx.eval(pose, condition, cond, uncond)
        timings["conditioning"] += time.perf_counter() - start
        forward = SegmentModel(model, image_tokens, pose, condition, self.dtype)

        def predict(latents, i, t):
            return guide(forward, latents, mx.array([float(t)], dtype=mx.float32), cond, uncond, s.guidance)

        start = time.perf_counter()
        segments = segment_plan(inputs.count, length)[0]
        latents = self.run_denoising(self.make_sampler(s), self.segment_noise(s, j, init_latents), predict, s.steps,
                                     progress, hooks, lambda i: f"segment {j + 1}/{segments}")
        timings["denoising"] += time.perf_counter() - start
        start = time.perf_counter()
        tile = self.vae_tile("auto", latents.shape[2:4]).plan
        pixels = mx.concatenate(list(vae.decode_chunks(latents[:, 1:], tile)), axis=1).astype(mx.float32)
        timings["decoding"] += time.perf_counter() - start
        return latents, pixels

    # ---- what the shared parts ask ----

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """The Wan cost model for one segment (one latent frame more: the character), plus the VAE, which stays
        loaded through the segments, and the CLIP image encoder's stage. An estimate, not a measurement."""
        bigger = GenerationSettings.from_dict({**s.to_dict(), "frames": s.frames + self.vae_stride[0]})
        estimate = super().estimate_memory(bigger, tiling, has_image)
        stages = dict(estimate["stages"])
        if "denoising" in stages:
            stages["denoising"] += self.component_bytes("vae")
        stages["image_encoding"] = max(stages.get("image_encoding", 0), 2 * self.component_bytes(IMAGE_ENCODER))
        peak = max(stages, key=stages.get)
        estimate.update(stages=stages, peak_stage=peak, peak_bytes=stages[peak])
        return estimate

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False):
        raise MlxVideoError(f"{self.spec.id} decodes each segment as it makes it (the next segment starts from its "
                            "pixels); its latents cannot be decoded on their own")


def _read_video(flag: str, path: str) -> np.ndarray:
    from mlx_video.io.source_video import read_frames

    if not Path(path).exists():
        raise MlxVideoError(f"{flag} {path}: no such file or folder")
    try:
        return read_frames(path, 1 << 20)
    except MlxVideoError as e:
        raise MlxVideoError(str(e).replace("--video", flag)) from None


def _fit(name: str, frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Frames resized (if they differ) as diffusers' VideoProcessor does: stretched with Lanczos on 8 bits (as
    `mlx_video.io.image.fit_image` "stretch"); uint8."""
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames])


def unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames as float32 in [-1, 1], with the float32 operations of `fit_image` (and diffusers)."""
    return frames.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def mask_values(frames: np.ndarray) -> np.ndarray:
    """uint8 greyscale mask frames as float32 in [0, 1] (diffusers' mask processor: x / 255)."""
    return frames.astype(np.float32) / np.float32(255.0)


def _fit_mask(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mask frames as diffusers' mask processor reads them: 8-bit greyscale (Pillow's "L"), stretched with
    Lanczos to the video size (`mask_values` divides by 255)."""
    from PIL import Image

    out = []
    for frame in frames:
        grey = Image.fromarray(frame).convert("L")
        if grey.size != (width, height):
            grey = grey.resize((width, height), Image.Resampling.LANCZOS)
        out.append(np.asarray(grey))
    return np.stack(out)
