"""Rotary position embedding over a (t, h, w) token grid, in real arithmetic.

Each axis owns a contiguous slice of the head dimension; within it, consecutive channel pairs
(x[2i], x[2i+1]) are rotated by position * 1/theta^(2i/d_axis). The angle tables are built once per grid
on the host in float64 and handed to MLX as float32 cos/sin, so no complex dtype is involved.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np


def default_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """The default split of the head dimension into (t, h, w) channels (Wan's): 44/42/42 for 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables_3d(
    grid: Sequence[int],
    head_dim: int,
    theta: float = 10000.0,
    axis_dims: Sequence[int] | None = None,
) -> tuple[mx.array, mx.array]:
    """cos and sin tables, each (T*H*W, head_dim // 2) float32, tokens in (t, h, w) order.

    `axis_dims` gives the real channels per axis (each even, summing to head_dim); by default Wan's split.
    Positions are the integer grid indices 0..n-1 of each axis.
    """
    if axis_dims is None:
        axis_dims = default_axis_dims(head_dim)
    if len(axis_dims) != len(grid):
        raise ValueError(f"{len(grid)} grid axes but {len(axis_dims)} axis dims")
    if sum(axis_dims) != head_dim or any(d % 2 for d in axis_dims):
        raise ValueError(f"axis dims {tuple(axis_dims)} must be even and sum to head_dim {head_dim}")

    per_axis = []
    for axis, (size, dims) in enumerate(zip(grid, axis_dims)):
        inv_freq = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        angles = np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]
        view = [1] * len(grid) + [dims // 2]
        view[axis] = size
        per_axis.append(np.broadcast_to(angles.reshape(view), (*grid, dims // 2)))
    angles = np.concatenate(per_axis, axis=-1).reshape(-1, head_dim // 2)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def apply_rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved channel pairs of x (B, L, heads, D) by tables cos/sin (..., L, D // 2).

    Computed in float32; the result has x's dtype.
    """
    cos = cos[..., None, :]  # broadcast over heads
    sin = sin[..., None, :]
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
