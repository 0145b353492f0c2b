"""Several processes as one step: time and peak memory per rank for 1, 2 and 4 ranks, and the communication model.

    python benchmarks/distributed.py --ranks 1,2,4 --width 3072 --heads 24 --layers 2 --tokens 2048
    python benchmarks/distributed.py --model-only        # the per-step communication model for A14B

Each measurement launches `mlx.launch -n N --backend ring` on this machine; every rank builds the same random
transformer (the `split_step` of `--model`'s family bench module, today Wan's: `--width`, reduced depth), runs warm-up and timed forwards of one denoising step (CFG batch 2,
split as the engine splits it: CFG-parallel for an even group, the rest sequence-parallel) and reports its
median time and peak memory. Processes on one host share its cores and memory bus, so this shows the per-rank
memory and that the split works, not the speed-up of separate Macs: that is what the model predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def split_family(model_id: str | None) -> tuple[str, object]:
    """(model id, its family's bench module) for `model_id`, or the first registered model whose family's bench
    module declares `split_step` (the step split over ranks)."""
    from mlx_video.families import bench_module
    from mlx_video.registry import MODELS, get_spec

    for spec in [get_spec(model_id)] if model_id else MODELS.values():
        module = bench_module(spec.family)
        if module is not None and hasattr(module, "split_step"):
            return spec.id, module
    raise SystemExit(f"{model_id or 'no registered model'}: no family bench module declares split_step (the "
                     "step split over ranks)")


def worker(args) -> None:
    import statistics

    import mlx.core as mx

    from mlx_video import distributed

    _, module = split_family(args.model)
    split = distributed.current_split(uses_cfg=True)
    step, tokens = module.split_step(args.width, args.heads, args.layers, args.tokens, split)
    step()
    mx.reset_peak_memory()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    record = {"rank": distributed.rank(), "ranks": distributed.world_size(), "median_s": statistics.median(times),
              "peak_bytes": mx.get_peak_memory(), "split": split.describe() if split else None, "tokens": tokens}
    print("RESULT " + json.dumps(record), flush=True)


def communication_model(model_id: str | None = None) -> list[dict]:
    """Bytes each rank receives per denoising step, and the seconds that costs on two links, for the model
    (default: the first that can be split, A14B) at its landscape sizes and default frame count.

    Sequence-parallel over S ranks (per CFG half): per block, K and V of every token (2 N d values) are
    gathered; a rank receives (S - 1) / S of them (with the ring back-end's whole-group gather and CFG-parallel,
    twice that: see mlx_video/distributed.py). Plus the final hidden states (N d, float32) once per step.
    CFG-parallel: one all_gather of the velocity (latent-sized, negligible).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import step_case

    from mlx_video.families import cost_model
    from mlx_video.registry import get_spec

    spec = get_spec(split_family(model_id)[0])
    cost, frames = cost_model(spec.family), spec.frames
    links = {"Thunderbolt 5 RDMA (80 Gb/s)": 10e9, "10 GbE": 1.25e9}
    rows = []
    for (w, h) in sorted({s for s in spec.sizes if s[0] >= s[1]}, key=lambda s: s[0] * s[1]):
        case = step_case(spec.id, (w, h), frames, 1)
        d, layers = case.width, case.full_layers
        n = cost.tokens(spec, w, h, frames)
        flops = cost.video_flops(spec, w, h, frames, None, True)["per_step"]
        for ranks in (2, 4):
            cfg_ranks, seq = (2, ranks // 2)
            whole_group = cfg_ranks  # the ring back-end gathers over the whole group
            kv = 2 * n * d * 2 * layers * (seq - 1) / seq * whole_group if seq > 1 else 0.0  # bf16
            velocity = case.inputs["latents"].size * 4  # the velocity, float32, gathered once per step
            received = kv + n * d * 4 * (seq - 1) / seq * whole_group + velocity
            row = {"size": f"{w}x{h}x{frames}", "tokens": n, "ranks": ranks, "split": f"CFG 2 x sequence {seq}",
                   "bytes_per_step": received, "flops_per_rank_per_step": flops / ranks}
            for name, bandwidth in links.items():
                row[name] = received / bandwidth
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model whose family's step is split and whose "
                        "communication is modelled (default: the first that can be split)")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    model_id = split_family(args.model)[0]
    print(f"communication per denoising step, {model_id} (bf16 K/V), CFG-parallel x sequence-parallel:")
    for row in communication_model(model_id):
        links = ", ".join(f"{k}: {v:.2f} s" for k, v in row.items() if k.startswith(("Thunderbolt", "10 GbE")))
        print(f"  {row['size']} ({row['tokens']} tokens), {row['ranks']} ranks ({row['split']}): "
              f"{row['bytes_per_step'] / 1e9:.1f} GB received per rank per step; {links}; "
              f"{row['flops_per_rank_per_step'] / 1e15:.2f} PFLOP per rank per step")
    if args.model_only:
        return
    launcher = shutil.which("mlx.launch")
    results = []
    for n in [int(r) for r in args.ranks.split(",")]:
        cmd = [sys.executable, __file__, "--worker", "--model", model_id, "--width", str(args.width),
               "--heads", str(args.heads),
               "--layers", str(args.layers), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        if n > 1:
            cmd = [launcher, "-n", str(n), "--backend", "ring", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ranks = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not ranks:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            raise SystemExit(f"{n} ranks failed")
        results.append({"ranks": n, "per_rank": sorted(ranks, key=lambda r: r["rank"])})
        worst = max(r["median_s"] for r in ranks)
        peak = max(r["peak_bytes"] for r in ranks)
        print(f"{n} rank(s): slowest rank {worst:.2f} s per step, largest per-rank peak {peak / 2**20:.0f} MiB; "
              + "; ".join(f"rank {r['rank']} {r['median_s']:.2f} s {r['peak_bytes'] / 2**20:.0f} MiB" for r in ranks))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "model": communication_model(model_id),
                                               "loadavg": os.getloadavg(), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
