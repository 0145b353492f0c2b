"""Wan VACE generation: the Wan pipeline (text, the shared loop, one or two experts) with the VACE context
branch conditioned on a control video, a video to inpaint / outpaint / extend with its mask, and reference
images (`mlx_video.families.wan.vace_conditioning`), as diffusers' `WanVACEPipeline` runs it.

The inputs are read and checked before any weights load (`source_inputs`, called by `mlx_video.run.prepare`);
the conditioning is encoded by the VAE before the text, then every expert that loads gets it with its
`--control-scale`. Reference images add latent frames in front of the video's: the noise (`--init-latents`)
and the saved latents hold them, the decoded video does not.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.wan.pipeline import HIGH_NOISE, WanPipeline, warm_up
from mlx_video.families.wan.vace_conditioning import (
    conditioning_latents,
    extended,
    outpainted,
    parse_outpaint,
    reference_canvas,
)
from mlx_video.families.wan.vace_model import WanVACEConfig, WanVACETransformer
from mlx_video.pipelines.base import GenerationSettings

DEFAULT_CONTROL_SCALE = 1.0  # diffusers' conditioning_scale default
COLOUR_LEVELS = 48  # a mask pixel whose channels differ by more is colour (video compression moves grey far less)


def check_greyscale(frames: np.ndarray, what: str) -> None:
    """Refuse a colour mask: VACE reads a mask's first channel (white = generate), which a colour picture only
    looks like."""
    spread = frames.max(axis=-1).astype(np.int16) - frames.min(axis=-1)
    if int(spread.max()) > COLOUR_LEVELS:
        raise MlxVideoError(f"{what} is in colour (channels up to {int(spread.max())} levels apart); a mask is "
                            "greyscale: white = generate, black = keep")


class WanVACEPipeline(WanPipeline):
    takes_vace = True  # --control-video, --mask(-video), --reference-image, --control-scale, --outpaint
    takes_mask_video = True

    def __init__(self, folder):
        super().__init__(folder)
        self.transformer_config = WanVACEConfig.from_dict(folder.config(HIGH_NOISE))
        self._control = None
        self._control_scale = None

    @classmethod
    def capable(cls, spec, need: str) -> bool:
        if need == "takes_video":  # the clip to inpaint, outpaint or extend (never re-noised by --strength)
            return True
        if need == "takes_last_image":
            return False
        return super().capable(spec, need)

    @property
    def image_mode(self) -> str | None:
        return None

    def check_image_use(self, has_image: bool) -> None:
        if has_image:
            raise MlxVideoError(f"{self.spec.id} takes images as --reference-image (kept in view), not --image")
        super().check_image_use(has_image)

    # ---- settings ----

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        if settings.strength is not None:
            raise MlxVideoError(f"--strength re-noises a video (video-to-video); {self.spec.id} keeps what the "
                                "--mask leaves black and generates the rest: drop --strength")
        s = super().resolve(settings)
        if s.control_scale is None:
            s.control_scale = DEFAULT_CONTROL_SCALE
        self._check_vace_settings(s)
        return s

    def _fill_defaults(self, s: GenerationSettings) -> None:
        super()._fill_defaults(s)
        s.strength = None  # the shared default fills a video-to-video strength wherever a --video is given

    def _check_vace_settings(self, s: GenerationSettings) -> None:
        if s.video is not None and s.control_video is not None:
            raise MlxVideoError("give --video (the clip to inpaint, outpaint or extend) or --control-video, not both")
        if s.mask is not None and s.mask_video is not None:
            raise MlxVideoError("give --mask (one mask for every frame) or --mask-video, not both")
        masked = s.mask is not None or s.mask_video is not None
        if masked and s.video is None and s.control_video is None:
            raise MlxVideoError("--mask and --mask-video say which pixels of a video to generate: give the --video "
                                "(or --control-video) too")
        if s.outpaint is not None:
            if s.video is None:
                raise MlxVideoError("--outpaint extends a --video beyond its edges: give the --video")
            if masked:
                raise MlxVideoError("--outpaint builds its own mask: drop --mask / --mask-video")
            parse_outpaint(s.outpaint, s.width, s.height)
        if s.cache is not None and s.cache.split(":")[0] == "magcache":
            raise MlxVideoError(f"--cache magcache has no table for {self.spec.id} (its tables are measured per "
                                "model); use easycache, fbcache or taylorseer")
        if s.attention is not None and s.attention.split(":")[0] == "radial":
            raise MlxVideoError(f"--attention radial is not supported on {self.spec.id}: the reference radial "
                                "attention covers plain Wan, not the VACE context blocks or reference frames")
        from mlx_video.distributed import current_split

        split = current_split(self.uses_cfg(s))
        if split is not None and split.seq_ranks > 1:
            raise MlxVideoError(f"{self.spec.id} does not run sequence-parallel (its context blocks see every token): "
                                "run it on one process, or on two with guidance (CFG-parallel)")

    def latent_shape(self, s: GenerationSettings) -> tuple[int, int, int, int, int]:
        """The video's latents with one more frame in front per reference image (diffusers' layout)."""
        b, c, t, h, w = super().latent_shape(s)
        return b, c, t + len(s.reference_images or ()), h, w

    # ---- inputs, read and checked before any weights load ----

    def source_inputs(self, o: dict, s: GenerationSettings, image_fit: str, source: np.ndarray | None) -> dict:
        """generate()'s `video` (F, H, W, 3) and `mask` (F, H, W) and `reference_images` from the options: the
        --video / --control-video frames fitted to the video size (outpainted or extended where asked), the
        mask read and fitted the same way, the reference images on their canvas."""
        from mlx_video.io.image import load_image

        video = mask = None
        if source is not None and s.outpaint is not None:
            video, mask = outpainted(source, parse_outpaint(s.outpaint, s.width, s.height), s.width, s.height,
                                     image_fit)
        elif source is not None:
            from mlx_video.io.source_video import fit_frames_to

            video = fit_frames_to(source, s.width, s.height, image_fit)
            mask = self._read_mask(s, source.shape[1:3], image_fit)
            if video.shape[0] < s.frames:
                if mask is not None or s.video is None:
                    raise MlxVideoError(f"the video has {video.shape[0]} frames, --frames {s.frames} needs "
                                        f"{s.frames} (a shorter --video is extended only without a mask)")
                video, mask = extended(video, s.frames)
        references = [reference_canvas(load_image(path), s.width, s.height) for path in s.reference_images or ()]
        return {"video": video, "mask": mask, "reference_images": references}

    def _read_mask(self, s: GenerationSettings, size: tuple[int, int], image_fit: str) -> np.ndarray | None:
        """The mask (frames, H, W) in [0, 1] (white = generate), fitted as the video is; it must have the video's
        size, and --mask-video at least --frames frames."""
        from mlx_video.io.image import load_image
        from mlx_video.io.source_video import fit_frames_to, read_frames

        if s.mask is not None:
            frames = load_image(s.mask)[None]
            what = f"--mask {s.mask}"
        elif s.mask_video is not None:
            frames = read_frames(s.mask_video, s.frames, "--mask-video")
            what = f"--mask-video {s.mask_video}"
            if frames.shape[0] < s.frames:
                raise MlxVideoError(f"{what} has {frames.shape[0]} frames; --frames {s.frames} needs {s.frames}")
        else:
            return None
        check_greyscale(frames, what)
        if frames.shape[1:3] != tuple(size):
            raise MlxVideoError(f"{what} is {frames.shape[2]}x{frames.shape[1]}, the video {size[1]}x{size[0]}: the "
                                "mask must have the video's size")
        fitted = (fit_frames_to(frames, s.width, s.height, image_fit)[..., 0] + 1.0) / 2.0
        fitted = np.clip(fitted, 0.0, 1.0)
        return np.repeat(fitted, s.frames, axis=0) if fitted.shape[0] == 1 else fitted

    # ---- generation ----

    def encode_conditioning(self, s: GenerationSettings, video, mask, references, progress: bool = False) -> mx.array:
        """The context branch's input from the VAE (`vace_conditioning.conditioning_latents`): no video is mid
        grey (0) everywhere, no mask generates everything."""
        from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

        shape = (s.frames, s.height, s.width)
        video = np.zeros((*shape, 3), np.float32) if video is None else np.asarray(video, np.float32)
        mask = np.ones(shape, np.float32) if mask is None else np.asarray(mask, np.float32)
        if video.shape != (*shape, 3) or mask.shape != shape:
            raise MlxVideoError(f"the VACE video is {video.shape} and its mask {mask.shape}; expected {(*shape, 3)} "
                                f"and {shape}")
        vae = WanVAE(WanVAEConfig.from_dict(self.folder.config("vae")))
        self.folder.load_module("vae", vae)
        with tqdm(total=1, desc="conditioning encoding", disable=not progress, leave=False) as bar:
            control = conditioning_latents(vae.encode, video, mask, list(references or ()), self.vae_stride)
            mx.eval(control)
            bar.update()
        del vae  # freed by its count (no cycles): the text encoding's release() collects and clears the cache next
        mx.clear_cache()
        return control

    def generate(self, settings: GenerationSettings, init_latents: np.ndarray | None = None, progress: bool = False,
                 image: np.ndarray | None = None, hooks=(), last_image=None, video: np.ndarray | None = None,
                 mask: np.ndarray | None = None, reference_images=None):
        """As `WanPipeline.generate`, conditioned by VACE: `video` (frames, height, width, 3) in [-1, 1] (the
        control video, or the clip with `mask` (frames, height, width) in [0, 1], white = generate), and
        `reference_images` (height, width, 3) canvases (`reference_canvas`). `init_latents` includes one latent
        frame per reference image in front; so do the result's latents."""
        named = {}
        if reference_images and not settings.reference_images:
            named["reference_images"] = ["<array>"] * len(reference_images)
        if video is not None and settings.video is None and settings.control_video is None:
            named["control_video"] = "<array>"
        s = self.resolve(GenerationSettings.from_dict({**settings.to_dict(), **named}) if named else settings)
        if len(reference_images or ()) != len(s.reference_images or ()):
            raise MlxVideoError(f"{len(reference_images or ())} reference images given for the settings' "
                                f"{len(s.reference_images or ())}")
        self._control_scale = s.control_scale
        start = time.perf_counter()
        self._control = self.encode_conditioning(s, video, mask, reference_images, progress)
        encoding = time.perf_counter() - start
        try:
            result = super().generate(s, init_latents, progress, image, hooks, last_image)
        finally:
            self._control = None
        result.timings["conditioning_encoding"] = encoding
        return result

    def load_transformer(self, name: str):
        config = self.transformer_config if name == HIGH_NOISE else WanVACEConfig.from_dict(self.folder.config(name))
        model = WanVACETransformer(config, dtype=self.dtype)
        self.folder.load_module(name, model)
        self.fuse_run_loras(model, name)
        pt, ph, pw = config.patch_size
        model.set_control(mx.zeros((1, pt, ph, pw, config.vace_in_channels), dtype=self.dtype))
        warm_up(model, config, self.dtype)
        model.set_control(self._control, self._scales())
        return model

    def _scales(self) -> float:
        return float(DEFAULT_CONTROL_SCALE if self._control_scale is None else self._control_scale)

    def lora_keymaps(self) -> list:
        from mlx_video.families.wan.vace_keys import DIFFUSERS_VACE_TRANSFORMER, OFFICIAL_VACE_TRANSFORMER

        return [DIFFUSERS_VACE_TRANSFORMER, OFFICIAL_VACE_TRANSFORMER]

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """The Wan estimate (with the context blocks, their hints and the conditioning: the cost model reads the
        VACE config), counting each reference image as one more latent frame (4 frames of tokens), and the VAE
        encoding the conditioning always runs."""
        refs = len(s.reference_images or ())
        if refs:
            s = GenerationSettings.from_dict({**s.to_dict(), "frames": s.frames + refs * self.vae_stride[0]})
        return super().estimate_memory(s, tiling, True)

    def lora_model(self, component: str):
        return WanVACETransformer(WanVACEConfig.from_dict(self.folder.config(component)))

    # ---- decoding: the reference frames are conditioning, not video ----

    def video_latents(self, latents: np.ndarray, s: GenerationSettings) -> np.ndarray:
        """The latents without the latent frame in front per reference image of the run."""
        return latents[:, :, len(s.reference_images or ()):]
