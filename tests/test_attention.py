"""Bounded attention: query blocks give the unblocked result, against a float64 reference, and bound the peak."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_video.nn.attention import attention, fold_zero_padding, query_block


def reference(q, k, v, mask=None):
    q, k, v = (np.asarray(a, dtype=np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    out = (s / s.sum(-1, keepdims=True)) @ v
    b, h, lq, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, lq, h * d)


@pytest.mark.parametrize("budget_mb", [None, 0.01, 0.002])
def test_blocks_match_float64(monkeypatch, budget_mb):
    if budget_mb is not None:
        monkeypatch.setenv("MLXVID_ATTENTION_BUDGET_MB", str(budget_mb))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 20)).astype(np.float32) for n in (77, 45, 45))
    mask = rng.uniform(size=(2, 1, 77, 45)) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        got = np.array(attention(*(mx.array(a) for a in (q, k, v)), mask=None if m is None else mx.array(m)))
        want = reference(q, k, v, m)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def test_block_size_follows_the_budget():
    assert query_block(2, 40, 7800, 7800, None) == 7800  # fused: nothing to bound
    block = query_block(2, 40, 7800, 7800, 1024**3)
    assert 2 * 2 * 40 * block * 7800 * 4 <= 1024**3 and block >= 200


def test_blocking_bounds_the_peak(monkeypatch):
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 2048, 4, 16)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)

    def peak(budget_mb):
        monkeypatch.setenv("MLXVID_ATTENTION_BUDGET_MB", str(budget_mb))
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(attention(q, k, v))
        return mx.get_peak_memory()

    whole, blocked = peak(1024), peak(4)
    # the whole score matrix is 4 x 2048 x 2048 x 4 bytes = 64 MiB; blocked, a few MiB
    assert blocked < whole / 4, (blocked, whole)


def test_fold_zero_padding_keeps_one_padding_row_per_sample():
    context = np.ones((3, 12, 5), dtype=np.float32)
    context[0, 3:] = 0  # 3 rows, 9 padding
    context[1, 7:] = 0  # 7 rows, 5 padding
    context[2, 1] = 0  # a zero row inside a sample's rows is one of its rows: 8 rows, 4 padding
    context[2, 8:] = 0
    folded, bias = fold_zero_padding(mx.array(context))
    assert folded.shape == (3, 9, 5) and bias.shape == (3, 1, 1, 9) and bias.dtype == mx.float32
    np.testing.assert_array_equal(np.array(folded), context[:, :9])
    bias = np.array(bias)[:, 0, 0]
    np.testing.assert_allclose(bias[0], [0, 0, 0, math.log(9)] + [-np.inf] * 5)
    np.testing.assert_allclose(bias[1], [0] * 7 + [math.log(5), -np.inf])
    np.testing.assert_allclose(bias[2], [0] * 8 + [math.log(4)])
    # nothing to gain: no sample has two padding rows
    unpadded = np.ones((2, 6, 4), dtype=np.float32)
    unpadded[1, 5:] = 0
    same, none = fold_zero_padding(mx.array(unpadded))
    assert none is None and same.shape == (2, 6, 4)


def test_folded_keys_attend_like_the_padded_ones():
    """Attention over [rows | n identical padding keys] equals attention over [rows | one key + log n]."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 9, 3, 8)).astype(np.float32)
    rows, pad = 4, 21
    k = rng.standard_normal((2, rows + 1, 3, 8)).astype(np.float32)
    v = rng.standard_normal((2, rows + 1, 3, 8)).astype(np.float32)
    k_full = np.concatenate([k[:, :rows], np.repeat(k[:, rows:], pad, axis=1)], axis=1)
    v_full = np.concatenate([v[:, :rows], np.repeat(v[:, rows:], pad, axis=1)], axis=1)
    bias = np.zeros((2, 1, 1, rows + 1), np.float32)
    bias[..., rows] = math.log(pad)
    got = np.array(attention(*(mx.array(a) for a in (q, k, v)), mask=mx.array(bias)))
    want = reference(q, k_full, v_full)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
