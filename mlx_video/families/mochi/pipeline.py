"""Mochi 1 preview generation: prompt -> T5-v1.1-XXL (256 tokens, with its mask) -> the shared denoising loop over
the AsymmDiT with classifier-free guidance -> the AsymmVAE decoder.

Conventions (diffusers' `MochiPipeline`, the official sampler): the schedule is the linear-quadratic one
(`mlx_video.samplers.schedules`, σ descending from 1, no shift); the transformer is given t = 1000·(1 − σ) as a
float32 (0 at pure noise) and predicts x0 − ε, the negative of the velocity the shared Euler step takes, so a step
is z += (σ_i − σ_{i+1})·prediction. Guidance > 1 runs a second pass on the negative prompt, combined as
uncond + guidance·(cond − uncond); at 1 or below only the conditional pass runs. The latents are kept normalised
by the VAE's per-channel mean and std, (1, 12, T, H/8, W/8) in diffusers' layout; decoding denormalises them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.mochi.config import RADIAL_DEFAULTS, MochiTransformerConfig, MochiVAEConfig
from mlx_video.text_encoders.tokenizer import T5Tokenizer
from mlx_video.pipelines.base import DecodeTiling, GenerationSettings, Pipeline, Predict, available_memory_bytes, release
from mlx_video.pipelines.cache import ContextArgs
from mlx_video.pipelines.loop import get_guidance, guidance_none

CHUNK_CHOICES = (8, 4, 2, 1)  # latent frames per decoded chunk that `auto` tries, largest first


@dataclass(frozen=True)
class VAEChunking:
    """How the decoder walks the latent frames: `frames` at a time (each chunk evaluated before the next, the
    causal convolutions carrying their context), or all at once when None. The result is the same."""

    frames: int | None = None


def mochi_timesteps(sigmas) -> np.ndarray:
    """What the transformer is given at each step: 1000·(1 − σ) in float32 (σ rounded to float32 first), as
    diffusers' scheduler with `invert_sigmas` forms it."""
    s = np.asarray(sigmas).astype(np.float32)
    return (np.float32(1.0) - s) * np.float32(1000.0)


class MochiPipeline(Pipeline):
    radial_defaults = RADIAL_DEFAULTS
    def __init__(self, folder):
        super().__init__(folder)
        self.transformer_config = MochiTransformerConfig.from_dict(folder.config("transformer"))
        self.text_len = int(self.spec.default("text_len", 256))
        self.zero_empty_prompt = bool(self.spec.default("zero_empty_prompt", False))
        self.tokenizer = T5Tokenizer.from_folder(folder.path / "tokenizer")

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels

    @staticmethod
    def uses_cfg(s: GenerationSettings) -> bool:
        return s.guidance > 1.0  # as diffusers: no negative pass at guidance 1 or below

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        s = super().resolve(settings)
        try:  # the schedule's own rules (e.g. the linear-quadratic one takes no shift), before any weights are read
            self.make_sampler(s)
        except ValueError as e:
            raise MlxVideoError(f"{e}") from None
        prompts = [("prompt", s.prompt)] + ([("negative prompt", s.negative_prompt)] if self.uses_cfg(s) else [])
        for what, text in prompts:
            # one position more than the encoder takes: if it is used, the prompt (with EOS) does not fit
            _, mask = self.tokenizer([text], max_length=self.text_len + 1)
            if mask[0, -1]:
                raise MlxVideoError(
                    f"the {what} is longer than the {self.text_len - 1} tokens (plus the closing one) the text encoder "
                    "takes; shorten it"
                )
        return s

    # ---- the stages ----

    def encode_text(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """(states (B, text_len, 4096) float32, mask (B, text_len) int32) from T5's last hidden state. With
        `zero_empty_prompt` (diffusers' `force_zeros_for_empty_prompt`, the official code's way) an empty prompt
        becomes token ids 0 with an all-false mask."""
        from mlx_video.text_encoders.t5 import T5Config, T5Encoder

        ids, mask = self.tokenizer(prompts, max_length=self.text_len)
        for row, text in enumerate(prompts):
            if self.zero_empty_prompt and text == "":
                ids[row], mask[row] = 0, 0
        encoder = T5Encoder(T5Config.from_dict(self.folder.config("text_encoder")))
        self.folder.load_module("text_encoder", encoder)
        states = encoder(mx.array(ids), mx.array(mask)).astype(mx.float32)
        mask = mx.array(mask)
        mx.eval(states, mask)
        del encoder
        release()
        return states, mask

    def load_transformer(self):
        from mlx_video.families.mochi.transformer import MochiTransformer

        model = MochiTransformer(self.transformer_config, compute_dtype=self.dtype)
        self.folder.load_module("transformer", model)
        self.fuse_run_loras(model, "transformer")
        warm_up(model, self.transformer_config, self.dtype)
        return model

    # ---- LoRAs (Pipeline.resolve_loras): the converter's tables, diffusers' split q/k/v onto our fused layers ----

    def lora_keymaps(self) -> list:
        from mlx_video.families.mochi.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER

        return [DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER]

    def lora_model(self, component: str):
        from mlx_video.families.mochi.transformer import MochiTransformer

        return MochiTransformer(self.transformer_config)

    def lora_parts(self, component: str) -> dict[str, tuple[int, ...]]:
        return fused_slices(self.transformer_config)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        patch = self.transformer_config.patch_size
        return latent_shape[1], (latent_shape[2] // patch) * (latent_shape[3] // patch)

    def encode(self, s: GenerationSettings, progress: bool = False) -> tuple[mx.array, mx.array]:
        with tqdm(total=1, desc="text encoding", disable=not progress, leave=False) as bar:
            context = self.encode_text([s.prompt, s.negative_prompt] if self.uses_cfg(s) else [s.prompt])
            bar.update()
        return context

    def make_predict(self, s: GenerationSettings, model, context, sampler, step_cache=None) -> Predict:
        """`predict(latents, i, t)` for the shared loop: the transformer at Mochi's timestep 1000·(1 − σ_i) (formed
        in float32 from the schedule's σ, as diffusers' inverted scheduler does), guided, negated into the
        velocity ε − x0 the Euler step takes. With a `step_cache` (mlx_video.pipelines.cache) every forward goes
        through it."""
        states, mask = context
        cond = (states[:1], mask[:1])
        uncond = (states[1:], mask[1:]) if self.uses_cfg(s) else None
        guide = get_guidance(s.guidance_mode) if uncond is not None else guidance_none
        timesteps = mochi_timesteps(sampler.sigmas[: s.steps])

        forward = ContextArgs(model)
        if step_cache is not None:
            forward = partial(step_cache, forward)

        def predict(latents: mx.array, i: int, t) -> mx.array:
            if step_cache is not None:
                step_cache.begin_step(i, model)
            t_model = mx.array(timesteps[i : i + 1], dtype=mx.float32)
            return -guide(forward, latents, t_model, cond, uncond, float(s.guidance))

        return predict

    # ---- memory preflight ----

    def _vae_config(self) -> MochiVAEConfig | None:
        return MochiVAEConfig.from_dict(self.folder.config("vae")) if self.can_decode else None

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes of each stage (text encoding, denoising, decoding), run one after the other: the
        family's cost model (`mlx_video/families/mochi/cost_model.py`) on this folder's configuration and the bytes its
        components store. Estimates, not measurements; the allocator's cache is not modelled."""
        from mlx_video.families.mochi import cost_model as cost

        name = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[self.dtype]
        _, _, _, h, w = self.latent_shape(s)
        stored = {
            "text_encoder": self.component_bytes("text_encoder"),
            "transformer_expert": self.component_bytes("transformer"),
            "vae": self.component_bytes("vae"),
        }
        chunk = self.vae_tile(tiling, (h, w), frames=s.frames).plan.frames if self.can_decode else None
        estimate = cost.estimate_peak_memory(
            self.spec, s.width, s.height, s.frames, name,
            guidance=self.uses_cfg(s) and s.guidance_mode == "batched", fused_attention=mx.metal.is_available(),
            vae_chunk_frames=chunk, transformer=self.transformer_config, vae_config=self._vae_config(), stored=stored,
            text_len=self.text_len, attention=self.attention_estimate(s),
        )
        stages = {k: v["total"] for k, v in estimate.stages.items()}
        if not self.can_decode:
            stages.pop("decoding")
        peak = max(stages, key=stages.get)
        return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak], "detail": estimate.stages}

    # ---- decoding ----

    def vae_tile(self, mode: str, latent_hw: tuple[int, int], frames: int | None = None) -> DecodeTiling:
        """The decoder's chunking (`plan`: a `VAEChunking`; Mochi's VAE decodes in frame chunks, not spatial tiles): `off` decodes all
        latent frames at once, `on` one latent frame (6 video frames) at a time, `auto` the largest chunk of
        8, 4, 2 or 1 latent frames whose estimated working set (`cost.decode_activation_bytes`) stays under half
        the memory available now (all at once when that fits)."""
        from mlx_video.families.mochi import cost_model as cost

        if mode not in ("auto", "on", "off"):
            raise MlxVideoError(f"--vae-tiling takes auto, on or off, not {mode!r}")
        if mode == "on":
            return _chunked(VAEChunking(1))
        vae_cfg = self._vae_config()
        if mode == "off" or vae_cfg is None:
            return _chunked(VAEChunking(None))
        h, w = latent_hw
        st, s = vae_cfg.temporal_compression, vae_cfg.spatial_compression
        frames = frames if frames is not None else self.spec.default("frames", st + 1)
        available = available_memory_bytes()
        if available is None:
            return _chunked(VAEChunking(None))
        for chunk in (None, *CHUNK_CHOICES):
            if cost.decode_activation_bytes(w * s, h * s, frames, vae_cfg, chunk) <= available // 2:
                return _chunked(VAEChunking(chunk))
        return _chunked(VAEChunking(1))

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, 12, T, H, W) normalised latents -> (frames, height, width, 3) uint8 video, and decoding statistics."""
        from mlx_video.families.mochi.vae import MochiVAE

        if not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no vae/ component; re-convert it from a folder with vae/")
        vae_cfg = self._vae_config()
        z = mx.array(latents).transpose(0, 2, 3, 4, 1)
        frames = (z.shape[1] - 1) * vae_cfg.temporal_compression + 1
        chunk = self.vae_tile(tiling, (z.shape[2], z.shape[3]), frames=frames).plan
        vae = MochiVAE(vae_cfg)
        self.folder.load_module("vae", vae)
        mx.reset_peak_memory()
        with tqdm(total=1, desc="decoding", disable=not progress) as bar:
            video = vae.decode(vae.denormalize_latents(z), chunk_frames=chunk.frames)[0]
            pixels = mx.clip(mx.round((video + 1.0) * 127.5), 0, 255).astype(mx.uint8)
            frames = np.array(pixels)
            bar.update()
        stats = {"vae_peak_memory_bytes": int(mx.get_peak_memory()), "vae_chunk_frames": chunk.frames}
        del vae
        release()
        return frames, stats


def fused_slices(cfg: MochiTransformerConfig) -> dict[str, tuple[int, ...]]:
    """Our fused layers that diffusers splits, with the sizes of the slices along the output axis: q | k | v of
    both streams' projections (each `dim` wide, the text stream's too)."""
    qkv = (cfg.dim, cfg.dim, cfg.dim)
    return {f"blocks.{i}.attn.qkv_{x}": qkv for i in range(cfg.num_layers) for x in "xy"}


def warm_up(model, config: MochiTransformerConfig, dtype) -> None:
    """Check the custom kernels once on a minimal input (one latent patch, one text token) before the loop; a
    no-op where only the portable path exists (see `mlx_video.kernels.warm_up`)."""
    from mlx_video.kernels import warm_up as kernel_warm_up

    p = config.patch_size
    x = mx.zeros((1, 1, p, p, config.in_channels), dtype=dtype)
    kernel_warm_up(lambda: model(x, mx.array([500.0]), mx.zeros((1, 1, config.t5_dim)), None))


def _chunked(plan: VAEChunking) -> DecodeTiling:
    return DecodeTiling(spatial=False, temporal=plan.frames is not None, plan=plan)
