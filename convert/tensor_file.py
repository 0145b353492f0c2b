"""The base of every checkpoint container the converter reads (safetensors, torch archives, GGUF): one
container's tensors with a uniform dtype code (safetensors' spelling) and reads of a range of rows. A module of
its own so that each container's module builds on it without importing the others (formats.py opens GGUF
files through gguf.py, which builds on this base)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np


def raw_to_mx(host: np.ndarray, code: str) -> mx.array:
    """Raw elements (as read from disk) -> an MLX array: bf16 viewed, fp64 narrowed, fp8 left as uint8 codes."""
    if code == "F64":
        host = host.astype(np.float32)
    arr = mx.array(host)
    return arr.view(mx.bfloat16) if code == "BF16" else arr


class TensorFile:
    """The tensors of one checkpoint container. Subclasses fill `_shapes`, `_codes`, `paths`."""

    paths: list[Path]
    metadata: dict

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def code(self, key: str) -> str:
        return self._codes[key]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> mx.array:
        """Rows [start, stop) along the first axis (all of it by default), raw (see `raw_to_mx`)."""
        raise NotImplementedError

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths[:3]) + (f" and {len(self.paths) - 3} more" if len(self.paths) > 3 else "")
