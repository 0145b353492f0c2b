"""Peak resident memory of `mlxvid convert` on a synthetic checkpoint of several GB.

Writes a diffusers-layout Wan checkpoint (A14B-wide transformer blocks, few of them; a small UMT5 encoder; a
SentencePiece tokenizer) of about --size-gb on disk, tensor by tensor, without ever holding it in memory;
then converts it in a child process once per precision and reports the child's peak RSS (getrusage
/proc/self/status VmHWM, and getrusage ru_maxrss, which on Linux also carries the parent's
high-water mark from before the fork, so it is reported but not used) against the largest tensor of the checkpoint and against the RSS of the
child after its imports (the interpreter, MLX and numpy: the "small constant").

    python benchmarks/convert_memory.py [--size-gb 3.5] [--modes bf16,q8,fp8] [--workdir /tmp] [--keep]

The claim checked: peak RSS (VmHWM) < largest tensor + the post-import RSS + 256 MiB, for every mode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM, FFN, HEADS, FREQ, TEXT_DIM, CHANNELS = 5120, 13824, 40, 256, 512, 16
BLOCK_PARAMS = 4 * DIM * DIM * 2 + FFN * DIM * 2 + 8 * DIM + FFN + 2 * DIM * 2 + 6 * DIM + 4 * DIM  # about 351M

_RANDOM = None


def _random_bf16(n: int, seed: int) -> np.ndarray:
    """bf16 bit patterns of N(0, 0.02) values: a 4M-element random block, rotated per tensor."""
    global _RANDOM
    if _RANDOM is None:
        values = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32) * 0.02
        _RANDOM = (values.view(np.uint32) >> 16).astype(np.uint16)
    shift = (seed * 7919) % _RANDOM.size
    reps = -(-n // _RANDOM.size) + 1
    return np.roll(_RANDOM, shift)[: min(n, _RANDOM.size)] if n <= _RANDOM.size else np.tile(np.roll(_RANDOM, shift), reps)[:n]


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """A BF16 safetensors file, header first, then each tensor's bytes in 64 MiB pieces."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for i, (name, shape) in enumerate(shapes.items()):
            left = int(np.prod(shape))
            piece = 32 * 1024 * 1024
            while left:
                n = min(piece, left)
                f.write(_random_bf16(n, seed + i + left).tobytes())
                left -= n


def transformer_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s = {
        "patch_embedding.weight": (DIM, CHANNELS, 1, 2, 2),
        "patch_embedding.bias": (DIM,),
        "condition_embedder.text_embedder.linear_1.weight": (DIM, TEXT_DIM),
        "condition_embedder.text_embedder.linear_1.bias": (DIM,),
        "condition_embedder.text_embedder.linear_2.weight": (DIM, DIM),
        "condition_embedder.text_embedder.linear_2.bias": (DIM,),
        "condition_embedder.time_embedder.linear_1.weight": (DIM, FREQ),
        "condition_embedder.time_embedder.linear_1.bias": (DIM,),
        "condition_embedder.time_embedder.linear_2.weight": (DIM, DIM),
        "condition_embedder.time_embedder.linear_2.bias": (DIM,),
        "condition_embedder.time_proj.weight": (6 * DIM, DIM),
        "condition_embedder.time_proj.bias": (6 * DIM,),
        "proj_out.weight": (4 * CHANNELS, DIM),
        "proj_out.bias": (4 * CHANNELS,),
        "scale_shift_table": (1, 2, DIM),
    }
    for n in range(layers):
        b = f"blocks.{n}"
        for attn in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{b}.{attn}.{p}.weight"] = (DIM, DIM)
                s[f"{b}.{attn}.{p}.bias"] = (DIM,)
            s[f"{b}.{attn}.norm_q.weight"] = (DIM,)
            s[f"{b}.{attn}.norm_k.weight"] = (DIM,)
        s[f"{b}.norm2.weight"] = (DIM,)
        s[f"{b}.norm2.bias"] = (DIM,)
        s[f"{b}.ffn.net.0.proj.weight"] = (FFN, DIM)
        s[f"{b}.ffn.net.0.proj.bias"] = (FFN,)
        s[f"{b}.ffn.net.2.weight"] = (DIM, FFN)
        s[f"{b}.ffn.net.2.bias"] = (DIM,)
        s[f"{b}.scale_shift_table"] = (1, 6, DIM)
    return s


def umt5_shapes() -> dict[str, tuple[int, ...]]:
    s = {"shared.weight": (256, TEXT_DIM), "encoder.final_layer_norm.weight": (TEXT_DIM,)}
    p = "encoder.block.0.layer"
    for w in "qkvo":
        s[f"{p}.0.SelfAttention.{w}.weight"] = (TEXT_DIM, TEXT_DIM)
    s[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (32, 8)
    s[f"{p}.0.layer_norm.weight"] = (TEXT_DIM,)
    s[f"{p}.1.DenseReluDense.wi_0.weight"] = (1024, TEXT_DIM)
    s[f"{p}.1.DenseReluDense.wi_1.weight"] = (1024, TEXT_DIM)
    s[f"{p}.1.DenseReluDense.wo.weight"] = (TEXT_DIM, 1024)
    s[f"{p}.1.layer_norm.weight"] = (TEXT_DIM,)
    return s


def build_checkpoint(root: Path, size_gb: float) -> dict:
    layers = max(1, round(size_gb * 1e9 / (BLOCK_PARAMS * 2)))
    shapes = transformer_shapes(layers)
    (root / "transformer").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "tokenizer").mkdir()
    # one shard per block, plus one for the embeddings and head, with an index
    groups: dict[str, dict] = {}
    for k, v in shapes.items():
        g = k.split(".")[1] if k.startswith("blocks.") else "rest"
        groups.setdefault(g, {})[k] = v
    weight_map = {}
    for i, (g, part) in enumerate(groups.items()):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(root / "transformer" / name, part, seed=i * 1000)
        weight_map.update({k: name for k in part})
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": HEADS,
        "attention_head_dim": DIM // HEADS, "in_channels": CHANNELS, "out_channels": CHANNELS, "text_dim": TEXT_DIM,
        "freq_dim": FREQ, "ffn_dim": FFN, "num_layers": layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6, "rope_max_seq_len": 1024,
    }))  # fmt: skip
    write_safetensors(root / "text_encoder" / "model.safetensors", umt5_shapes(), seed=99)
    (root / "text_encoder" / "config.json").write_text(json.dumps({
        "vocab_size": 256, "d_model": TEXT_DIM, "d_kv": 64, "d_ff": 1024, "num_layers": 1, "num_heads": 8,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    }))  # fmt: skip
    import sentencepiece as spm

    buf = io.BytesIO()
    text = ["a synthetic checkpoint for a memory benchmark", "video of a cat on grass", "slow pan over mountains"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=40, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (root / "tokenizer" / "spiece.model").write_bytes(buf.getvalue())
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "expand_timesteps": True,
    }))  # fmt: skip
    largest = max(shapes.items(), key=lambda kv: int(np.prod(kv[1])))
    return {"layers": layers, "largest_tensor": largest[0], "largest_tensor_bytes": int(np.prod(largest[1])) * 2,
            "bytes_on_disk": sum(p.stat().st_size for p in root.rglob("*") if p.is_file())}


CHILD = r"""
import json, resource, sys, time
import mlx.core as mx, numpy as np
from mlx_video.convert.convert import convert_model
def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
after_imports = vmhwm()
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
convert_model(src, dst, dtype="bf16", quantize=None if mode == "bf16" else mode)
print(json.dumps({"seconds": time.perf_counter() - start, "after_imports": after_imports,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vmhwm": vmhwm()}))
"""


def machine() -> str:
    mem = next((int(row.split()[1]) for row in open("/proc/meminfo") if row.startswith("MemTotal")), 0)
    import mlx.core as mx

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {mem / 2**20:.0f} GiB RAM, "
            f"Python {platform.python_version()}, MLX {mx.__version__} ({mx.default_device()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=3.5)
    ap.add_argument("--modes", default="bf16,q8,fp8")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = args.workdir / "mlxvid_convert_memory"
    if root.exists():
        shutil.rmtree(root)
    src = root / "synthetic-diffusers"
    t0 = time.perf_counter()
    info = build_checkpoint(src, args.size_gb)
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(info))
    results = []
    ok = True
    try:
        for mode in args.modes.split(","):
            dst = root / f"converted-{mode}"
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), mode], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                raise SystemExit(f"conversion {mode} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["mode"] = mode
            r["output_bytes"] = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
            bound = info["largest_tensor_bytes"] + r["after_imports"] + 256 * 2**20
            r["bound"] = bound
            r["within_bound"] = r["vmhwm"] < bound
            ok &= r["within_bound"]
            results.append(r)
            print(json.dumps(r))
            shutil.rmtree(dst)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print(f"\nmachine: {machine()}")
    print(f"checkpoint: {info['bytes_on_disk'] / 1e9:.2f} GB on disk, {info['layers']} blocks of dim {DIM}; largest tensor "
          f"{info['largest_tensor']} {mib(info['largest_tensor_bytes'])}")
    print("| mode | peak RSS (VmHWM) | after imports | peak - imports | largest tensor | output | time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        peak = r["vmhwm"]
        print(f"| {r['mode']} | {mib(peak)} | {mib(r['after_imports'])} | {mib(peak - r['after_imports'])} | "
              f"{mib(info['largest_tensor_bytes'])} | {r['output_bytes'] / 1e9:.2f} GB | {r['seconds']:.0f} s |")
    if not ok:
        raise SystemExit("peak RSS above largest tensor + post-import RSS + 256 MiB")


if __name__ == "__main__":
    main()
