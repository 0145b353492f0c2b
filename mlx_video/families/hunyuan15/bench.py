"""HunyuanVideo 1.5's benchmark cases (mlx_video/bench_case.py): one denoising step of a reduced-depth transformer
at the real width (16 heads x 128 = 2048, MLP 8192, the real token refiner of 2 blocks, ByT5 and SigLIP projections
and time embeddings), classifier-free guidance batched as the pipeline runs it (batch 2: a prompt of 120 of the
1000 Qwen slots quoting a short text, 13 of the 256 ByT5 slots, and the empty negative prompt, 6 Qwen slots, no
glyph; batch 1 for the distilled models, guidance 1), the I2V models with their condition latents on frame 0 and
729 SigLIP tokens, the step-distilled one with MeanFlow's second timestep; diffusers'
HunyuanVideo15Transformer3DModel as data for benchmarks/harness.py; and the VAE at its real widths
(128/256/512/1024/1024, 32 latent channels; the decoder's 871M parameters, the encoder's 389M, MLX's random init),
decoded (encoded) untiled `chunk` latent frames per step, against the preflight's estimates
`vae.decode_memory_bytes` and `vae.encode_memory_bytes`."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import mlx.core as mx
import numpy as np

from mlx_video.bench_case import DTYPES, ReferenceCase, StepCase, VAECase, blocks_replaced, materialise
from mlx_video.families.hunyuan15 import cost_model as cost
from mlx_video.pipelines.loop import guidance_batched, guidance_none

DEPTH = {"double": 1}  # the double-stream blocks; the token refiner keeps the release's 2
TIMESTEP, TIMESTEP_R = 500.0, 437.5  # sigma x 1000 as the loop passes it; MeanFlow's next timestep
GUIDANCE_SCALE = 6.0  # the release's scale; any value other than 1 runs both passes
# Our choice of prompts (not measured on the real tokenizers): a long prompt of 120 Qwen tokens quoting a short
# text (`Text "OPEN". `: 12 ByT5 bytes and </s>), and the empty negative prompt (the chat template's few closing
# tokens after the crop, 6 here; no quoted text)
VALID_TEXT = (120, 6)
VALID_GLYPH = (13, 0)
# diffusers' HunyuanVideo15Transformer3DModel arguments at the release's widths (its defaults, which
# scripts/convert_hunyuan_video1_5_to_diffusers.py keeps for every variant); the depth comes from the case
REAL_WIDTH = dict(num_attention_heads=16, attention_head_dim=128, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                  qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
                  rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def step_case(spec, size, frames, depth, dtype, width=None, seed=0, variant=None, guidance=True) -> StepCase:
    """`width`: HunyuanVideo15Transformer3DModel arguments replacing REAL_WIDTH (tests use tiny ones). Both
    guidance passes in one forward when `guidance` and the model's published scale is not 1 (the distilled
    models run one pass)."""
    from mlx_video.families.hunyuan15.keys import config_from_diffusers

    if variant:
        raise ValueError(f"{spec.id} has no step variants")
    if spec.task not in ("t2v", "i2v"):
        raise ValueError(f"{spec.id}: the step benchmark builds the text- and image-to-video transformer, not the "
                         f"{spec.task} one")
    full = spec.transformer
    kwargs = {**REAL_WIDTH, **(width or {}), "in_channels": full.in_channels, "out_channels": full.out_channels,
              "num_layers": depth["double"], "num_refiner_layers": full.num_refiner_blocks,
              "use_meanflow": full.use_meanflow, "target_size": full.target_size}
    cfg = config_from_diffusers({"_class_name": "HunyuanVideo15Transformer3DModel", **kwargs})
    latent = spec.latent_grid(size[0], size[1], frames)
    tokens = cost.tokens(spec, size[0], size[1], frames, cfg)
    batch = 2 if guidance and spec.cfg_by_default else 1
    inputs = _inputs(cfg, latent, batch, spec.task == "i2v", seed)
    lengths = _text_lengths(inputs)

    def flops(config):  # what ours computes: the columns some sample uses, the joint sequence of the longest
        return cost.forward_flops(config, tokens, lengths["joint"], batch, lengths["qwen"], lengths["glyph"],
                                  lengths["image"]).total

    scale = GUIDANCE_SCALE if batch == 2 else 1.0
    return StepCase(
        model_id=spec.id, config=cfg, depth=dict(depth), full_depth={"double": full.num_blocks}, tokens=tokens,
        batch=batch, text_tokens=lengths["joint"], width=cfg.hidden_size, model=lambda dt: _transformer(cfg, dt, seed),
        forward=lambda m, x: _velocity(m, x, scale), inputs=inputs, flops=flops(cfg),
        full_flops=flops(replace(cfg, num_blocks=full.num_blocks)),
        without_blocks=partial(blocks_replaced, attribute="double_blocks", stub=_consume_block_inputs),
        weights_bytes=lambda dt, blocks: cost.transformer_params(replace(cfg, num_blocks=blocks)).total
        * mx.finfo(DTYPES[dt]).bits // 8,
        activation_estimate=lambda dt, fused: {"peak": cost.activation_bytes(cfg, tokens, lengths["joint"], batch, dt,
                                                                             fused)},
        reference=_reference(kwargs, inputs, scale, _reference_flops(cfg, tokens, inputs)),
        info={"latent": latent, "text_lengths": lengths})


def _inputs(cfg, latent, batch, image, seed) -> dict:
    """The pipeline's inputs of one step: noisy latents (1, T, h, w, 32), its padded Qwen and ByT5 states (the
    prompt's row, then the negative prompt's) with their masks; for I2V the condition beside the noise (image
    latents on frame 0, the mask channel) and the SigLIP features."""
    from mlx_video.families.hunyuan15.pipeline import image_condition
    from mlx_video.text_encoders.byt5 import GLYPH_TOKENS
    from mlx_video.text_encoders.qwen25vl import TEXT_TOKENS

    rng = np.random.default_rng(seed + 1)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    text_mask, glyph_mask = np.zeros((batch, TEXT_TOKENS), np.int32), np.zeros((batch, GLYPH_TOKENS), np.int32)
    for row in range(batch):
        text_mask[row, :VALID_TEXT[row]], glyph_mask[row, :VALID_GLYPH[row]] = 1, 1
    x = {"latents": normal(1, *latent, cfg.out_channels), "text": normal(batch, TEXT_TOKENS, cfg.text_dim),
         "text_mask": text_mask, "glyph": normal(batch, GLYPH_TOKENS, cfg.glyph_dim) * glyph_mask[..., None],
         "glyph_mask": glyph_mask}
    if image:
        x["condition"] = np.array(image_condition(mx.array(normal(1, 1, *latent[1:], cfg.out_channels)), latent[0]))
        x["image"] = normal(1, cost.SIGLIP["tokens"], cfg.image_dim)
    if cfg.use_meanflow:
        x["timestep_r"] = np.array([TIMESTEP_R], np.float32)
    return x


def _text_lengths(x) -> dict:
    """The lengths our model runs its text over: the Qwen and ByT5 columns some sample uses, the image tokens,
    and the joint sequence (the most valid tokens of any sample)."""
    text, glyph = x["text_mask"].astype(bool), x["glyph_mask"].astype(bool)
    image = x["image"].shape[1] if "image" in x else 0
    joint = int((text.sum(1) + glyph.sum(1)).max()) + image
    return {"qwen": int(text.any(0).sum()), "glyph": int(glyph.any(0).sum()), "image": image, "joint": joint}


def _reference_flops(cfg, tokens, x) -> float:
    """The cost model at the lengths diffusers' model runs (the pipeline's padded 1000 / 256 / 729 tokens, all
    in the joint sequence, masked): what torch's FlopCounterMode counts on the reference."""
    batch, qwen = x["text"].shape[:2]
    glyph, image = x["glyph"].shape[1], cost.SIGLIP["tokens"]
    return cost.forward_flops(cfg, tokens, qwen + glyph + image, batch, qwen, glyph, image).total


def _transformer(cfg, dtype, seed):
    from mlx_video.families.hunyuan15.transformer import Hunyuan15Transformer

    mx.random.seed(seed)
    return Hunyuan15Transformer(cfg, dtype=DTYPES[dtype])


def _velocity(model, x, scale):
    """The step as the pipeline's `predict` runs it: ConditionedForward (the condition beside the noise, the
    image's features, MeanFlow's timestep_r), both guidance passes batched into one forward."""
    from mlx_video.families.hunyuan15.pipeline import ConditionedForward

    forward = ConditionedForward(model, x.get("condition"), x.get("image"))
    forward.timestep_r = TIMESTEP_R if "timestep_r" in x else None
    context = (x["text"], x["text_mask"], x["glyph"], x["glyph_mask"])
    cond = tuple(a[:1] for a in context)
    uncond = tuple(a[1:] for a in context) if scale != 1.0 else None
    guide = guidance_batched if uncond is not None else guidance_none
    return guide(forward, x["latents"], mx.array([TIMESTEP], dtype=mx.float32), cond, uncond, scale)


def _consume_block_inputs(img, txt, vec, rope, mask, dtype):
    return img + 0 * txt[:, :1, :1] + 0 * vec[:, None, :1], txt


def _convert(state: dict) -> list:
    from mlx_video.convert.rules import convert_weights
    from mlx_video.families.hunyuan15.keys import DIFFUSERS_TRANSFORMER

    unknown = DIFFUSERS_TRANSFORMER.unknown_keys(state)
    if unknown:
        raise KeyError(f"keys that no rule maps: {unknown[:10]}")
    return list(convert_weights(DIFFUSERS_TRANSFORMER, state).items())


def _reference(kwargs, x, scale, flops) -> ReferenceCase:
    """diffusers' HunyuanVideo15Transformer3DModel as its pipelines call it: (B, 65, T, H, W) latents (the noise,
    then the condition: zeros for T2V), the padded states with int64 masks, 729 image tokens (zeros for T2V, which
    it masks), both passes in one batch (conditional first)."""
    batch = x["text"].shape[0]
    noisy = np.concatenate([x["latents"]] * batch)
    condition = x.get("condition")
    if condition is None:
        condition = np.zeros((*noisy.shape[:-1], noisy.shape[-1] + 1), np.float32)
    hidden = np.concatenate([noisy, np.broadcast_to(condition, (batch, *condition.shape[1:]))], axis=-1)
    image = x.get("image", np.zeros((1, cost.SIGLIP["tokens"], kwargs["image_embed_dim"]), np.float32))
    inputs = {"hidden_states": np.ascontiguousarray(hidden.transpose(0, 4, 1, 2, 3)),
              "timestep": np.full((batch,), TIMESTEP, np.float32), "encoder_hidden_states": x["text"],
              "encoder_attention_mask": x["text_mask"].astype(np.int64), "encoder_hidden_states_2": x["glyph"],
              "encoder_attention_mask_2": x["glyph_mask"].astype(np.int64),
              "image_embeds": np.concatenate([image] * batch)}
    if "timestep_r" in x:
        inputs["timestep_r"] = np.full((batch,), TIMESTEP_R, np.float32)
    return ReferenceCase(
        class_name="HunyuanVideo15Transformer3DModel", kwargs=kwargs, convert=_convert, inputs=inputs,
        args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
        keywords=tuple(k for k in inputs if k not in ("hidden_states", "timestep", "encoder_hidden_states",
                                                     "encoder_attention_mask")),
        uncast=("timestep", "timestep_r"), guidance=scale if batch == 2 else None, flops=flops)


def vae_case(spec, dtype="fp32", width=None, chunk=None, seed=0) -> VAECase:
    """`chunk`: latent frames per decoder (encoder) step, 1 by default; 0: the whole clip in one pass. `width`:
    Hunyuan15VAEConfig fields replacing the release's (e.g. block_out_channels)."""
    from mlx_video.families.hunyuan15.vae import (
        HUNYUAN15_VAE,
        Hunyuan15VAE,
        VAETiling,
        decode_memory_bytes,
        encode_memory_bytes,
    )

    cfg = replace(HUNYUAN15_VAE, **(width or {}))  # width: config fields replaced (tests use a tiny VAE)
    tiling = VAETiling(spatial=False, chunk_frames=1 if chunk is None else (chunk or None))
    dtype_bytes = mx.finfo(DTYPES[dtype]).bits // 8
    mx.random.seed(seed)
    vae = Hunyuan15VAE(cfg, dtype=DTYPES[dtype])

    def load(dt, part="decoder"):
        return materialise(getattr(vae, part), dt)  # the other half's weights are never evaluated, never allocated

    def decode(z):
        video = vae.decode(z, tiling)
        mx.eval(video)
        return int(video.shape[1])

    return VAECase(
        description=f"real widths {cfg.block_out_channels}, untiled, chunk {tiling.chunk_frames or 'all'}",
        config=cfg.to_dict(), spatial=cfg.spatial_compression, temporal=cfg.temporal_compression,
        latent_channels=cfg.latent_channels, load=load, decode=decode,
        estimate=lambda w, h, f: decode_memory_bytes(w, h, f, cfg, tiling, dtype_bytes=dtype_bytes),
        encode=lambda video: vae.encode(video, tiling),
        encode_estimate=lambda w, h, f: encode_memory_bytes(w, h, f, cfg, tiling, dtype_bytes))


GPU_CHECK = {
    "real": {"step": {"model": "hunyuanvideo-1.5-720p-t2v", "size": [1280, 720], "frames": 33,
                      "depth": {"double": 1}}},
    "dry": {"step": {"model": "hunyuanvideo-1.5-720p-t2v", "size": [48, 32], "frames": 5, "depth": {"double": 1},
                     "width": {"num_attention_heads": 2, "attention_head_dim": 20, "rope_axes_dim": [4, 8, 8],
                               "text_embed_dim": 24, "text_embed_2_dim": 12, "image_embed_dim": 16}}},
}
