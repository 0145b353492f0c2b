"""Wan's benchmark cases (mlx_video/bench_case.py): one denoising step of a reduced-depth transformer at the real
width, the S2V step's variants, the VAE decode, and the diffusers references (WanTransformer3DModel,
AutoencoderKLWan) as data for benchmarks/harness.py."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import mlx.core as mx
import numpy as np

from mlx_video.bench_case import ReferenceCase, StepCase, VAECase, VAEReferenceCase, blocks_replaced, materialise
from mlx_video.families.wan import cost_model as F
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.pipelines.loop import guidance_batched

DEPTH = {"layers": 2}
GUIDANCE_SCALE = 5.0  # any value != 1 makes the step run both passes; the value does not change the cost
TIMESTEP = 500.0
# wan2.2-s2v-14b: "s2v" (an audio injection after every block), "s2v-no-audio-injection" (the extra reference and
# motion tokens and the audio encoder, no injection), "backbone" (the plain Wan transformer of the same widths)
S2V_VARIANTS = ("s2v", "s2v-no-audio-injection", "backbone")
VARIANTS = {"wan2.2-s2v-14b": S2V_VARIANTS}


def step_case(spec, size, frames, depth, dtype, width=None, seed=0, variant=None, guidance=True) -> StepCase:
    """One step of `spec`'s transformer at `size` / `frames` with depth["layers"] blocks; `width`: config fields
    replacing the release's (tests use a tiny one)."""
    if spec.id in VARIANTS:
        return s2v_step_case(spec, size, frames, depth, width, seed, variant or VARIANTS[spec.id][0])
    if variant:
        raise ValueError(f"{spec.id} has no step variants (only {', '.join(VARIANTS)} have)")
    if type(spec.transformer) is not WanTransformerConfig:
        raise ValueError(f"{spec.id}: the step benchmark builds the text-to-video transformer "
                         f"(WanTransformerConfig), not {type(spec.transformer).__name__}")
    full = replace(spec.transformer, **(width or {}))
    cfg = replace(full, num_layers=depth["layers"])
    grid, latent = _grid(spec, cfg, size, frames)
    batch, text_len = (2 if guidance else 1), spec.default("text_len", 512)
    groups = grid[0] if spec.default("per_frame_timesteps") else 1
    tokens = int(np.prod(grid))
    rng = np.random.default_rng(seed + 1)
    latents = rng.standard_normal((1, *latent, cfg.in_channels), dtype=np.float32)
    context = rng.standard_normal((batch, text_len, cfg.text_dim), dtype=np.float32)
    scale = GUIDANCE_SCALE if guidance else 1.0
    return StepCase(
        model_id=spec.id, config=cfg, depth={"layers": cfg.num_layers}, full_depth={"layers": full.num_layers},
        tokens=tokens, batch=batch, text_tokens=text_len, width=cfg.dim,
        model=lambda dtype: _transformer(cfg, seed), forward=lambda m, x: _velocity(m, x, scale),
        prepared_forward=lambda m, x: _prepared_velocity(m, x, scale),
        inputs={"latents": latents, "context": context},
        flops=F.forward_flops(cfg, tokens, text_len, batch, groups).total,
        full_flops=F.forward_flops(full, tokens, text_len, batch, groups).total,
        without_blocks=partial(blocks_replaced, attribute="blocks", stub=_consume_block_inputs),
        weights_bytes=lambda dt, blocks: F.transformer_weight_bytes(replace(cfg, num_layers=blocks), dt),
        activation_estimate=lambda dt, fused: F.activation_bytes(cfg, tokens, batch, dt, text_len,
                                                                 fused_attention=fused),
        reference=_reference(cfg, latents, context, scale),
        info={"latent": latent, "grid": grid, "groups": groups})


def _grid(spec, cfg, size, frames):
    latent = spec.latent_grid(size[0], size[1], frames)
    if any(n % p for n, p in zip(latent, cfg.patch_size)):
        raise ValueError(f"latent {'x'.join(map(str, latent))} is not a multiple of the patch {cfg.patch_size}")
    return tuple(n // p for n, p in zip(latent, cfg.patch_size)), latent


def _transformer(cfg, seed):
    from mlx_video.families.wan.transformer import WanTransformer

    mx.random.seed(seed)
    return WanTransformer(cfg)


def _velocity(model, x, scale):
    """The step as `generate` runs it by default: with guidance, both passes batched into one forward."""
    context = x["context"]
    uncond = context[1:] if context.shape[0] > 1 else None
    t = mx.array([TIMESTEP], dtype=mx.float32)
    return guidance_batched(model, x["latents"], t, context[:1], uncond, scale)


def _prepared_velocity(model, x, scale):
    """The step with the text context prepared once (text embedding, cross-attention keys and values), as the
    pipeline runs it: a function of the inputs."""
    prepared = model.prepare_context(x["context"])
    batch = x["context"].shape[0]

    def step(inputs):
        t = mx.array([TIMESTEP], dtype=mx.float32)
        uncond = inputs["context"][1:] if batch > 1 else None
        return guidance_batched(lambda xb, tb, c: model(xb, tb, prepared), inputs["latents"], t,
                                inputs["context"][:1], uncond, scale)

    return step


def _consume_block_inputs(hidden, time, context, rope, cross_kv=None):
    return hidden + 0 * context[:, None, :1, :1].astype(hidden.dtype) + 0 * time[:, :, :1, :1].astype(hidden.dtype)


def diffusers_kwargs(config) -> dict:
    """WanTransformer3DModel(**kwargs) with the architecture of our config."""
    return dict(
        patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_channels, out_channels=config.out_channels, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=config.eps, rope_max_seq_len=config.rope_max_positions,
    )


def _convert(state: dict) -> list:
    from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER

    converted = (DIFFUSERS_TRANSFORMER.apply(k, v) for k, v in state.items())
    return [c for c in converted if c is not None]


def _reference(cfg, latents, context, scale) -> ReferenceCase:
    """diffusers' WanTransformer3DModel: (B, C, T, H, W) latents, both passes in one batch (conditional first)."""
    batch = context.shape[0]
    x = np.ascontiguousarray(np.concatenate([latents] * batch).transpose(0, 4, 1, 2, 3))
    return ReferenceCase(
        class_name="WanTransformer3DModel", kwargs=diffusers_kwargs(cfg), convert=_convert,
        inputs={"hidden_states": x, "timestep": np.full((batch,), TIMESTEP, np.float32),
                "encoder_hidden_states": context},
        args=("hidden_states", "timestep", "encoder_hidden_states"), uncast=("timestep",),
        guidance=scale if batch == 2 else None, keep_fp32_modules=True)


# ---------------------------------------------------------------------------------------------- S2V


def s2v_step_case(spec, size, frames, depth, width, seed, variant) -> StepCase:
    """The S2V step (reference and FramePack motion tokens, the audio encoder, audio injections) or its backbone,
    batch 2 in one forward as the pipeline batches the two passes; no diffusers reference."""
    if variant not in S2V_VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of {spec.id}; it has {', '.join(S2V_VARIANTS)}")
    layers = depth["layers"]
    full = replace(spec.transformer, **(width or {}))
    inject = tuple(range(layers)) if variant == "s2v" else ()
    cfg = replace(full, num_layers=layers, audio_inject_layers=inject)
    t, h, w = spec.latent_grid(size[0], size[1], frames)
    rng = np.random.default_rng(seed + 1)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    inputs = {"latents": normal(2, t, h, w, cfg.in_channels), "context": normal(2, cfg.text_len, cfg.text_dim, scale=0.1)}
    if variant != "backbone":
        inputs.update(reference=normal(2, 1, h, w, cfg.in_channels),
                      motion=normal(2, cfg.motion_latent_frames, h, w, cfg.in_channels),
                      audio=normal(2, frames, cfg.audio_layers, cfg.audio_dim, scale=0.1))
    video = t * (h // 2) * (w // 2)
    extra = (h // 2) * (w // 2) * 2 + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8) if variant != "backbone" else 0
    backbone = WanTransformerConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                                if k in WanTransformerConfig.__dataclass_fields__})
    full_backbone = replace(backbone, num_layers=full.num_layers)
    return StepCase(
        model_id=spec.id, config=cfg, depth={"layers": layers}, full_depth={"layers": full.num_layers},
        tokens=video + extra, batch=2, text_tokens=cfg.text_len, width=cfg.dim, variant=variant,
        model=lambda dtype: _s2v_transformer(cfg, backbone, variant, dtype, seed), forward=_s2v_forward(),
        inputs=inputs, flops=F.forward_flops(backbone, video + extra, cfg.text_len, 2).total,
        full_flops=F.forward_flops(full_backbone, video + extra, cfg.text_len, 2).total,
        info={"video_tokens": video, "reference_motion_tokens": extra, "audio_injections": len(inject),
              "flops_note": "the backbone's FLOPs over all tokens; the audio encoder and injections not counted"})


def _s2v_transformer(cfg, backbone, variant, dtype, seed):
    from mlx_video.bench_case import DTYPES
    from mlx_video.families.wan.s2v_model import WanS2VTransformer
    from mlx_video.families.wan.transformer import WanTransformer

    mx.random.seed(seed)
    if variant == "backbone":
        return WanTransformer(backbone, dtype=DTYPES[dtype])
    return WanS2VTransformer(cfg, dtype=DTYPES[dtype])


def _s2v_forward():
    prepared = {}  # the text context is prepared once per video by the pipeline: once per model here

    def forward(model, x):
        key = id(model)
        if key not in prepared or prepared[key][0] is not model:
            prepared[key] = (model, model.prepare_context(x["context"]))
        t = mx.array([TIMESTEP] * 2)
        if "audio" not in x:
            return model(x["latents"], t, prepared[key][1])
        return model(x["latents"], t, prepared[key][1], ref_latents=x["reference"], motion_latents=x["motion"],
                     audio=x["audio"])

    return forward


# ---------------------------------------------------------------------------------------------- VAE


def vae_case(spec, dtype="fp32", width=None, chunk=None, seed=0) -> VAECase:
    """The VAE decoder of `spec` at its real widths (`width={"base_dim": n}` narrows it, the decoder's own base
    width scaled alike; other keys replace config fields), decoded one latent frame at a time as the pipeline
    does (`decode_chunks`), each chunk copied out as uint8 frames."""
    from mlx_video.families.wan.vae import WanVAE

    if chunk is not None:
        raise ValueError("the Wan VAE decodes one latent frame at a time (decode_chunks): --chunk is not taken")
    cfg = _vae_config(spec, dict(width or {}))
    mx.random.seed(seed)
    vae = WanVAE(cfg)

    def decode(z):
        n = 0
        for piece in vae.decode_chunks(z):
            pixels = mx.round((piece[0].astype(mx.float32) + 1.0) * 127.5)
            n += np.array(mx.clip(pixels, 0, 255).astype(mx.uint8)).shape[0]
        return n

    return VAECase(
        description=f"base_dim {cfg.base_dim}, decoder {cfg.decoder_dim}, z {cfg.z_dim}", config=cfg.to_dict(),
        spatial=cfg.scale_factor_spatial, temporal=cfg.scale_factor_temporal, latent_channels=cfg.z_dim,
        load=lambda dtype, part="decoder": materialise(vae, dtype), decode=decode,
        estimate=lambda w, h, frames: F.vae_decode_chunk_bytes(cfg, w, h))


def _vae_config(spec, width: dict):
    from mlx_video.families.wan.vae import WanVAEConfig

    cfg = F.vae_config_for(spec)
    if isinstance(width.get("config"), WanVAEConfig):  # a whole config (tests use a tiny one)
        return width.pop("config")
    base = width.pop("base_dim", None)
    if base:
        ratio = base / cfg.base_dim
        cfg = replace(cfg, base_dim=base,
                      decoder_base_dim=None if cfg.decoder_base_dim is None else int(cfg.decoder_base_dim * ratio))
    return replace(cfg, **width)


def vae_reference_case(kwargs: dict, size, latent_frames: int, seed: int = 0) -> VAEReferenceCase:
    """diffusers' AutoencoderKLWan(**kwargs) (an empty dict is its default, Wan 2.1's VAE, A14B's) against ours
    converted through vae_keys.DIFFUSERS_VAE, fp32: ours decodes normalised latents, the reference the same
    latents de-normalised by its latents_mean / latents_std, as the pipeline does."""
    def latents(config):
        from mlx_video.families.wan.vae import WanVAEConfig

        stride = WanVAEConfig.from_diffusers(config).scale_factor_spatial
        shape = (1, latent_frames, size[1] // stride, size[0] // stride, config["z_dim"])
        return np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)

    def reference_latents(config):
        mean, std = (np.asarray(config[k], np.float32).reshape(1, -1, 1, 1, 1)
                     for k in ("latents_mean", "latents_std"))
        return np.ascontiguousarray(latents(config).transpose(0, 4, 1, 2, 3)) * std + mean

    return VAEReferenceCase(class_name="AutoencoderKLWan", kwargs=kwargs, convert=_convert_vae,
                            ours=lambda config, weights: _vae_decoder(config, weights, latents(config)),
                            reference_latents=reference_latents, latents=latents)


def _convert_vae(state: dict) -> list:
    from mlx_video.families.wan.vae_keys import DIFFUSERS_VAE

    return [DIFFUSERS_VAE.apply(k, v) for k, v in state.items()]


def _vae_decoder(config: dict, weights: list, latents: np.ndarray):
    from mlx_video.families.wan.vae import WanVAE, WanVAEConfig

    ours = WanVAE(WanVAEConfig.from_diffusers(config))
    ours.load_weights(weights, strict=True)
    mx.eval(ours.parameters())
    z = mx.array(latents)

    def decode():
        video = ours.decode(z)
        mx.eval(video)
        return video

    return decode


# ---------------------------------------------------------------------------------------------- GPU check

A14B_480P = {"model": "wan2.2-t2v-a14b", "size": [832, 480], "frames": 81, "depth": {"layers": 2}}
GPU_CHECK = {
    # the A14B step at 480p (32,760 tokens), the Wan 2.1 VAE (A14B's) decode of 21 latent frames at 832x480, and
    # radial attention at 720p's token grid with A14B's RADIAL_DEFAULTS
    "real": {"step": A14B_480P, "vae": {"size": [832, 480], "latent_frames": 21},
             "radial": {"model": "wan2.2-t2v-a14b", "grid": [21, 45, 80], "heads": 40, "head_dim": 128}},
    # tiny: the same code paths, heads of 32 channels, odd token counts
    "dry": {"step": {**A14B_480P, "size": [48, 32], "frames": 5,
                     "width": {"dim": 64, "ffn_dim": 96, "freq_dim": 32, "text_dim": 24, "num_heads": 2,
                               "in_channels": 16, "out_channels": 16}},
            "vae": {"size": [40, 24], "latent_frames": 2,
                    "kwargs": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                               "temperal_downsample": [False, True, True], "latents_mean": [0.1, -0.2, 0.0, 0.3],
                               "latents_std": [0.9, 1.1, 1.3, 0.7]}},
            "radial": {"model": "wan2.2-t2v-a14b", "grid": [3, 4, 8], "heads": 2, "head_dim": 40, "block": 16,
                       "decay": 0.8}},
}


# ---------------------------------------------------------------------------------------------- several ranks


def split_step(width: int, heads: int, layers: int, tokens: int, split, seed: int = 0):
    """(step, video tokens) of benchmarks/distributed.py: one CFG step (guidance 5) of a random transformer of
    `width` (`heads` heads, FFN 8/3 x width, text width 4096), `layers` blocks, on a square grid of about `tokens`
    video tokens and 512 text tokens, split over the ranks as the engine splits it (`split`, a
    mlx_video.distributed.Split, or None alone): CFG-parallel when two ranks share the CFG pair, the rest
    sequence-parallel through the transformer's `set_sequence_split`."""
    from mlx_video.families.wan.transformer import WanTransformer

    cfg = WanTransformerConfig(dim=width, ffn_dim=width * 4 // 3 * 2, num_heads=heads, num_layers=layers,
                               in_channels=16, out_channels=16, text_dim=4096)
    mx.random.seed(seed)
    model = WanTransformer(cfg)
    mx.eval(model.parameters())
    model.set_sequence_split(split)
    side = int(round(tokens ** 0.5))
    latents = mx.random.normal((1, 1, 2 * side, 2 * side, 16), key=mx.random.key(seed + 1))
    context = mx.random.normal((2, 512, 4096), key=mx.random.key(seed + 2))
    t = mx.array([TIMESTEP])

    def step():
        if split is not None and split.cfg_ranks == 2:
            out = model(latents, t, context[split.cfg_index:split.cfg_index + 1])
            c, u = split.gather_cfg(out)
        else:
            out = model(mx.concatenate([latents, latents]), mx.concatenate([t, t]), context)
            c, u = out[:1], out[1:]
        mx.eval(u + GUIDANCE_SCALE * (c - u))

    return step, side * side
