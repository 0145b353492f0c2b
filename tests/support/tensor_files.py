"""Safetensors files in the tests: what a converted folder holds, and tensors written as float32."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np


def converted_weights(folder: Path, component: str) -> dict[str, np.ndarray]:
    """A converted folder's component: every tensor of its safetensors files, as numpy arrays."""
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out


def save_f32(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """`tensors` written as contiguous float32 safetensors (with `metadata` in the header); returns `path`."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_torch(path: Path, sd: dict) -> Path:
    """A torch state dict written as safetensors as it is (contiguous); returns `path`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
