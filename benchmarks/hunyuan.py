"""HunyuanVideo benchmarks, as a script (needs torch and diffusers for `vs-reference`):

    python benchmarks/hunyuan.py vs-reference --size 256x256 --frames 9 --double 1 --single 1 --dtype fp32
    python benchmarks/hunyuan.py vae --size 64x64 --frames 9,17,33

vs-reference: one denoising step of a reduced-depth transformer at the real width (24 heads x 128 = 3072, MLP
12288, the real embedders and token refiner, `--double` double-stream and `--single` single-stream blocks; 256
text tokens, embedded guidance) through ours and through diffusers' HunyuanVideoTransformer3DModel (torch, CPU),
the same random weights (diffusers' init, converted with mlx_video/families/hunyuan/keys.py's DIFFUSERS_TRANSFORMER) and inputs,
in one process, repeats alternating. Memory is measured as `harness.run_vs_reference` does for Wan: ours
mx.get_peak_memory over one step (weights included); the reference its parameter bytes + inputs + the peak of
the tensors alive during the step; both also as RSS high-water growth.

vae: the 884-16c VAE at its real channel widths (128/256/512/512), random weights, decoding latents of each frame
count with the pipeline's tiling (`VAETiling()`: clips of 16 frames with a 4-frame blend, 256-pixel tiles): peak
memory per frame count against `cost.decode_activation_bytes`, the pipeline's estimate of the bound.
"""

from __future__ import annotations

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


REAL_WIDTH = dict(num_attention_heads=24, attention_head_dim=128, mlp_ratio=4.0, text_embed_dim=4096,
                  pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))


def step_pair(size=(256, 256), frames: int = 9, double: int = 1, single: int = 1, refiner: int = 2,
              dtype: str = "fp32", seed: int = 0, device: str = "cpu", **width) -> StepPair:
    """One step (embedded guidance, batch 1, a 77-token prompt of 256 rows) through ours and through diffusers'
    HunyuanVideoTransformer3DModel on the torch `device`: diffusers' random init converted with mlx_video/families/hunyuan/keys.py's
    DIFFUSERS_TRANSFORMER, the same inputs. `width` overrides REAL_WIDTH (tests use a tiny one)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import HunyuanVideoTransformer3DModel
    from mlx.utils import tree_flatten

    from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER, convert_weights, transformer_config_from_diffusers
    from mlx_video.families.hunyuan import cost_model as cost
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    width_px, height = size
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    mdt = {"fp32": mx.float32, "bf16": mx.bfloat16}[dtype]
    kwargs = dict(in_channels=16, out_channels=16, num_layers=double, num_single_layers=single,
                  num_refiner_layers=refiner, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                  rope_theta=256.0, **{**REAL_WIDTH, **width})
    torch.manual_seed(seed)
    with torch.device(device):
        ref = HunyuanVideoTransformer3DModel(**kwargs).eval().to(tdt)
    _release()
    cfg = transformer_config_from_diffusers({"_class_name": "HunyuanVideoTransformer3DModel", **kwargs})
    ours = HunyuanTransformer(cfg, dtype=mdt)
    ours.load_weights(list(convert_weights(DIFFUSERS_TRANSFORMER, {
        k: torch_to_mx(v, dtype) for k, v in ref.state_dict().items()}).items()), strict=True)
    mx.eval(ours.parameters())

    t, h, w = (frames - 1) // 4 + 1, height // 8, width_px // 8
    text_len, text_dim, pooled_dim = 256, kwargs["text_embed_dim"], kwargs["pooled_projection_dim"]
    gen = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn(1, 16, t, h, w, generator=gen).to(tdt)
    text_t = torch.randn(1, text_len, text_dim, generator=gen).to(tdt)
    mask_t = torch.zeros(1, text_len, dtype=torch.int64)
    mask_t[:, :77] = 1  # a prompt of 77 tokens, the rest padding, as the pipeline passes it
    pooled_t = torch.randn(1, pooled_dim, generator=gen).to(tdt)
    guidance = 6.0 * 1000.0
    x_m = torch_to_mx(x_t.permute(0, 2, 3, 4, 1), dtype)
    text_m, pooled_m = torch_to_mx(text_t, dtype), torch_to_mx(pooled_t, dtype)
    mask_m = mx.array(mask_t.numpy().astype(np.int32))
    on_device = [a.to(device) for a in (x_t, text_t, mask_t, pooled_t)]
    step_t = torch.tensor([500.0], device=device)
    guidance_t = torch.tensor([guidance], device=device).to(tdt)

    def ours_step():
        v = ours(x_m, mx.array([500.0]), text_m, mask_m, pooled_m, guidance=mx.array([guidance]))
        mx.eval(v)
        return v

    def ref_step():
        x, text, mask, pooled = on_device
        with torch.inference_mode():
            out = ref(x, step_t, text, mask, pooled, guidance=guidance_t, return_dict=False)[0]
        torch_sync(device)
        return out

    tokens = t * (h // 2) * (w // 2)
    return StepPair(
        ours=ours_step, reference=ref_step, flops=cost.forward_flops(cfg, tokens, text_len).total, tokens=tokens,
        ours_weights_bytes=sum(v.nbytes for _, v in tree_flatten(ours.parameters())),
        reference_weights_bytes=module_bytes(ref),
        inputs_bytes=sum(a.numel() * a.element_size() for a in (x_t, text_t, mask_t, pooled_t)),
        info={"config": cfg.to_dict(), "width": width_px, "height": height, "frames": frames, "double_blocks": double,
              "single_blocks": single, "refiner_blocks": refiner, "dtype": dtype, "batch": 1,
              "text_tokens": text_len,
              "reference": f"diffusers {_version('diffusers')} HunyuanVideoTransformer3DModel, "
                           f"torch {torch.__version__}"},
    )


def run_vs_reference(size=(256, 256), frames: int = 9, double: int = 1, single: int = 1, refiner: int = 2,
                     dtype: str = "fp32", repeats: int = 3, threads: int | None = None, json_path=None, seed: int = 0,
                     echo=click.echo) -> dict:
    import os

    import torch

    width, height = size
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    pair = step_pair(size, frames, double, single, refiner, dtype, seed)
    config = pair.info["config"]
    ref_weights, our_weights, inputs = pair.reference_weights_bytes, pair.ours_weights_bytes, pair.inputs_bytes
    tokens, text_len, flops = pair.tokens, pair.info["text_tokens"], pair.flops
    ours_step, ref_step = pair.ours, pair.reference
    pair = None
    rel_err, ours_times, ref_times, ours_peak, ours_rss, ref_peak, ref_rss = side_by_side(
        ours_step, ref_step, repeats, ref_weights + inputs)
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    record = {
        "harness": "hunyuan-vs-reference", "config": config, "width": width, "height": height, "frames": frames,
        "double_blocks": double, "single_blocks": single, "refiner_blocks": refiner, "dtype": dtype,
        "image_tokens": tokens, "text_tokens": text_len, "repeats": repeats, "torch_threads": threads,
        "reference": f"diffusers {_version('diffusers')} HunyuanVideoTransformer3DModel, torch {torch.__version__}",
        "ours_times_s": ours_times, "reference_times_s": ref_times,
        "ours_seconds_per_step": t_ours, "reference_seconds_per_step": t_ref,
        "time_ratio_ours_over_reference": t_ours / t_ref,
        "time_ratio_min_ours_over_reference": min(ours_times) / min(ref_times),
        "ours_weights_bytes": our_weights, "reference_weights_bytes": ref_weights,
        "ours_peak_memory_bytes": ours_peak, "reference_peak_memory_bytes": ref_peak,
        "memory_ratio_ours_over_reference": ours_peak / ref_peak,
        "ours_rss_hwm_delta_bytes": ours_rss, "reference_rss_hwm_delta_bytes": ref_rss,
        "output_relative_l2_error": rel_err, "flops_per_step_model": flops,
    }
    hidden = config["num_heads"] * config["head_dim"]
    echo(f"hunyuan vs-reference: {width}x{height}x{frames} ({tokens} image + {text_len} text tokens), {double} double + "
         f"{single} single + {refiner} refiner blocks at width {hidden}, {dtype}, torch threads {threads}")
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


def run_vae(size=(64, 64), frame_counts=(9, 17, 33), json_path=None, seed: int = 0, echo=click.echo) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from mlx_video.families.hunyuan import cost_model as cost
    from mlx_video.families.hunyuan.config import HUNYUAN_VAE
    from mlx_video.families.hunyuan.vae import HunyuanVAE, VAETiling

    width, height = size
    mx.random.seed(seed)
    vae = HunyuanVAE(HUNYUAN_VAE, dtype=mx.float32)
    vae.update(tree_map(lambda p: p * 0.05 if p.ndim > 1 else p, vae.parameters()))  # keep activations in range
    mx.eval(vae.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(vae.parameters()))
    tiling = VAETiling()
    rows = []
    for f in frame_counts:
        t = (f - 1) // 4 + 1
        z = mx.random.normal((1, t, height // 8, width // 8, 16), key=mx.random.key(seed + f))
        mx.eval(z)
        _release()
        mx.reset_peak_memory()
        start = time.perf_counter()
        video = np.array(vae.decode(z, tiling=tiling))
        seconds = time.perf_counter() - start
        peak = mx.get_peak_memory()
        estimate = cost.decode_activation_bytes(width, height, f, HUNYUAN_VAE, (tiling.sample_size,) * 2,
                                                tiling.frames + 1)
        rows.append({"frames": f, "latent_frames": t, "decoded_frames": int(video.shape[1]), "seconds": seconds,
                     "peak_memory_bytes": peak, "activation_bytes": peak - weights,
                     "activation_bytes_estimated": estimate, "finite": bool(np.isfinite(video).all())})
        echo(f"  {f} frames: {seconds:.1f} s, peak {_fmt_bytes(peak)}")
        del video
    record = {"harness": "hunyuan-vae", "vae_config": HUNYUAN_VAE.to_dict(), "width": width, "height": height,
              "tiling": vars(tiling), "weights_bytes": weights, "results": rows,
              "activation_growth_last_over_first": rows[-1]["activation_bytes"] / rows[0]["activation_bytes"]}
    echo(f"hunyuan vae decode (tiled): {width}x{height}, real widths {HUNYUAN_VAE.block_out_channels}, fp32, "
         f"weights {_fmt_bytes(weights)}, {mx.default_device()}")
    _table([(r["frames"], f"{r['seconds']:.2f}", _fmt_bytes(r["peak_memory_bytes"]), _fmt_bytes(r["activation_bytes"]),
             _fmt_bytes(r["activation_bytes_estimated"])) for r in rows], echo,
           header=("frames", "seconds", "peak memory", "peak - weights", "estimate (cost.py)"))
    return _finish(record, json_path, echo)


@click.group()
def cli():
    pass


@cli.command("vs-reference")
@click.option("--size", default="256x256", callback=lambda c, p, v: _parse_size(v))
@click.option("--frames", default=9, type=int)
@click.option("--double", default=1, type=int)
@click.option("--single", default=1, type=int)
@click.option("--refiner", default=2, type=int)
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]))
@click.option("--repeats", default=3, type=int)
@click.option("--threads", default=None, type=int)
@click.option("--json", "json_path", default=None)
def vs_reference(size, frames, double, single, refiner, dtype, repeats, threads, json_path):
    run_vs_reference(size, frames, double, single, refiner, dtype, repeats, threads, json_path)


@cli.command("vae")
@click.option("--size", default="64x64", callback=lambda c, p, v: _parse_size(v))
@click.option("--frames", default="9,17,33", callback=lambda c, p, v: [int(x) for x in v.split(",")])
@click.option("--json", "json_path", default=None)
def vae(size, frames, json_path):
    run_vae(size, frames, json_path)


if __name__ == "__main__":
    cli()
