"""Safetensors files in the tests: what a converted folder holds, tensors written as float32, and files that describe
full-size checkpoints (names, dtypes, shapes) without their weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_video.convert.formats import TensorFile


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


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # bytes per element of a safetensors dtype


def write_description(path: Path, tensors: dict[str, tuple[str, tuple, bytes | None]]) -> Path:
    """A safetensors file with these (dtype, shape, data) entries; `None` data is left as a sparse hole."""
    header, offset, blobs = {}, 0, []
    for name, (code, shape, data) in tensors.items():
        n = SIZES[code]
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        if data is not None:
            assert len(data) == n
            blobs.append((offset, data))
        offset += n
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for at, data in blobs:
            f.seek(8 + len(body) + at)
            f.write(data)
        f.truncate(8 + len(body) + offset)
    return path


def meta_state(cls, **config) -> dict:
    """The state dict of the torch module `cls(**config)` built on the meta device: names and shapes, no memory."""
    import torch

    with torch.device("meta"):
        return dict(cls(**config).state_dict())


class Shapes(TensorFile):
    """A checkpoint's names and shapes only (as bf16), for planning full-size conversions without any data: from
    {name: shape} or a (meta-device) torch state dict."""

    def __init__(self, shapes: dict):
        self._shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
        self._codes = {k: "BF16" for k in shapes}
        self.paths, self.metadata = [], {}
