"""fp8 decoding/encoding checked bit for bit against PyTorch's float8 dtypes."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video.convert.fp8 import decode_fp8, dequantize_fp8, encode_e4m3fn, fp8_table
from mlx_video.errors import MlxVideoError

TORCH_TYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def torch_decode_all(fmt):
    return torch.arange(256, dtype=torch.uint8).view(TORCH_TYPES[fmt]).float().numpy()


def torch_encode(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def assert_same_bits(got: np.ndarray, want: np.ndarray):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # compare bit patterns so that -0.0 and +0.0 are told apart
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_all_codes_decode_like_torch(fmt):
    codes = mx.arange(256).astype(mx.uint8)
    got = decode_fp8(codes, fmt)
    assert got.dtype == mx.float32
    assert_same_bits(np.array(got), torch_decode_all(fmt))
    assert_same_bits(fp8_table(fmt), torch_decode_all(fmt))


def test_format_special_values():
    e4 = fp8_table("e4m3fn")
    assert np.flatnonzero(np.isnan(e4)).tolist() == [0x7F, 0xFF]
    assert not np.isinf(e4).any()
    assert np.nanmax(e4) == 448.0 and e4[1] == 2.0**-9 and e4[0x80] == 0 and math.copysign(1, e4[0x80]) < 0
    e5 = fp8_table("e5m2")
    assert e5[0x7C] == np.inf and e5[0xFC] == -np.inf
    assert np.isnan(e5[[0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]]).all()
    assert e5[0x7B] == 57344.0 and e5[1] == 2.0**-16


def test_decode_keeps_shape_and_accepts_int8():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert_same_bits(np.array(decode_fp8(mx.array(codes), "e4m3fn")), ref)
    assert_same_bits(np.array(decode_fp8(mx.array(codes.view(np.int8)), "e4m3fn")), ref)
    with pytest.raises(MlxVideoError):
        decode_fp8(mx.array(codes).astype(mx.float32), "e4m3fn")
    with pytest.raises(MlxVideoError, match="unknown fp8 format"):
        decode_fp8(mx.array(codes), "e4m3fnuz")


def test_encode_e4m3fn_matches_torch():
    rng = np.random.default_rng(1)
    finite = fp8_table("e4m3fn")[:0x7F].astype(np.float64)  # the 127 non-negative finite values
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties: must round to the even code
    parts = [
        rng.standard_normal(1000) * 1e-3,  # mostly subnormal / tiny normal range
        rng.uniform(-2.0**-6, 2.0**-6, 1000),  # the subnormal range itself
        rng.standard_normal(1000),
        rng.standard_normal(1000) * 200,  # up to and beyond the largest finite value
        rng.uniform(-1e4, 1e4, 500),  # saturation
        finite,
        mids,
        np.nextafter(mids.astype(np.float32), np.float32(np.inf)),  # just above / below each tie
        np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
        [448, 449, 463.9, 464, 464.1, 479, 480, 481, 1e30, np.inf, 2.0**-10, 2.0**-10 * 1.0001, 1e-30, 0.0],
    ]
    x = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]).astype(np.float32)
    x = np.concatenate([x, -x, np.array([np.nan, -np.nan, -0.0], np.float32)])
    got = encode_e4m3fn(x)
    assert got.dtype == np.uint8 and got.shape == x.shape
    np.testing.assert_array_equal(got, torch_encode(x))
    # and decoding what was encoded gives torch's round trip
    assert_same_bits(np.array(decode_fp8(mx.array(got), "e4m3fn")), torch.from_numpy(x).to(torch.float8_e4m3fn).float().numpy())


def test_encode_saturates_to_448():
    got = encode_e4m3fn(np.array([500.0, -1e6, np.inf, -np.inf], np.float32))
    assert got.tolist() == [0x7E, 0xFE, 0x7E, 0xFE]


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_dequantize_matches_torch(fmt):
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32)).to(TORCH_TYPES[fmt])
    codes = mx.array(w.view(torch.uint8).numpy())

    scale = 0.0123
    ref = w.float() * torch.tensor(scale, dtype=torch.float32)
    for s in (scale, np.float32(scale), mx.array(scale), mx.array([scale]), np.array(scale, np.float32)):
        assert_same_bits(np.array(dequantize_fp8(codes, fmt, s, dtype=mx.float32)), ref.numpy())
    got_bf16 = dequantize_fp8(codes, fmt, mx.array(scale))
    assert got_bf16.dtype == mx.bfloat16
    assert_same_bits(np.array(got_bf16.astype(mx.float32)), ref.to(torch.bfloat16).float().numpy())

    per_channel = rng.uniform(0.001, 0.1, 6).astype(np.float32)
    ref = w.float() * torch.from_numpy(per_channel)[:, None]
    for s in (mx.array(per_channel), per_channel[:, None], mx.array(per_channel[:, None])):
        assert_same_bits(np.array(dequantize_fp8(codes, fmt, s, dtype=mx.float32)), ref.numpy())
    got16 = dequantize_fp8(codes, fmt, per_channel, dtype=mx.float16)
    assert_same_bits(np.array(got16.astype(mx.float32)), ref.half().float().numpy())


def test_dequantize_per_channel_conv_weight_and_bad_scale():
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal((4, 3, 2, 2)).astype(np.float32)).to(torch.float8_e4m3fn)
    s = rng.uniform(0.5, 2, 4).astype(np.float32)
    got = dequantize_fp8(mx.array(w.view(torch.uint8).numpy()), "e4m3fn", s, dtype=mx.float32)
    assert_same_bits(np.array(got), (w.float() * torch.from_numpy(s)[:, None, None, None]).numpy())
    with pytest.raises(MlxVideoError, match="does not fit"):
        dequantize_fp8(mx.array(w.view(torch.uint8).numpy()), "e4m3fn", np.ones(3, np.float32))
