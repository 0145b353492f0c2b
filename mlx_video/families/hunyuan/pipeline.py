"""HunyuanVideo generation: prompt -> Llama (template, crop) + CLIP pooled -> the shared denoising loop over the
transformer with embedded guidance -> the causal video VAE.

HunyuanVideo T2V is guidance-distilled: `guidance` is not a classifier-free scale but an input of the model
(scale x 1000, embedded like the timestep), so a step is one forward. `true_cfg` (diffusers' `true_cfg_scale`)
adds real classifier-free guidance on top: a second pass on the negative prompt, with the same embedded
guidance, combined as uncond + true_cfg * (cond - uncond). Sampling is flow Euler on the shifted linear grid
(shift 7), the model seeing σ·1000 as a float.

Encoding a prompt builds the Llama encoder with mlx_lm, whose package imports transformers (and torch, where
installed); importing this module imports neither.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from mlx_video.errors import MlxVideoError
from mlx_video.families.hunyuan.config import RADIAL_DEFAULTS, HunyuanTransformerConfig, HunyuanVAEConfig
from mlx_video.text_encoders.llama import VIDEO_TEMPLATE, VIDEO_TEMPLATE_CROP_START, JsonTokenizer
from mlx_video.pipelines.base import DecodeTiling, GenerationSettings, Pipeline, Predict, available_memory_bytes, release
from mlx_video.pipelines.cache import ContextArgs
from mlx_video.pipelines.loop import get_guidance, guidance_none

LLAMA_PAD = "<|end_of_text|>"  # used when the tokenizer folder configures no pad token
CLIP_PAD = "<|endoftext|>"


class HunyuanPipeline(Pipeline):
    radial_defaults = RADIAL_DEFAULTS
    takes_true_cfg = True
    prompt_template = VIDEO_TEMPLATE  # the Llama's template, "{}" the prompt

    def __init__(self, folder):
        super().__init__(folder)
        self.transformer_config = HunyuanTransformerConfig.from_dict(folder.config("transformer"))
        self.vae_stride = self.spec.vae_stride
        self.text_len = int(self.spec.default("text_len", 256))
        self.crop_start = int(self.spec.default("template_crop", VIDEO_TEMPLATE_CROP_START))
        self.tokenizer = JsonTokenizer(folder.path / "tokenizer", pad_token=LLAMA_PAD)

    def clip_tokenizer_folder(self):
        """tokenizer_2/ (folders converted before it had its own component kept it in text_encoder_2/)."""
        own = self.folder.path / "tokenizer_2"
        return own if self.folder.has("tokenizer_2") or own.is_dir() else self.folder.path / "text_encoder_2"

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.out_channels

    def uses_true_cfg(self, s: GenerationSettings) -> bool:
        # as diffusers: only a scale above 1 runs the negative pass
        return s.true_cfg is not None and s.true_cfg > 1.0

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        s = super().resolve(settings)
        prompts = [("prompt", s.prompt)] + ([("negative prompt", s.negative_prompt)] if self.uses_true_cfg(s) else [])
        for what, text in prompts:
            # the template's own tokens come first; what is left of the budget is the prompt's
            n = len(self.tokenizer.encode(self.prompt_template.format(text))) - self.crop_start
            if n > self.text_len:
                raise MlxVideoError(
                    f"the {what} is {n} tokens long with the template's closing tokens, more than the "
                    f"{self.text_len} the text encoder takes; shorten it"
                )
        return s

    # ---- the stages ----

    def encode_text(self, prompts: list[str], progress: bool = False) -> tuple[mx.array, mx.array, mx.array]:
        """(states (B, text_len, text_dim) float32, mask (B, text_len) int32, pooled (B, pooled_dim) float32):
        the Llama path (template, crop, hidden state 3 from the end), then CLIP-L's pooled output."""
        from mlx_video.text_encoders.llama import LlamaTextEncoder, encode_prompts

        with tqdm(total=2, desc="text encoding", disable=not progress, leave=False) as bar:
            llama = LlamaTextEncoder(self.folder.config("text_encoder"))
            self.folder.load_module("text_encoder", llama)
            states, mask = encode_prompts(llama, self.tokenizer, prompts, crop_start=self.crop_start,
                                          text_tokens=self.text_len)
            mx.eval(states, mask)
            del llama
            release()
            bar.update()
            pooled = self.encode_pooled(prompts)
            bar.update()
        return states, mask, pooled

    def encode_pooled(self, prompts: list[str]) -> mx.array:
        """CLIP-L's pooled output of each prompt, (B, pooled_dim) float32; the encoder freed after."""
        from mlx_video.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder, encode_pooled

        clip = CLIPTextEncoder(CLIPTextConfig.from_dict(self.folder.config("text_encoder_2")))
        self.folder.load_module("text_encoder_2", clip)
        pooled = encode_pooled(clip, JsonTokenizer(self.clip_tokenizer_folder(), pad_token=CLIP_PAD), prompts)
        mx.eval(pooled)
        del clip
        release()
        return pooled

    def load_transformer(self):
        from mlx_video.families.hunyuan.transformer import HunyuanTransformer

        model = HunyuanTransformer(self.transformer_config, dtype=self.dtype)
        self.folder.load_module("transformer", model)
        self.fuse_run_loras(model, "transformer")
        warm_up(model, self.transformer_config, self.dtype)
        return model

    # ---- LoRAs (Pipeline.resolve_loras): the converter's tables, diffusers' split q/k/v onto our fused layers ----

    def lora_keymaps(self) -> list:
        from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER

        return [DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER]

    def lora_model(self, component: str):
        from mlx_video.families.hunyuan.transformer import HunyuanTransformer

        return HunyuanTransformer(self.transformer_config)

    def lora_parts(self, component: str) -> dict[str, tuple[int, ...]]:
        return fused_slices(self.transformer_config)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        pt, ph, pw = self.transformer_config.patch_size
        return latent_shape[1] // pt, (latent_shape[2] // ph) * (latent_shape[3] // pw)

    def encode(self, s: GenerationSettings, progress: bool = False) -> tuple[mx.array, mx.array, mx.array]:
        return self.encode_text([s.prompt, s.negative_prompt] if self.uses_true_cfg(s) else [s.prompt], progress)

    def make_predict(self, s: GenerationSettings, model, context, step_cache=None, sampler=None) -> Predict:
        """`predict(latents, i, t)` for the shared loop: one pass with the embedded guidance, or two (cond and
        uncond, batched or sequential) with true CFG. The embedded scale is formed as diffusers does, in float32.
        With a `step_cache` (mlx_video.pipelines.cache) every forward goes through it."""
        states, mask, pooled = context
        cond = (states[:1], mask[:1], pooled[:1])
        uncond = (states[1:], mask[1:], pooled[1:]) if self.uses_true_cfg(s) else None
        guide = get_guidance(s.guidance_mode) if uncond is not None else guidance_none
        scale = float(s.true_cfg) if uncond is not None else 1.0
        embedded = None
        if self.transformer_config.guidance_embed:
            embedded = mx.array(np.float32(s.guidance) * np.float32(1000.0)).reshape(1)

        forward = self.forward_args(model, embedded)
        if step_cache is not None:
            forward = partial(step_cache, forward)

        def predict(latents: mx.array, i: int, t) -> mx.array:
            if step_cache is not None:
                step_cache.begin_step(i, model)
            return guide(forward, latents, mx.array([float(t)], dtype=mx.float32), cond, uncond, scale)

        return predict

    def forward_args(self, model, guidance: mx.array | None) -> ContextArgs:
        """The forward the loop's guidance calls as `forward(x, t, (states, mask, pooled))`."""
        return ContextArgs(model, guidance=guidance)

    # ---- memory preflight ----

    def encoder_image_tokens(self) -> int:
        """The image features the Llama reads beside the prompt (none for T2V)."""
        return 0

    def estimate_memory(self, s: GenerationSettings, tiling: str = "auto", has_image: bool = False) -> dict:
        """Estimated peak bytes of each stage (text encoding, denoising, decoding), run one after the other: the
        family's cost model (`mlx_video/families/hunyuan/cost_model.py`) on this folder's configuration and the bytes
        its components store. Estimates, not measurements; the allocator's cache is not modelled."""
        from mlx_video.families.hunyuan import cost_model as cost

        name = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[self.dtype]
        _, _, _, h, w = self.latent_shape(s)
        stored = {
            "text_encoder": self.component_bytes("text_encoder"),
            "text_encoder_2": self.component_bytes("text_encoder_2"),
            "transformer_expert": self.component_bytes("transformer"),
            "vae": self.component_bytes("vae"),
        }
        vae_cfg, tile_px, tile_frames = None, None, None
        if self.can_decode:
            vae_cfg = HunyuanVAEConfig.from_dict(self.folder.config("vae"))
            tile = self.vae_tile(tiling, (h, w)).plan
            tile_px = (tile.sample_size, tile.sample_size) if tile.spatial else None
            tile_frames = tile.frames + 1 if tile.temporal else None
        estimate = cost.estimate_peak_memory(
            self.spec, s.width, s.height, s.frames, name, guidance=self.uses_true_cfg(s) and s.guidance_mode == "batched",
            fused_attention=mx.metal.is_available(), vae_tile=tile_px, vae_tile_frames=tile_frames,
            transformer=self.transformer_config, vae_config=vae_cfg, stored=stored, text_len=self.text_len,
            attention=self.attention_estimate(s), image_tokens=self.encoder_image_tokens(), crop_start=self.crop_start,
        )
        stages = {k: v["total"] for k, v in estimate.stages.items()}
        if not self.can_decode:
            stages.pop("decoding")
        peak = max(stages, key=stages.get)
        return {"stages": stages, "peak_stage": peak, "peak_bytes": stages[peak], "detail": estimate.stages}

    # ---- decoding ----

    def vae_tile(self, mode: str, latent_hw: tuple[int, int], frames: int | None = None) -> DecodeTiling:
        """The VAE's tiling (`plan`: a `mlx_video.families.hunyuan.vae.VAETiling`): `off` decodes in overlapping clips of 16
        frames (diffusers' default, framewise decoding), `on` also in overlapping 256-pixel tiles (diffusers'
        `enable_tiling()`), `auto` tiles spatially when one untiled clip would take more than half the memory
        available now (an estimate, `cost.decode_activation_bytes`)."""
        from mlx_video.families.hunyuan import cost_model as cost
        from mlx_video.families.hunyuan.vae import VAETiling

        if mode not in ("auto", "on", "off"):
            raise MlxVideoError(f"--vae-tiling takes auto, on or off, not {mode!r}")
        if mode == "on":
            return _tiling(VAETiling())
        framewise = VAETiling(spatial=False)
        if mode == "off":
            return _tiling(framewise)
        h, w = latent_hw
        s = self.vae_stride[1]
        vae_cfg = HunyuanVAEConfig.from_dict(self.folder.config("vae")) if self.can_decode else None
        if vae_cfg is None:
            return _tiling(framewise)
        untiled = cost.decode_activation_bytes(w * s, h * s, framewise.frames + 1, vae_cfg, None, None)
        available = available_memory_bytes()
        return _tiling(VAETiling() if available is not None and untiled > available // 2 else framewise)

    def decode(self, latents: np.ndarray, tiling: str = "auto", progress: bool = False) -> tuple[np.ndarray, dict]:
        """(1, 16, T, H, W) latents -> (frames, height, width, 3) uint8 video, and decoding statistics."""
        from mlx_video.families.hunyuan.vae import HunyuanVAE

        if not self.can_decode:
            raise MlxVideoError(f"{self.folder.path} has no vae/ component; re-convert it from a folder with vae/")
        z = mx.array(latents).transpose(0, 2, 3, 4, 1)
        tile = self.vae_tile(tiling, (z.shape[2], z.shape[3])).plan
        vae = HunyuanVAE(HunyuanVAEConfig.from_dict(self.folder.config("vae")), dtype=mx.float32)
        self.folder.load_module("vae", vae)
        mx.reset_peak_memory()
        with tqdm(total=1, desc="decoding", disable=not progress) as bar:
            video = vae.decode(z, tiling=tile)[0]
            pixels = mx.clip(mx.round((video + 1.0) * 127.5), 0, 255).astype(mx.uint8)
            frames = np.array(pixels)
            bar.update()
        stats = {"vae_peak_memory_bytes": int(mx.get_peak_memory()),
                 "vae_tile": {"spatial": tile.spatial, "temporal": tile.temporal}}
        del vae
        release()
        return frames, stats


def fused_slices(cfg: HunyuanTransformerConfig) -> dict[str, tuple[int, ...]]:
    """Our fused layers that diffusers splits, with the sizes of the slices along the output axis: q | k | v of
    every attention, and q | k | v | mlp of each single-stream block's `linear1`."""
    dim = cfg.hidden_size
    qkv = (dim, dim, dim)
    parts = {f"txt_in.blocks.{i}.self_attn_qkv": qkv for i in range(cfg.num_refiner_blocks)}
    for i in range(cfg.num_double_blocks):
        parts[f"double_blocks.{i}.img.attn_qkv"] = parts[f"double_blocks.{i}.txt.attn_qkv"] = qkv
    for i in range(cfg.num_single_blocks):
        parts[f"single_blocks.{i}.linear1"] = (*qkv, cfg.mlp_dim)
    return parts


def warm_up(model, config: HunyuanTransformerConfig, dtype) -> None:
    """Check the custom kernels once on a minimal input (one latent patch, one text token) before the loop; a
    no-op where only the portable path exists (see `mlx_video.kernels.warm_up`)."""
    from mlx_video.kernels import warm_up as kernel_warm_up

    pt, ph, pw = config.patch_size
    x = mx.zeros((1, pt, ph, pw, config.in_channels), dtype=dtype)
    guidance = mx.array([6000.0]) if config.guidance_embed else None
    kernel_warm_up(lambda: model(x, mx.array([500.0]), mx.zeros((1, 1, config.text_dim)), None,
                                 mx.zeros((1, config.pooled_dim)), guidance=guidance))


def _tiling(plan) -> DecodeTiling:
    return DecodeTiling(spatial=plan.spatial, temporal=plan.temporal, plan=plan)
