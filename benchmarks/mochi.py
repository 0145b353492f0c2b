"""Mochi 1 benchmarks, as a script (needs torch and diffusers for `vs-reference`):

    python benchmarks/mochi.py vs-reference --size 256x256 --frames 7 --layers 2 --dtype fp32
    python benchmarks/mochi.py vae --latent 16x16 --latent-frames 1,2,4 --chunk 1

vs-reference: one denoising step of a reduced-depth AsymmDiT at the real widths (visual 3072, text 1536, 24 heads
x 128, the real T5 attention pool and caption projection from 4096; `--layers` blocks, the last of which updates
the visual stream only) through ours and through diffusers' MochiTransformer3DModel (torch, CPU), the same random
weights (diffusers' init, converted with mlx_video/families/mochi/keys.py's DIFFUSERS_TRANSFORMER) and inputs, in one process,
repeats alternating. Classifier-free guidance batched (batch 2: the prompt, 77 of 256 tokens valid, and the
negative prompt, 12 valid), as the pipeline runs it. Memory is measured as `harness.run_vs_reference` does for
Wan: ours mx.get_peak_memory over one step (weights included); the reference its parameter bytes + inputs + the
peak of the tensors alive during the step; both also as RSS high-water growth.

vae: the AsymmVAE decoder at its real channel widths (128/256/512/768, 362M parameters), random weights, fp32,
decoding latents of each frame count `--chunk` latent frames at a time (`MochiVAE.decode(z, chunk_frames=...)`,
as the pipeline does): peak memory per frame count, and the pipeline's estimate (`cost.decode_activation_bytes`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    StepPair,
    _finish,
    _fmt_bytes,
    _release,
    _table,
    _version,
    module_bytes,
    side_by_side,
    torch_sync,
    torch_to_mx,
)


def _parse_size(value: str) -> tuple[int, int]:
    w, h = value.lower().split("x")
    return int(w), int(h)


def step_pair(size=(256, 256), frames: int = 7, layers: int = 2, dtype: str = "fp32", seed: int = 0,
              device: str = "cpu", **width) -> StepPair:
    """One CFG-batched step (batch 2: 77 and 12 valid of 256 text rows) through ours and through diffusers'
    MochiTransformer3DModel on the torch `device`: diffusers' random init converted with mlx_video/families/mochi/keys.py's
    DIFFUSERS_TRANSFORMER, the same inputs. `width`: MochiTransformer3DModel arguments replacing its defaults
    (Mochi 1 preview's widths; tests use tiny ones)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import MochiTransformer3DModel
    from mlx.utils import tree_flatten

    from mlx_video.families.mochi.keys import DIFFUSERS_TRANSFORMER, convert_weights, transformer_config_from_diffusers
    from mlx_video.families.mochi import cost_model as cost
    from mlx_video.families.mochi.transformer import MochiTransformer

    width_px, height = size
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    mdt = {"fp32": mx.float32, "bf16": mx.bfloat16}[dtype]
    torch.manual_seed(seed)
    with torch.device(device):
        ref = MochiTransformer3DModel(num_layers=layers, **width).eval().to(tdt)
    _release()
    cfg = transformer_config_from_diffusers({"_class_name": "MochiTransformer3DModel", **ref.config})
    ours = MochiTransformer(cfg, compute_dtype=mdt)
    ours.load_weights(list(convert_weights(DIFFUSERS_TRANSFORMER, {
        k: torch_to_mx(v, dtype) for k, v in ref.state_dict().items()}).items()), strict=True)
    mx.eval(ours.parameters())

    t, h, w = (frames - 1) // 6 + 1, height // 8, width_px // 8
    text_len, valid = 256, (77, 12)
    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(1, cfg.in_channels, t, h, w, generator=gen).to(tdt)
    text_t = torch.randn(2, text_len, cfg.t5_dim, generator=gen).to(tdt)
    mask_t = torch.zeros(2, text_len, dtype=torch.int64)
    for row, n in enumerate(valid):
        mask_t[row, :n] = 1
    x_m = torch_to_mx(x_t.permute(0, 2, 3, 4, 1), dtype)
    text_m = torch_to_mx(text_t, dtype)
    mask_m = mx.array(mask_t.numpy().astype(np.int32))
    x2, text_d, mask_d = torch.cat([x_t, x_t]).to(device), text_t.to(device), mask_t.to(device)
    timestep = 500.0
    steps_t = torch.tensor([timestep] * 2, device=device)

    def ours_step():
        out = ours(mx.concatenate([x_m, x_m]), mx.array([timestep] * 2), text_m, mask_m)
        mx.eval(out)
        return out

    def ref_step():
        with torch.inference_mode():
            out = ref(x2, text_d, steps_t, mask_d, return_dict=False)[0]
        torch_sync(device)
        return out

    tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    return StepPair(
        ours=ours_step, reference=ref_step, flops=cost.forward_flops(cfg, tokens, text_len, batch=2).total,
        tokens=tokens, ours_weights_bytes=sum(v.nbytes for _, v in tree_flatten(ours.parameters())),
        reference_weights_bytes=module_bytes(ref),
        inputs_bytes=sum(a.numel() * a.element_size() for a in (x_t, text_t, mask_t)),
        info={"config": cfg.to_dict(), "width": width_px, "height": height, "frames": frames, "layers": layers,
              "dtype": dtype, "batch": 2, "text_tokens": text_len, "valid_text_tokens": list(valid),
              "reference": f"diffusers {_version('diffusers')} MochiTransformer3DModel, torch {torch.__version__}"},
    )


def run_vs_reference(size=(256, 256), frames: int = 7, layers: int = 2, dtype: str = "fp32", repeats: int = 3,
                     threads: int | None = None, json_path=None, seed: int = 0, echo=click.echo) -> dict:
    import torch

    width, height = size
    threads = threads or int(os.environ.get("OPENBLAS_NUM_THREADS", 0)) or os.cpu_count()
    torch.set_num_threads(threads)
    pair = step_pair(size, frames, layers, dtype, seed)
    config = pair.info["config"]
    ref_weights, our_weights, inputs = pair.reference_weights_bytes, pair.ours_weights_bytes, pair.inputs_bytes
    tokens, text_len, flops, valid = pair.tokens, pair.info["text_tokens"], pair.flops, pair.info["valid_text_tokens"]
    ours_step, ref_step = pair.ours, pair.reference
    pair = None
    rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_peak, ref_rss = side_by_side(
        ours_step, ref_step, repeats, ref_weights + inputs)
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    record = {
        "harness": "mochi-vs-reference", "config": config, "width": width, "height": height, "frames": frames,
        "layers": layers, "dtype": dtype, "batch": 2, "visual_tokens": tokens, "text_tokens": text_len,
        "valid_text_tokens": list(valid), "repeats": repeats, "torch_threads": threads,
        "reference": f"diffusers {_version('diffusers')} MochiTransformer3DModel, torch {torch.__version__}",
        "ours_times_s": ours_times, "reference_times_s": ref_times,
        "ours_seconds_per_step": t_ours, "reference_seconds_per_step": t_ref,
        "time_ratio_ours_over_reference": t_ours / t_ref,
        "time_ratio_min_ours_over_reference": min(ours_times) / min(ref_times),
        "ours_weights_bytes": our_weights, "reference_weights_bytes": ref_weights,
        "ours_peak_memory_bytes": ours_peak, "reference_peak_memory_bytes": ref_peak,
        "reference_tracked_activation_peak_bytes": ref_peak - (ref_weights + inputs),
        "memory_ratio_ours_over_reference": ours_peak / ref_peak,
        "ours_rss_hwm_delta_bytes": ours_rss, "reference_rss_hwm_delta_bytes": ref_rss,
        "output_relative_l2_error": rel_err, "flops_per_step_model": flops,
    }
    widths = f"{config['num_heads'] * config['head_dim']}/{config['text_dim']}"
    echo(f"mochi vs-reference: {width}x{height}x{frames} ({tokens} visual + {text_len} text tokens, batch 2), {layers} "
         f"blocks at widths {widths}, {dtype}, torch threads {threads}")
    _table([
        ("seconds per step (median)", f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ours / t_ref:.3f}"),
        ("seconds per step (fastest)", f"{min(ours_times):.3f}", f"{min(ref_times):.3f}",
         f"{min(ours_times) / min(ref_times):.3f}"),
        ("peak memory (allocator)", _fmt_bytes(ours_peak), _fmt_bytes(ref_peak), f"{ours_peak / ref_peak:.3f}"),
        ("  of which weights", _fmt_bytes(our_weights), _fmt_bytes(ref_weights), ""),
        ("RSS high-water growth", _fmt_bytes(ours_rss), _fmt_bytes(ref_rss), ""),
    ], echo, header=("", "ours (MLX)", "reference (torch)", "ours/ref"))
    echo(f"output relative L2 difference: {rel_err:.2e}; model FLOPs per step {flops / 1e12:.3f} T")
    return _finish(record, json_path, echo)


def run_vae(latent=(16, 16), latent_frames=(1, 2, 4), chunk: int | None = 1, json_path=None, seed: int = 0,
            echo=click.echo) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from mlx_video.families.mochi import cost_model as cost
    from mlx_video.families.mochi.config import MOCHI_VAE
    from mlx_video.families.mochi.vae import MochiVAE

    lw, lh = latent
    s, ts = MOCHI_VAE.spatial_compression, MOCHI_VAE.temporal_compression
    width, height = lw * s, lh * s
    mx.random.seed(seed)
    vae = MochiVAE(MOCHI_VAE)  # the encoder's weights are never evaluated, so never allocated
    vae.decoder.update(tree_map(lambda p: p * 0.05 if p.ndim > 1 else p, vae.decoder.parameters()))  # in range
    mx.eval(vae.decoder.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(vae.decoder.parameters()))
    rows = []
    for t in latent_frames:
        z = mx.random.normal((1, t, lh, lw, MOCHI_VAE.latent_channels), key=mx.random.key(seed + t))
        mx.eval(z)
        _release()
        mx.reset_peak_memory()
        start = time.perf_counter()
        video = np.array(vae.decode(z, chunk_frames=chunk))
        seconds = time.perf_counter() - start
        peak = mx.get_peak_memory()
        frames = ts * (t - 1) + 1
        estimate = cost.decode_activation_bytes(width, height, frames, MOCHI_VAE, chunk)
        rows.append({"latent_frames": t, "frames": frames, "decoded_frames": int(video.shape[1]), "seconds": seconds,
                     "peak_memory_bytes": peak, "activation_bytes": peak - weights,
                     "activation_bytes_estimated": estimate, "finite": bool(np.isfinite(video).all())})
        del video
    record = {"harness": "mochi-vae", "vae_config": MOCHI_VAE.to_dict(), "width": width, "height": height,
              "latent": [lw, lh], "chunk_frames": chunk, "weights_bytes": weights, "results": rows,
              "peak_last_over_first": rows[-1]["peak_memory_bytes"] / rows[0]["peak_memory_bytes"]}
    echo(f"mochi vae decode: {width}x{height} ({lw}x{lh} latents), decoder widths {MOCHI_VAE.decoder_channels}, fp32, "
         f"{chunk or 'all'} latent frame(s) per chunk, weights {_fmt_bytes(weights)}, {mx.default_device()}")
    _table([(r["latent_frames"], r["decoded_frames"], f"{r['seconds']:.2f}", _fmt_bytes(r["peak_memory_bytes"]),
             _fmt_bytes(r["activation_bytes"]), _fmt_bytes(r["activation_bytes_estimated"])) for r in rows], echo,
           header=("latent frames", "frames", "seconds", "peak memory", "peak - weights", "estimate (cost.py)"))
    return _finish(record, json_path, echo)


@click.group()
def cli():
    pass


@cli.command("vs-reference")
@click.option("--size", default="256x256", callback=lambda c, p, v: _parse_size(v))
@click.option("--frames", default=7, type=int)
@click.option("--layers", default=2, type=int)
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]))
@click.option("--repeats", default=3, type=int)
@click.option("--threads", default=None, type=int)
@click.option("--json", "json_path", default=None)
def vs_reference(size, frames, layers, dtype, repeats, threads, json_path):
    run_vs_reference(size, frames, layers, dtype, repeats, threads, json_path)


@cli.command("vae")
@click.option("--latent", default="16x16", callback=lambda c, p, v: _parse_size(v))
@click.option("--latent-frames", default="1,2,4", callback=lambda c, p, v: [int(x) for x in v.split(",")])
@click.option("--chunk", default=1, type=int, help="latent frames per decoded chunk; 0: all at once")
@click.option("--json", "json_path", default=None)
def vae(latent, latent_frames, chunk, json_path):
    run_vae(latent, latent_frames, chunk or None, json_path)


if __name__ == "__main__":
    cli()
