"""What Wan2.2-S2V adds to a Wan 14B denoising step, side by side: the same video latents through the plain Wan
14B transformer and through the S2V transformer (reference and FramePack motion tokens, the audio encoder, the
audio injection), at the real width with `--layers` blocks and random weights.

    python benchmarks/s2v.py --size 512x320 --frames 16 --layers 2 --repeats 3

One step is one forward of batch 2 (the conditional and unconditional passes, as the pipeline batches them)
ending in mx.eval. Variants, timed in turn within each repeat (interleaved, so load on a shared machine hits them
alike): `wan` (the backbone alone), `s2v-no-audio-injection` (S2V with no injection layer: the extra tokens and the
audio encoder), `s2v` (S2V with an injection after every block). Per-block costs are solved from the three, and
the full-depth step is extrapolated with the release's 40 blocks and 12 injections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx


def build(kind: str, layers: int, dtype):
    from mlx_video.families.wan.config import WanTransformerConfig
    from mlx_video.families.wan.s2v_model import WAN_S2V_14B, WanS2VConfig, WanS2VTransformer
    from mlx_video.families.wan.transformer import WanTransformer

    if kind == "wan":  # the S2V release's backbone numbers, without the S2V parts
        config = WanTransformerConfig.from_dict({**WAN_S2V_14B.to_dict(), "num_layers": layers})
        model = WanTransformer(config, dtype=dtype)
    else:
        inject = tuple(range(layers)) if kind == "s2v" else ()
        config = WanS2VConfig.from_dict({**WAN_S2V_14B.to_dict(), "num_layers": layers, "audio_inject_layers": inject})
        model = WanS2VTransformer(config, dtype=dtype)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return config, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x320", help="video WxH (multiples of 64)")
    parser.add_argument("--frames", type=int, default=16, help="frames of the clip (a multiple of 4)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    dtype = {"fp32": mx.float32, "bf16": mx.bfloat16}[args.dtype]
    h, w, t = height // 8, width // 8, args.frames // 4
    mx.random.seed(0)

    variants = {}
    for kind in ("wan", "s2v-no-audio-injection", "s2v"):
        config, model = build(kind, args.layers, dtype)
        variants[kind] = (config, model)
    cfg = variants["s2v"][0]
    x = mx.random.normal((2, t, h, w, cfg.in_channels))
    step_t = mx.array([500.0, 500.0])
    text = mx.random.normal((2, cfg.text_len, cfg.text_dim)) * 0.1
    reference = mx.random.normal((2, 1, h, w, cfg.in_channels))
    motion = mx.random.normal((2, cfg.motion_latent_frames, h, w, cfg.in_channels))
    audio = mx.random.normal((2, args.frames, cfg.audio_layers, cfg.audio_dim)) * 0.1
    prepared = {k: m.prepare_context(text) for k, (_, m) in variants.items()}
    mx.eval(x, reference, motion, audio)

    def step(kind):
        model = variants[kind][1]
        if kind == "wan":
            return model(x.astype(dtype), step_t, prepared[kind])
        return model(x.astype(dtype), step_t, prepared[kind], ref_latents=reference, motion_latents=motion,
                     audio=audio)

    times = {k: [] for k in variants}
    peaks = {}
    for kind in variants:  # warm-up, and each variant's activation peak (above the weights of all three)
        mx.clear_cache()
        mx.reset_peak_memory()
        resident = mx.get_active_memory()
        mx.eval(step(kind))
        peaks[kind] = mx.get_peak_memory() - resident
    for _ in range(args.repeats):
        for kind in variants:
            start = time.perf_counter()
            mx.eval(step(kind))
            times[kind].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    video_tokens = t * (h // 2) * (w // 2)
    extra_tokens = (h // 2) * (w // 2) * 2 + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    # the injection's cost is the difference of the two S2V variants; the extrapolation counts every second of a
    # variant as block time, so S2V's once-per-step work (the audio encoder, the motion projections) is counted
    # 20 times over: an upper bound on the overhead
    injection = (med["s2v"] - med["s2v-no-audio-injection"]) / args.layers
    full_wan = med["wan"] * 40 / args.layers
    full_s2v = med["s2v-no-audio-injection"] * 40 / args.layers + 12 * injection
    print(f"{args.size}, {args.frames} frames ({video_tokens} video tokens + {extra_tokens} reference/motion "
          f"tokens a sample), batch 2, {args.layers} blocks at width {cfg.dim}, {args.dtype}")
    for kind in variants:
        print(f"  {kind:24s} median {med[kind]:.2f} s (runs {', '.join(f'{v:.2f}' for v in times[kind])}), "
              f"activation peak {peaks[kind] / 2**30:.2f} GiB, {med[kind] / med['wan']:.2f}x wan")
    print(f"  one audio injection: {injection:.3f} s; extrapolated to 40 blocks and 12 injections: S2V at most "
          f"{full_s2v / full_wan:.2f}x the Wan step on the same video")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "times": times, "peaks": peaks, "video_tokens": video_tokens,
                       "extra_tokens": extra_tokens, "injection_s": injection,
                       "full_depth_ratio": full_s2v / full_wan}, f, indent=2)


if __name__ == "__main__":
    main()
