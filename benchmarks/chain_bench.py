"""Peak memory of a chain of clips (mlx_video.chains) against its number of segments:

    python benchmarks/chain_bench.py --segments 1,2,4 --size 160x96 --segment-frames 17 --steps 2

Builds a tiny random A14B-style Wan pipeline with diffusers (tests/support/wan.py; needs torch and diffusers),
converts it to fp32 with `mlxvid convert`, then runs `mlxvid generate --frames N --segment-frames F` for each
segment count in a fresh process (N = F + (count - 1) * (F - 5): every segment renders F frames, the later ones
sharing 5 with the one before), into an .mp4 (or, with --png, a PNG folder). Each child reports MLX's peak
memory over the whole run (the pipeline's decode resets the counter, so the child turns that reset off), the
process's RSS high-water mark (VmHWM), the same after imports, and its RSS (VmRSS) at the end of each segment;
torch is never imported there. What a whole video held in memory would add is printed beside them
(frames x H x W x 3 bytes of uint8), to show what would grow if frames were not streamed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def vm_hwm(field: str = "VmHWM") -> int:
    """This process's RSS high-water mark (VmHWM), or its RSS now (VmRSS). Not ru_maxrss: on Linux that keeps the
    parent's mark from before the fork, and the parent holds torch."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere (macOS: bytes already)


def child(model: str, frames: int, clip: int, size: str, steps: int, output: str) -> None:
    import mlx.core as mx

    import mlx_video.chains  # noqa: F401  (the imports, measured apart)
    import mlx_video.families.wan.pipeline  # noqa: F401

    imports = vm_hwm()
    # RSS at the end of each segment (after its decode): what stays resident from one segment to the next
    after = []
    original = mlx_video.families.wan.pipeline.WanPipeline.decode

    def decode(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        after.append(vm_hwm("VmRSS"))
        return out

    mlx_video.families.wan.pipeline.WanPipeline.decode = decode

    mx.reset_peak_memory()
    mx.reset_peak_memory = lambda: None  # keep the peak of the whole run (decode() resets it per segment)
    from mlx_video.run import run_generation

    start = time.perf_counter()
    result = run_generation({"model": model, "prompt": "a cat walks on the grass", "size": size, "fps": 8,
                             "frames": frames, "segment_frames": clip, "steps": steps, "seed": 0,
                             "output": output, "quiet": True, "overwrite": True}, echo=lambda *a, **k: None)
    seconds = time.perf_counter() - start
    print(json.dumps({"mlx_peak": int(mx.get_peak_memory()), "rss_peak": vm_hwm(), "rss_imports": imports,
                      "rss_after": after,
                      "segments": len(result["segments"]), "frames": result["record"]["output_frames"],
                      "seconds": seconds}))


@click.command()
@click.option("--segments", default="1,2,4", show_default=True)
@click.option("--size", default="160x96", show_default=True)
@click.option("--segment-frames", "clip", type=int, default=17, show_default=True)
@click.option("--steps", type=int, default=2, show_default=True)
@click.option("--png", is_flag=True, help="Write PNG folders instead of .mp4 (no encoder buffers in the RSS).")
@click.option("--child-run", nargs=6, type=str, default=None, hidden=True)
def main(segments, size, clip, steps, png, child_run):
    if child_run:
        model, frames, clip_, size_, steps_, output = child_run
        child(model, int(frames), int(clip_), size_, int(steps_), output)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import mlx.core as mx
    from support.wan import build_tiny_wan_pipeline

    from mlx_video.cli import main as mlxvid

    counts = [int(c) for c in segments.split(",")]
    w, h = (int(v) for v in size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_wan_pipeline(tmp / "diffusers", two_experts=True, shift=12.0)
        mlxvid(["convert", str(tmp / "diffusers"), str(tmp / "mlx"), "--dtype", "fp32"])
        rows = []
        for count in counts:
            frames = clip + (count - 1) * (clip - 5)
            cmd = [sys.executable, __file__, "--child-run", str(tmp / "mlx"), str(frames), str(clip), size, str(steps),
                   str(tmp / (f"out{count}" if png else f"out{count}.mp4"))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 1024**2
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}, "
          f"MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU'} back-end)")
    print(f"command: python benchmarks/chain_bench.py --segments {segments} --size {size} --segment-frames {clip} "
          f"--steps {steps}" + (" --png" if png else ""))
    print("| segments | output frames | MLX peak | RSS peak (VmHWM) | after imports | RSS after each segment: first / "
          "largest / last | the whole video as uint8 | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['segments']} | {r['frames']} | {r['mlx_peak'] / mib:.1f} MiB | {r['rss_peak'] / mib:.0f} MiB | "
              f"{r['rss_imports'] / mib:.0f} MiB | {r['rss_after'][0] / mib:.0f} / {max(r['rss_after']) / mib:.0f} / "
              f"{r['rss_after'][-1] / mib:.0f} MiB | "
              f"{r['frames'] * w * h * 3 / mib:.1f} MiB | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
