"""Several processes as one step: time and peak memory per rank for 1, 2 and 4 ranks, and the communication model.

    python benchmarks/distributed.py --ranks 1,2,4 --width 3072 --heads 24 --layers 2 --tokens 2048
    python benchmarks/distributed.py --model-only        # the per-step communication model for A14B

Each measurement launches `mlx.launch -n N --backend ring` on this machine; every rank builds the same random
Wan transformer (real width, reduced depth), runs warm-up and timed forwards of one denoising step (CFG batch 2,
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


def worker(args) -> None:
    import statistics

    import mlx.core as mx

    from mlx_video import distributed
    from mlx_video.families.wan.config import WanTransformerConfig
    from mlx_video.families.wan.transformer import WanTransformer

    cfg = WanTransformerConfig(dim=args.width, ffn_dim=args.width * 4 // 3 * 2, num_heads=args.heads,
                               num_layers=args.layers, in_channels=16, out_channels=16, text_dim=4096)
    mx.random.seed(0)
    model = WanTransformer(cfg)
    mx.eval(model.parameters())
    split = distributed.current_split(uses_cfg=True)
    model.set_sequence_split(split)
    side = int(round((args.tokens) ** 0.5))
    latents = mx.random.normal((1, 1, 2 * side, 2 * side, 16), key=mx.random.key(1))
    context = mx.random.normal((2, 512, 4096), key=mx.random.key(2))
    t = mx.array([500.0])

    def step():
        if split is not None and split.cfg_ranks == 2:
            out = model(latents, t, context[split.cfg_index:split.cfg_index + 1])
            c, u = split.gather_cfg(out)
        else:
            out = model(mx.concatenate([latents, latents]), mx.concatenate([t, t]), context)
            c, u = out[:1], out[1:]
        v = u + 5.0 * (c - u)
        mx.eval(v)

    step()
    mx.reset_peak_memory()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    record = {"rank": distributed.rank(), "ranks": distributed.world_size(), "median_s": statistics.median(times),
              "peak_bytes": mx.get_peak_memory(), "split": split.describe() if split else None,
              "tokens": (2 * side // 2) ** 2}
    print("RESULT " + json.dumps(record), flush=True)


def communication_model() -> list[dict]:
    """Bytes each rank receives per denoising step, and the seconds that costs on two links, for A14B.

    Sequence-parallel over S ranks (per CFG half): per block, K and V of every token (2 N d values) are
    gathered; a rank receives (S - 1) / S of them (with the ring back-end's whole-group gather and CFG-parallel,
    twice that: see mlx_video/distributed.py). Plus the final hidden states (N d, float32) once per step.
    CFG-parallel: one all_gather of the velocity (latent-sized, negligible).
    """
    from mlx_video.families.wan import cost_model as cost
    from mlx_video.registry import get_spec

    spec = get_spec("wan2.2-t2v-a14b")
    d, layers = spec.transformer.dim, spec.transformer.num_layers
    links = {"Thunderbolt 5 RDMA (80 Gb/s)": 10e9, "10 GbE": 1.25e9}
    rows = []
    for (w, h) in ((832, 480), (1280, 720)):
        n = cost.tokens(spec, w, h, 81)
        flops = cost.step_flops(spec, w, h, 81, guidance=True).total
        for ranks in (2, 4):
            cfg_ranks, seq = (2, ranks // 2)
            whole_group = cfg_ranks  # the ring back-end gathers over the whole group
            kv = 2 * n * d * 2 * layers * (seq - 1) / seq * whole_group if seq > 1 else 0.0  # bf16
            latent = (81 - 1) // 4 + 1
            velocity = latent * (h // 8) * (w // 8) * 16 * 4  # the velocity, float32, gathered once per step
            received = kv + n * d * 4 * (seq - 1) / seq * whole_group + velocity
            row = {"size": f"{w}x{h}x81", "tokens": n, "ranks": ranks, "split": f"CFG 2 x sequence {seq}",
                   "bytes_per_step": received, "flops_per_rank_per_step": flops / ranks}
            for name, bandwidth in links.items():
                row[name] = received / bandwidth
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print("communication per denoising step, A14B (40 blocks, dim 5120, bf16 K/V), CFG-parallel x sequence-parallel:")
    for row in communication_model():
        links = ", ".join(f"{k}: {v:.2f} s" for k, v in row.items() if k.startswith(("Thunderbolt", "10 GbE")))
        print(f"  {row['size']} ({row['tokens']} tokens), {row['ranks']} ranks ({row['split']}): "
              f"{row['bytes_per_step'] / 1e9:.1f} GB received per rank per step; {links}; "
              f"{row['flops_per_rank_per_step'] / 1e15:.2f} PFLOP per rank per step")
    if args.model_only:
        return
    launcher = shutil.which("mlx.launch")
    results = []
    for n in [int(r) for r in args.ranks.split(",")]:
        cmd = [sys.executable, __file__, "--worker", "--width", str(args.width), "--heads", str(args.heads),
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
        Path(args.json).write_text(json.dumps({"results": results, "model": communication_model(),
                                               "loadavg": os.getloadavg(), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
