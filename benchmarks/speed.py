"""Step time of a family's transformer, side by side: the step as the harness runs it (text embedding and
cross-attention K/V every step), with the context prepared once (where the family's step case can), compiled with
mx.compile, and with a LoRA fused in.

    python benchmarks/speed.py --model wan2.2-ti2v-5b --size 640x352 --frames 9 --layers 1 --repeats 3

The model's step case (its family's bench module, mlx_video/bench_case.py): real width, `--layers` blocks, random
weights; one step is one forward of the case's batch (with CFG both guidance passes, as the pipeline batches
them) ending in mx.eval. The variants are timed in turn within each repeat (interleaved, so load on a shared
machine hits them alike); the median is reported with the ratio to the first variant, and the peak memory of
each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DEFAULT_MODEL, _materialise, step_case  # noqa: E402


def random_lora(model, rank: int, seed: int = 0):
    """A LoRA of `rank` on every linear layer of the blocks (any list of blocks), as `mlx_video.lora` reads one."""
    from mlx_video.lora import LoraFile, ModuleLora
    from mlx_video.nn.linear import is_linear

    rng = np.random.default_rng(seed)
    modules = {}
    for name, layer in model.named_modules():
        if any(part.endswith("blocks") for part in name.split(".")[:-1]) and is_linear(layer):
            out_dim, in_dim = layer.weight.shape
            down = mx.array(rng.standard_normal((rank, in_dim)).astype(np.float32) / np.sqrt(in_dim))
            up = mx.array(rng.standard_normal((out_dim, rank)).astype(np.float32) * 0.01)
            modules[name] = ModuleLora(name, name, {"down": name, "up": name}, down=down, up=up, alpha=float(rank))
    return LoraFile(path=None, sha256="", format="comfy", modules=modules, default_scale=None)


def variants(case, dtype: str, rank: int) -> dict:
    """name -> a step (no arguments, returns the output) over the case's inputs."""
    from mlx.utils import tree_flatten

    from mlx_video.bench_case import as_mx
    from mlx_video.lora import fuse_loras

    model = case.model(dtype)
    _materialise(model, dtype)
    inputs = as_mx(case.inputs, dtype, case.uncast)
    mx.eval(list(inputs.values()))
    names = list(inputs)
    twin = case.model(dtype)
    twin.load_weights(list(tree_flatten(model.parameters())))
    fuse_loras(twin, [(random_lora(twin, rank), 1.0)])
    if case.prepared_forward is None:  # the family's case has no prepared context: every variant on the plain step
        step, twin_step, label = (lambda x: case.forward(model, x)), (lambda x: case.forward(twin, x)), "plain"
    else:
        step, twin_step, label = case.prepared_forward(model, inputs), case.prepared_forward(twin, inputs), "prepared"
    compiled = mx.compile(lambda *arrays: step(dict(zip(names, arrays))))
    return {
        "base (text + cross K/V every step)": lambda: case.forward(model, inputs),
        **({"context prepared once": lambda: step(inputs)} if label == "prepared" else {}),
        f"{label} + mx.compile (whole step)": lambda: compiled(*inputs.values()),
        f"{label} + fused rank-{rank} LoRA": lambda: twin_step(inputs),
    }


def timings(steps: dict, repeats: int) -> tuple[dict, dict, dict]:
    """(seconds of each repeat, peak memory, max |diff| / max |base| of the warm-up outputs), by variant."""
    reference, agreement = None, {}
    for name, fn in steps.items():  # warm-up (and compile), outputs compared with the base
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        reference = out if reference is None else reference
        agreement[name] = float(mx.abs(out - reference).max() / mx.abs(reference).max())
    times, peaks = {name: [] for name in steps}, {name: 0 for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            mx.reset_peak_memory()
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
    return times, peaks, agreement


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--size", default="640x352")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--layers", default=None, help="N, or per kind of block KIND=N,... (default: the family's)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    case = step_case(args.model, (width, height), args.frames, args.layers, args.dtype)
    times, peaks, agreement = timings(variants(case, args.dtype, args.lora_rank), args.repeats)
    base = statistics.median(next(iter(times.values())))
    depth = ", ".join(f"{n} {k}" for k, n in case.depth.items())
    print(f"{args.model} at width {case.width}, {depth}, {args.size} x {args.frames} frames = {case.tokens} tokens, "
          f"batch {case.batch}, {args.dtype}, {args.repeats} repeats")
    print(f"{'variant':44s} {'median s':>9s} {'ratio':>6s} {'peak GiB':>9s} {'max |diff| / max |base|':>24s}")
    rows = []
    for name in times:
        med = statistics.median(times[name])
        rows.append({"variant": name, "median_s": med, "ratio": med / base, "times": times[name],
                     "peak_bytes": peaks[name], "max_rel_diff": agreement[name]})
        print(f"{name:44s} {med:9.3f} {med / base:6.3f} {peaks[name] / 2**30:9.2f} {agreement[name]:24.1e}")
    if args.json:
        record = {"command": "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:]),
                  "model": args.model, "tokens": case.tokens, "depth": case.depth, "dtype": args.dtype, "rows": rows,
                  "mlx": mx.__version__, "numpy": np.__version__, "python": platform.python_version(),
                  "machine": platform.machine(), "platform": platform.platform(),
                  "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
