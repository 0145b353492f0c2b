"""Normalisation helpers that compute in float32 whatever the activation and parameter dtypes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def layer_norm_fp32(
    x: mx.array,
    weight: mx.array | None = None,
    bias: mx.array | None = None,
    eps: float = 1e-6,
) -> mx.array:
    """LayerNorm over the last axis, computed and returned in float32."""
    if weight is not None:
        weight = weight.astype(mx.float32)
    if bias is not None:
        bias = bias.astype(mx.float32)
    return mx.fast.layer_norm(x.astype(mx.float32), weight, bias, eps)


class FP32LayerNorm(nn.Module):
    """LayerNorm (optionally affine) whose output is always float32, for use on a float32 residual stream."""

    def __init__(self, dims: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = mx.ones((dims,))
            self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm_fp32(x, self.get("weight"), self.get("bias"), self.eps)
