"""Step time of the Wan transformer, side by side: as the pipeline ran it before (text embedding and cross-attention
K/V every step), with the context prepared once, compiled with mx.compile, and with a LoRA fused in.

    python benchmarks/speed.py --model wan2.2-ti2v-5b --size 640x352 --frames 9 --layers 1 --repeats 3

Real width (dim, ffn, heads, text width of the registry model), `--layers` blocks, random weights; one step is
one forward of batch 2 (both guidance passes, as the pipeline batches them) ending in mx.eval. The variants are
timed in turn within each repeat (interleaved, so load on a shared machine hits them alike); the median is
reported with the ratio to the first variant, and the peak memory of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx
import numpy as np


def build(model_id: str, layers: int, dtype):
    from mlx_video.families.wan.transformer import WanTransformer
    from mlx_video.registry import get_spec

    spec = get_spec(model_id)
    config = spec.transformer
    config = type(config).from_dict({**config.to_dict(), "num_layers": layers})
    model = WanTransformer(config, dtype=dtype)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return spec, config, model


def random_lora(model, rank: int, seed: int = 0):
    """A LoRA of `rank` on every linear layer of the blocks, as `mlx_video.lora` reads one from a file."""
    from mlx_video.lora import LoraFile, ModuleLora
    from mlx_video.nn.linear import is_linear

    rng = np.random.default_rng(seed)
    modules = {}
    for name, layer in model.named_modules():
        if name.startswith("blocks.") and is_linear(layer):
            out_dim, in_dim = layer.weight.shape
            down = mx.array(rng.standard_normal((rank, in_dim)).astype(np.float32) / np.sqrt(in_dim))
            up = mx.array(rng.standard_normal((out_dim, rank)).astype(np.float32) * 0.01)
            modules[name] = ModuleLora(name, name, {"down": name, "up": name}, down=down, up=up, alpha=float(rank))
    return LoraFile(path=None, sha256="", format="comfy", modules=modules, default_scale=None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan2.2-ti2v-5b")
    ap.add_argument("--size", default="640x352")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[args.dtype]
    width, height = (int(v) for v in args.size.lower().split("x"))

    from mlx.utils import tree_flatten

    from mlx_video.lora import fuse_loras

    spec, config, model = build(args.model, args.layers, dtype)
    t_lat, h_lat, w_lat = spec.latent_grid(width, height, args.frames)
    tokens = (t_lat // config.patch_size[0]) * (h_lat // config.patch_size[1]) * (w_lat // config.patch_size[2])
    key = mx.random.key(0)
    x = mx.random.normal((2, t_lat, h_lat, w_lat, config.in_channels), key=key).astype(dtype)
    t = mx.array([700.0, 700.0])
    context = (0.1 * mx.random.normal((2, 512, config.text_dim), key=mx.random.key(1))).astype(dtype)
    mx.eval(x, context)
    prepared = model.prepare_context(context)

    compiled_step = mx.compile(lambda xb, tb: model(xb, tb, prepared))

    def fused_model():
        from mlx_video.families.wan.transformer import WanTransformer

        twin = WanTransformer(config, dtype=dtype)
        twin.load_weights(list(tree_flatten(model.parameters())))
        fuse_loras(twin, [(random_lora(twin, args.lora_rank), 1.0)])
        return twin, twin.prepare_context(context)

    twin, twin_prepared = fused_model()
    variants = {
        "base (text + cross K/V every step)": lambda: model(x, t, context),
        "context prepared once": lambda: model(x, t, prepared),
        "prepared + mx.compile (whole step)": lambda: compiled_step(x, t),
        f"prepared + fused rank-{args.lora_rank} LoRA": lambda: twin(x, t, twin_prepared),
    }
    reference = None
    agreement = {}
    for name, fn in variants.items():  # warm-up (and compile), outputs compared with the base
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        if reference is None:
            reference = out
        agreement[name] = float(mx.abs(out - reference).max() / mx.abs(reference).max())
    times = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            mx.reset_peak_memory()
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
    base = statistics.median(times[next(iter(variants))])
    rows = []
    print(f"{args.model} width (dim {config.dim}, ffn {config.ffn_dim}, {config.num_heads} heads), {args.layers} block(s), "
          f"{args.size} x {args.frames} frames = {tokens} tokens, CFG batch 2, {args.dtype}, {args.repeats} repeats")
    print(f"{'variant':44s} {'median s':>9s} {'ratio':>6s} {'peak GiB':>9s} {'max |diff| / max |base|':>24s}")
    for name in variants:
        med = statistics.median(times[name])
        rows.append({"variant": name, "median_s": med, "ratio": med / base, "times": times[name],
                     "peak_bytes": peaks[name], "max_rel_diff": agreement[name]})
        print(f"{name:44s} {med:9.3f} {med / base:6.3f} {peaks[name] / 2**30:9.2f} {agreement[name]:24.1e}")
    if args.json:
        record = {"command": "python benchmarks/speed.py " + " ".join(argv or __import__("sys").argv[1:]),
                  "model": args.model, "tokens": tokens, "layers": args.layers, "dtype": args.dtype, "rows": rows,
                  "mlx": mx.__version__, "numpy": np.__version__, "python": platform.python_version(),
                  "machine": platform.machine(), "platform": platform.platform(),
                  "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
