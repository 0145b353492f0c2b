"""HunyuanVideo 1.5 VAE decode (and encode): measured peak memory against the preflight's estimate (no torch).

    python benchmarks/hunyuan15_vae.py --cases 3x2x2:none,3x2x2:1,3x2x2:2,2x4x4:1 --json hy15_vae.json
    python benchmarks/hunyuan15_vae.py --cases "" --encode-cases 1x64x64,1x128x128 --json hy15_vae_encode.json

Each case is latent frames x latent height x latent width : chunk (latent frames per decoder step; `none`: the
whole clip at once), decoded untiled by the VAE at its real widths (128/256/512/1024/1024, 32 latent channels;
the decoder's 871M parameters with MLX's random init) in `--dtype`. Peak = `mx.get_peak_memory()` over one
decode minus the memory active before it (the weights and the latents); the estimate is
`mlx_video.families.hunyuan15.vae.decode_memory_bytes` for the same decode, by part. Encode cases are video
frames x height x width, encoded untiled in chunks of 1 latent frame by the encoder (389M parameters), against
`encode_memory_bytes`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import _finish, _fmt_bytes, _materialise, _release, _table  # noqa: E402


def parse_case(text: str) -> tuple[int, int, int, int | None]:
    shape, _, chunk = text.partition(":")
    t, h, w = (int(v) for v in shape.split("x"))
    return t, h, w, None if chunk in ("", "none") else int(chunk)


@click.command()
@click.option("--cases", default="3x2x2:none,3x2x2:1,3x2x2:2", show_default=True)
@click.option("--encode-cases", default="", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--json", "json_path", default=None)
def main(cases: str, encode_cases: str, dtype: str, json_path: str | None) -> None:
    import mlx.core as mx

    from mlx_video.families.hunyuan15.vae import HUNYUAN15_VAE, Hunyuan15VAE, VAETiling, decode_memory_bytes

    act = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[dtype]
    vae = Hunyuan15VAE(HUNYUAN15_VAE, dtype=act)
    weights = _materialise(vae.decoder, dtype) if cases else 0
    s, tc = HUNYUAN15_VAE.spatial_compression, HUNYUAN15_VAE.temporal_compression
    rows, records = [], []
    for text in filter(None, cases.split(",")):
        t, h, w, chunk = parse_case(text)
        latents = mx.random.normal((1, t, h, w, HUNYUAN15_VAE.latent_channels))
        mx.eval(latents)
        _release()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        video = vae.decode(latents, VAETiling(spatial=False, chunk_frames=chunk))
        mx.eval(video)
        seconds = time.perf_counter() - start
        peak = mx.get_peak_memory() - before
        frames = (t - 1) * tc + 1
        est = decode_memory_bytes(w * s, h * s, frames, HUNYUAN15_VAE, VAETiling(spatial=False, chunk_frames=chunk),
                                  dtype_bytes=mx.finfo(act).bits // 8)
        del video
        records.append({"case": text, "frames": frames, "size": f"{w * s}x{h * s}", "seconds": seconds,
                        "peak_bytes": peak, "estimate": est})
        rows.append((text, f"{frames}x{w * s}x{h * s}", f"{seconds:.1f}", _fmt_bytes(peak), _fmt_bytes(est["total"]),
                     f"{est['total'] / peak:.2f}", _fmt_bytes(est["convolution"])))
        _table(rows, click.echo, ("case", "video", "s", "peak", "estimate", "est/peak", "largest conv"))
    if encode_cases:
        del vae.decoder
        weights += _materialise(vae.encoder, dtype)
        records += measure_encodes(vae, encode_cases, mx.finfo(act).bits // 8)
    _finish({"weights_bytes": weights, "dtype": dtype, "cases": records}, json_path, click.echo, " ".join(sys.argv))


def measure_encodes(vae, cases: str, dtype_bytes: int) -> list[dict]:
    import mlx.core as mx

    from mlx_video.families.hunyuan15.vae import HUNYUAN15_VAE, VAETiling, encode_memory_bytes

    rows, records = [], []
    for text in cases.split(","):
        f, h, w = (int(v) for v in text.split("x"))
        video = mx.random.uniform(-1, 1, (1, f, h, w, 3))
        mx.eval(video)
        _release()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(vae.encode(video, VAETiling(spatial=False, chunk_frames=1)))
        seconds, peak = time.perf_counter() - start, mx.get_peak_memory() - before
        est = encode_memory_bytes(w, h, f, HUNYUAN15_VAE, VAETiling(spatial=False, chunk_frames=1), dtype_bytes)
        records.append({"encode": text, "seconds": seconds, "peak_bytes": peak, "estimate": est})
        rows.append((text, f"{seconds:.1f}", _fmt_bytes(peak), _fmt_bytes(est["total"]), f"{est['total'] / peak:.2f}"))
        _table(rows, click.echo, ("encode", "s", "peak", "estimate", "est/peak"))
    return records


if __name__ == "__main__":
    main()
