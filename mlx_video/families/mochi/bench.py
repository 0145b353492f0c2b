"""Mochi's benchmark cases (mlx_video/bench_case.py): one denoising step of a reduced-depth AsymmDiT at the real
widths (visual 3072, text 1536, 24 heads x 128, the real T5 attention pool and caption projection from 4096; the
last block updates the visual stream only), classifier-free guidance batched (batch 2: the prompt, 77 of 256
tokens valid, and the negative prompt, 12 valid) as the pipeline runs it; the AsymmVAE decode; and diffusers'
MochiTransformer3DModel as data for benchmarks/harness.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_video.bench_case import DTYPES, ReferenceCase, StepCase, VAECase, materialise
from mlx_video.families.mochi import cost_model as cost

DEPTH = {"layers": 2}
TIMESTEP = 500.0
VALID_TEXT = (77, 12)  # valid tokens of the prompt and of the negative prompt
# diffusers' MochiTransformer3DModel arguments at Mochi 1 preview's widths (its defaults, genmo/mochi-1-preview's
# transformer/config.json); the depth comes from the case
REAL_WIDTH = dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, pooled_projection_dim=1536,
                  in_channels=12, qk_norm="rms_norm", text_embed_dim=4096, time_embed_dim=256, activation_fn="swiglu",
                  max_sequence_length=256)


def step_case(spec, size, frames, depth, dtype, width=None, seed=0, variant=None, guidance=True) -> StepCase:
    """`width`: MochiTransformer3DModel arguments replacing REAL_WIDTH (tests use tiny ones). Always the CFG
    batch of 2 (the pipeline's), whatever `guidance` says."""
    from dataclasses import replace

    from mlx_video.families.mochi.keys import transformer_config_from_diffusers

    if variant:
        raise ValueError(f"{spec.id} has no step variants")
    kwargs = {**REAL_WIDTH, **(width or {}), "num_layers": depth["layers"]}
    cfg = transformer_config_from_diffusers({"_class_name": "MochiTransformer3DModel", **kwargs})
    t, h, w = spec.latent_grid(size[0], size[1], frames)
    tokens, text_len = t * (h // cfg.patch_size) * (w // cfg.patch_size), cfg.t5_length
    inputs = _inputs(cfg, (t, h, w), text_len, seed)
    return StepCase(
        model_id=spec.id, config=cfg, depth=dict(depth), full_depth={"layers": spec.transformer.num_layers},
        tokens=tokens, batch=2, text_tokens=text_len, width=cfg.dim, model=lambda dt: _transformer(cfg, dt, seed),
        forward=_forward, inputs=inputs, flops=cost.forward_flops(cfg, tokens, text_len, batch=2).total,
        full_flops=cost.forward_flops(replace(cfg, num_layers=spec.transformer.num_layers), tokens, text_len,
                                      batch=2).total,
        reference=_reference(kwargs, inputs), info={"latent": (t, h, w), "valid_text_tokens": list(VALID_TEXT)})


def _inputs(cfg, latent, text_len, seed) -> dict:
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros((2, text_len), np.int32)
    for row, n in enumerate(VALID_TEXT):
        mask[row, :n] = 1
    return {"latents": rng.standard_normal((1, *latent, cfg.in_channels), dtype=np.float32),
            "text": rng.standard_normal((2, text_len, cfg.t5_dim), dtype=np.float32), "mask": mask}


def _transformer(cfg, dtype, seed):
    from mlx_video.families.mochi.transformer import MochiTransformer

    mx.random.seed(seed)
    return MochiTransformer(cfg, compute_dtype=DTYPES[dtype])


def _forward(model, x):
    latents = x["latents"]
    return model(mx.concatenate([latents, latents]), mx.array([TIMESTEP] * 2), x["text"], x["mask"])


def _convert(state: dict) -> list:
    from mlx_video.families.mochi.keys import DIFFUSERS_TRANSFORMER, convert_weights

    return list(convert_weights(DIFFUSERS_TRANSFORMER, state).items())


def _reference(kwargs, inputs) -> ReferenceCase:
    """diffusers' MochiTransformer3DModel: (B, C, T, H, W) latents, both passes in one batch, the mask as int64;
    its output is the batch of 2, as ours."""
    x = np.ascontiguousarray(np.concatenate([inputs["latents"]] * 2).transpose(0, 4, 1, 2, 3))
    return ReferenceCase(
        class_name="MochiTransformer3DModel", kwargs=kwargs, convert=_convert,
        inputs={"hidden_states": x, "encoder_hidden_states": inputs["text"],
                "timestep": np.full((2,), TIMESTEP, np.float32),
                "encoder_attention_mask": inputs["mask"].astype(np.int64)},
        args=("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"), uncast=("timestep",))


def vae_case(spec, dtype="fp32", width=None, chunk=None, seed=0) -> VAECase:
    """The AsymmVAE decoder at its real channel widths (128/256/512/768, 362M parameters), weights scaled by 0.05
    to keep activations in range, decoding `chunk` latent frames at a time (1 by default, as the pipeline does;
    0: all at once), against `cost.decode_activation_bytes`."""
    from mlx.utils import tree_map

    from mlx_video.families.mochi.config import MOCHI_VAE
    from mlx_video.families.mochi.vae import MochiVAE

    if width:
        raise ValueError("the Mochi VAE case takes no --width")
    chunk = 1 if chunk is None else (chunk or None)
    mx.random.seed(seed)
    vae = MochiVAE(MOCHI_VAE)  # the encoder's weights are never evaluated, so never allocated

    def load(dtype, part="decoder"):
        vae.decoder.update(tree_map(lambda p: p * 0.05 if p.ndim > 1 else p, vae.decoder.parameters()))
        return materialise(vae.decoder, dtype)

    def decode(z):
        return int(np.array(vae.decode(z, chunk_frames=chunk)).shape[1])

    return VAECase(
        description=f"decoder widths {MOCHI_VAE.decoder_channels}, {chunk or 'all'} latent frame(s) per chunk",
        config=MOCHI_VAE.to_dict(), spatial=MOCHI_VAE.spatial_compression, temporal=MOCHI_VAE.temporal_compression,
        latent_channels=MOCHI_VAE.latent_channels, load=load, decode=decode,
        estimate=lambda w, h, frames: cost.decode_activation_bytes(w, h, frames, MOCHI_VAE, chunk))


GPU_CHECK = {
    "real": {"step": {"model": "mochi-1-preview", "size": [848, 480], "frames": 85, "depth": {"layers": 2}}},
    "dry": {"step": {"model": "mochi-1-preview", "size": [48, 32], "frames": 7, "depth": {"layers": 2},
                     "width": {"num_attention_heads": 3, "attention_head_dim": 20, "pooled_projection_dim": 36,
                               "text_embed_dim": 48, "time_embed_dim": 32}}},
}
