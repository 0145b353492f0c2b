"""Writing a safetensors shard piece by piece.

The layout of a shard is fixed before any tensor is computed: the header (8-byte little-endian length, then
JSON naming each tensor's dtype, shape and byte span, padded with spaces to a multiple of 8) is written
first, and each tensor's bytes go to their planned place as they are produced, possibly in several slices.
Memory therefore holds one slice at a time, never the shard. The shard is written under a temporary name and
renamed once every byte is in place and synced, so a file with the final name is always complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .quantize import OutTensor


def shard_header(tensors: list[OutTensor], metadata: dict | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) and each tensor's absolute (start, end) in the file."""
    header: dict = {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise ValueError(f"tensor {t.name} planned twice in one shard")
        header[t.name] = {"dtype": t.code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        spans[t.name] = (offset, offset + t.nbytes)
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, {k: (start + a, start + b) for k, (a, b) in spans.items()}


class ShardWriter:
    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tensors = {t.name: t for t in tensors}
        header, self.spans = shard_header(tensors, metadata)
        self.size = max((end for _, end in self.spans.values()), default=len(header))
        self.written = {name: 0 for name in self.tensors}
        self._f = open(self.tmp, "wb")
        self._f.write(header)
        self._f.truncate(self.size)

    def write(self, name: str, offset: int, data: np.ndarray) -> None:
        start, end = self.spans[name]
        data = np.ascontiguousarray(data)
        if offset < 0 or start + offset + data.nbytes > end:
            raise AssertionError(f"{name}: {data.nbytes} bytes at offset {offset} overflow its {end - start}-byte span")
        self._f.seek(start + offset)
        self._f.write(memoryview(data).cast("B"))
        self.written[name] += data.nbytes

    def commit(self) -> None:
        short = [n for n, t in self.tensors.items() if self.written[n] != t.nbytes]
        if short:
            self.abort()
            raise AssertionError(f"tensors not completely written: {short[:3]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def shard_is_complete(path: Path, tensors: list[OutTensor]) -> bool:
    """A shard from an earlier run is kept when its header is exactly the planned one and the file is whole."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                return False
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, RecursionError):
        return False
    if not isinstance(header, dict):
        return False
    header.pop("__metadata__", None)
    try:
        have = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}
    except (KeyError, TypeError, AttributeError):
        return False
    want_spans = {}
    offset = 0
    for t in tensors:
        want_spans[t.name] = (t.code, tuple(t.shape), (offset, offset + t.nbytes))
        offset += t.nbytes
    return have == want_spans and path.stat().st_size == 8 + n + offset
