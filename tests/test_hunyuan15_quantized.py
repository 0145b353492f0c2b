"""HunyuanVideo 1.5 converted with `--quantize q8 / q4 / fp8` (group size 32, so that the tiny blocks' widths of
96 and 384 quantize): every block weight the family's rule names is stored in the low-precision layer, each
decoded weight is within its format's rounding bound of the float32 one (the bounds of the formats themselves,
which a wrong scale, zero point or code order exceeds), and the transformer's output stays within a bound set
from measurement (q8 1.0e-2, q4 0.21, fp8 0.083 relative at this tiny random model; bounds 0.025, 0.5, 0.2;
a dropped scale or swapped nibbles move it by ~1)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from mlx_video.families.hunyuan15.planner import LOW_PRECISION_TRANSFORMER  # noqa: E402
from mlx_video.nn.linear import Fp8Linear, dense_weight  # noqa: E402
from mlx_video.pipelines.base import Pipeline  # noqa: E402
from support.hunyuan15 import GLYPH_DIM, TEXT_DIM, save_transformer_folder, tiny_transformer  # noqa: E402
from support.arrays import rel_err  # noqa: E402

OUTPUT_BOUND = {"q8": 0.025, "q4": 0.5, "fp8": 0.2}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{mode: the loaded transformer} for float32 and the three low-precision conversions of one tiny model (2 heads
    of 48, 2 blocks)."""
    root = tmp_path_factory.mktemp("hy15_quant")
    save_transformer_folder(root / "diffusers", tiny_transformer(2, 48, 2, seed=11, axes=(8, 20, 20)))
    models = {}
    for mode in ("fp32", "q8", "q4", "fp8"):
        extra = [] if mode == "fp32" else ["--quantize", mode, "--group-size", "32"]
        main(["convert", str(root / "diffusers"), str(root / mode), "--dtype", "fp32", *extra])
        models[mode] = Pipeline.from_pretrained(str(root / mode)).load_transformer()
    return models


def _within_format(mode: str, stored: np.ndarray, exact: np.ndarray, layer) -> bool:
    """The decoded weight against the format's own rounding bound. q8 / q4: one step of the group's grid, step =
    (max - min) / (2^bits - 1) per group of 32 inputs (MLX's affine grid is anchored exactly on the group's
    larger-magnitude end, so the far end may round by up to a step instead of half). fp8: half an e4m3 ulp of the
    per-tensor scaled value (1/16 of it, or half the subnormal step, 2^-10 x scale)."""
    err = np.abs(stored - exact)
    if mode == "fp8":
        scale = float(np.array(layer["weight_scale"]).reshape(-1)[0])
        bound = np.maximum(np.abs(exact) / 16, scale * 2.0 ** -10) * (1 + 1e-3)
        return bool(np.all(err <= bound))
    groups = exact.reshape(exact.shape[0], -1, 32)
    step = (groups.max(-1) - groups.min(-1)) / (2 ** layer.bits - 1)
    return bool(np.all(err.reshape(groups.shape) <= step[..., None] * (1 + 1e-3) + 1e-7))


@pytest.mark.parametrize("mode", ["q8", "q4", "fp8"])
def test_quantized_weights_and_output(converted, mode):
    model, exact = converted[mode], dict(converted["fp32"].named_modules())
    kind = Fp8Linear if mode == "fp8" else nn.QuantizedLinear
    low = {name: layer for name, layer in model.named_modules() if isinstance(layer, kind)}
    named = {name for name, layer in exact.items() if isinstance(layer, nn.Linear)
             and LOW_PRECISION_TRANSFORMER.fullmatch(f"{name}.weight")}
    assert set(low) == named and len(low) == 38  # 2 blocks x 2 streams x 7 + 2 refiner blocks x 5
    for name, layer in low.items():
        stored = np.array(dense_weight(layer, mx.float32))
        assert _within_format(mode, stored, np.array(exact[name].weight), layer), name

    g = torch.Generator().manual_seed(0)
    x, text, glyph = torch.randn(2, 2, 3, 5, 9, generator=g), torch.randn(2, 7, TEXT_DIM, generator=g), \
        torch.randn(2, 4, GLYPH_DIM, generator=g)
    text_mask = mx.array([[1] * 7, [1] * 4 + [0] * 3])
    glyph_mask = mx.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    inputs = (mx.array(x.numpy()), mx.array([873.0, 873.0]), mx.array(text.numpy()), text_mask,
              mx.array(glyph.numpy()) * glyph_mask[..., None], glyph_mask, None, None)
    want, got = (np.array(converted[m](*inputs)) for m in ("fp32", mode))
    err = rel_err(got, want)
    print(f"HunyuanVideo 1.5 --quantize {mode} (group size 32): transformer output rel {err:.2e} against float32")
    assert 0 < err < OUTPUT_BOUND[mode]
