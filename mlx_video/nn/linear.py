"""Linear layers as stored: dense, MLX affine-quantized (q8/q4) or fp8 codes, behind one interface.

Every linear a model builds is an `nn.Linear`; `ModelFolder.load_module` swaps in `nn.QuantizedLinear` or
`Fp8Linear` for the layers a conversion stored in low precision. Code that needs the weight itself (fusing
a LoRA, a benchmark) calls `dense_weight(layer)`, whatever the kind; `is_linear(layer)` says whether a module
is one of the three. The compute dtype of a model comes from its constructor, never from a layer's tensors
(a quantized weight is packed integers, and many layers have no bias).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


class Fp8Linear(nn.Module):
    """A linear layer that keeps its weight as float8 codes (uint8) and a float32 scale, one per tensor or
    one per output channel, and decodes them to the compute dtype each time it runs: memory holds one byte per
    weight. The arithmetic is that of `nn.Linear` on the decoded weight `(decode(codes) * scale).astype(dtype)`,
    which is exactly what a conversion without --quantize would have stored."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, fmt: str, scale_shape=(), dtype=mx.bfloat16):
        super().__init__()
        self.weight = mx.zeros((output_dims, input_dims), dtype=mx.uint8)
        self.weight_scale = mx.ones(tuple(scale_shape), dtype=mx.float32)
        if bias:
            self.bias = mx.zeros((output_dims,), dtype=dtype)
        self._fp8_format = fmt
        self._compute_dtype = dtype

    def decoded_weight(self) -> mx.array:
        from mlx_video.kernels import dequantize_fp8  # the fp8 kernel where a GPU path exists, else the portable decode

        return dequantize_fp8(self["weight"], self._fp8_format, self["weight_scale"], dtype=self._compute_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.decoded_weight()
        if "bias" in self:
            return mx.addmm(self["bias"], x, weight.T)
        return x @ weight.T


def is_linear(layer) -> bool:
    return isinstance(layer, LINEAR_TYPES + (Fp8Linear,))


def dense_weight(layer, dtype: mx.Dtype | None = None) -> mx.array:
    """The (out, in) weight of any linear kind, decoded; in `dtype` if given."""
    if isinstance(layer, Fp8Linear):
        w = layer.decoded_weight()
    elif isinstance(layer, nn.QuantizedLinear):
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size, bits=layer.bits,
                          mode=getattr(layer, "mode", "affine"))
        if "tensor_scale" in layer:  # comfy_quant nvfp4 kept natively: a per-tensor scale on top of the blocks
            w = w * layer["tensor_scale"]
    elif isinstance(layer, nn.Linear):
        w = layer.weight
    else:
        raise TypeError(f"{type(layer).__name__} is not a linear layer")
    return w if dtype is None else w.astype(dtype)
