"""HunyuanVideo 1.5's benchmark cases (mlx_video/bench_case.py): the VAE at its real widths (128/256/512/1024/1024,
32 latent channels; the decoder's 871M parameters, the encoder's 389M, MLX's random init), decoded (encoded)
untiled `chunk` latent frames per step, against the preflight's estimates `vae.decode_memory_bytes` and
`vae.encode_memory_bytes`. No step case yet."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from mlx_video.bench_case import DTYPES, VAECase, materialise

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
