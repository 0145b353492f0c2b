"""Radial attention against dense attention: one self-attention call at a real video token count.

    python benchmarks/radial_bench.py [--model ID] [--grid 21x45x80] [--grid 21x30x52] [--heads 1]
                                      [--head-dim 128] [--block 64] [--decay 0.8] [--repeat 3] [--json out.json]

A grid is LATENT_FRAMES x HEIGHT_TOKENS x WIDTH_TOKENS after patching: 21x45x80 = 75,600 tokens (Wan 2.2 A14B at
1280x720 x 81 frames), 21x30x52 = 32,760 (832x480 x 81). The tile size and decay default to `--model`'s radial
parameters as `mlx_video.speedup.radial_parameters` finds them (by default the first registered model that has
them: Wan 2.2 A14B's `RADIAL_DEFAULTS`, 64-token tiles, decay 0.8, first-frame rule); the head width is the real
one (128) and the head count is reduced so that a call fits a CPU's time.

For each grid it times, alternating, `mlx_video.nn.attention.attention` (dense; on MLX's CPU back-end the query
blocks of the bounded attention) and `mlx_video.nn.radial.radial_attention` (the portable block-sparse path), on
the same random float32 q, k, v (batch 1), and reports the median time and MLX's peak memory of each, their
ratios, the fraction of the score matrix radial attention computes, and the time to build the mask and plan.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx

from mlx_video.nn.attention import attention
from mlx_video.nn.radial import RadialPlan, radial_attention, radial_block_mask


def parse_grid(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid is FRAMESxHEIGHTxWIDTH in tokens, not {text!r}") from None
    if min(frames, height, width) < 1:
        raise argparse.ArgumentTypeError(f"grid {text!r}: every side must be at least 1")
    return frames, height, width


def timed(fn) -> tuple[float, int]:
    """Seconds and MLX peak bytes of one evaluated call."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start, mx.get_peak_memory()


def bench_grid(grid, heads: int, head_dim: int, block: int, decay: float, first_frame: bool, repeat: int) -> dict:
    frames, height, width = grid
    per_frame = height * width
    tokens = frames * per_frame
    start = time.perf_counter()
    mask = radial_block_mask(frames, per_frame, block=block, decay=decay, first_frame_dense=first_frame)
    plan = RadialPlan.of(mask, block, tokens)
    plan_seconds = time.perf_counter() - start
    q, k, v = (mx.random.normal((1, tokens, heads, head_dim), key=mx.random.key(i)) for i in range(3))
    mx.eval(q, k, v)
    runs = {"dense": [], "radial": []}
    for i in range(repeat):
        runs["dense"].append(timed(lambda: attention(q, k, v)))
        runs["radial"].append(timed(lambda: radial_attention(q, k, v, plan)))
        print(f"  {frames}x{height}x{width} run {i + 1}: dense {runs['dense'][-1][0]:.2f} s, radial "
              f"{runs['radial'][-1][0]:.2f} s", flush=True)
    row = {"grid": f"{frames}x{height}x{width}", "tokens": tokens, "heads": heads, "head_dim": head_dim,
           "block": block, "decay": decay, "score_fraction": plan.score_fraction(),
           "tile_fraction": float(mask.mean()), "calls": len(plan.groups), "plan_seconds": plan_seconds}
    for name, samples in runs.items():
        row[f"{name}_seconds"] = statistics.median(s for s, _ in samples)
        row[f"{name}_seconds_all"] = [round(s, 3) for s, _ in samples]
        row[f"{name}_peak_gib"] = max(p for _, p in samples) / 1024**3
    row["speedup"] = row["dense_seconds"] / row["radial_seconds"]
    row["memory_ratio"] = row["radial_peak_gib"] / row["dense_peak_gib"]
    return row


def radial_defaults(model_id: str | None):
    """(model id, its radial defaults): `model_id`'s, or the first registered model's that has them."""
    from mlx_video.registry import MODELS, get_spec
    from mlx_video.speedup import radial_parameters

    for spec in [get_spec(model_id)] if model_id else MODELS.values():
        found, _, why = radial_parameters(spec)
        if found is not None:
            return spec.id, found
    raise SystemExit(why if model_id else "no registered model has radial-attention defaults")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    model_id, d = radial_defaults(pre.parse_known_args()[0].model)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=model_id, help="the registry model whose radial defaults are used")
    p.add_argument("--grid", type=parse_grid, action="append", help="FRAMESxHEIGHTxWIDTH tokens (repeatable)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=d.block)
    p.add_argument("--decay", type=float, default=d.decay)
    p.add_argument("--no-first-frame", action="store_true", help="without the first-frame rule (HunyuanVideo's)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    grids = a.grid or [(21, 45, 80), (21, 30, 52)]
    print(f"{a.model}'s radial defaults; mlx {mx.__version__}, device {mx.default_device()}, "
          f"{platform.machine()} {platform.system()}, "
          f"{a.repeat} repeats (median), dense and radial alternating")
    rows = []
    for grid in grids:
        row = bench_grid(grid, a.heads, a.head_dim, a.block, a.decay, not a.no_first_frame, a.repeat)
        rows.append(row)
        print(f"{row['grid']} ({row['tokens']} tokens, {a.heads} head(s) of {a.head_dim}, tiles of {a.block}): "
              f"radial computes {row['score_fraction']:.3f} of the scores ({row['tile_fraction']:.3f} of the tiles, "
              f"{row['calls']} attention calls; plan {row['plan_seconds']:.2f} s); "
              f"dense {row['dense_seconds']:.2f} s / {row['dense_peak_gib']:.2f} GiB, radial "
              f"{row['radial_seconds']:.2f} s / {row['radial_peak_gib']:.2f} GiB: {row['speedup']:.2f}x faster, "
              f"{row['memory_ratio']:.2f}x the peak; all runs dense {row['dense_seconds_all']} radial "
              f"{row['radial_seconds_all']}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"mlx": mx.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
