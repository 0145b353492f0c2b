"""Radial attention: the block mask against a transcription of the reference repository's mask functions, and
the portable block-sparse attention against dense attention under the same mask (float64)."""

import functools
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video.nn.radial import RadialPlan, radial_attention, radial_block_mask, radial_score_fraction, tile_sizes
from support.reference.radial_mask import gen_log_mask_shrinked


@functools.lru_cache(maxsize=None)
def reference_mask(frames, tokens_per_frame, block, decay, sequence, wan):
    """The reference's mask for `sequence` tokens (video followed by anything else), as numpy."""
    with torch.no_grad():
        mask = gen_log_mask_shrinked(sequence, frames * tokens_per_frame, frames, block_size=block,
                                     sparse_type="radial", decay_factor=decay,
                                     model_type="wan" if wan else "hunyuan")
    return mask.numpy()


# (latent frames, height tokens, width tokens, block, decay, text tokens, first-frame rule): the reference's
# Wan 2.2 (64-token tiles, sink frame), Wan 2.1 (128) and HunyuanVideo (128, text after the video) settings,
# grids whose video fills whole tiles or not (then text follows, which is where the reference builds a mask).
GRIDS = [
    (5, 8, 8, 64, 0.8, 0, True),  # 64 tokens per frame: the 128-token thinning drops even adjacent frames
    (13, 16, 16, 128, 0.2, 0, True),
    (6, 12, 12, 64, 1.0, 32, False),  # 864 video tokens: not whole tiles, text after
    (7, 20, 32, 128, 0.5, 128, False),
    (5, 45, 80, 64, 0.8, 48, True),  # Wan's 720p grid: 3600 tokens per frame, 48 text (or padding) tokens after
]


@pytest.mark.parametrize("frames,height,width,block,decay,text,wan", GRIDS)
def test_mask_equals_the_reference_where_it_is_defined(frames, height, width, block, decay, text, wan):
    per_frame = height * width
    sequence = frames * per_frame + text
    expected = reference_mask(frames, per_frame, block, decay, sequence, wan)
    ours = radial_block_mask(frames, per_frame, block=block, decay=decay, text_tokens=text, first_frame_dense=wan)
    n = expected.shape[0]  # the reference drops a last partial tile; ours keeps it (all text: kept)
    assert ours.shape == (math.ceil(sequence / block),) * 2
    np.testing.assert_array_equal(ours[:n, :n], expected)
    assert ours[n:].all() and ours[:, n:].all()
    assert 0 < ours.mean() < 1  # sparse, and not empty


def test_video_that_does_not_fill_whole_tiles_is_the_reference_padded_to_whole_tiles():
    """Our rule where the reference fails (Wan 720p: 45x80 = 3600 tokens per frame, 64-token tiles, no text):
    the reference's mask of the sequence padded to whole tiles (its pad_qkv), the padding kept like text."""
    with pytest.raises(RuntimeError):  # the reference itself cannot build such a mask (here 5 x 12x12 tokens)
        gen_log_mask_shrinked(720, 720, 5, block_size=64, sparse_type="radial", decay_factor=0.8, model_type="wan")
    frames, per_frame, block = 5, 45 * 80, 64
    padded = math.ceil(frames * per_frame / block) * block
    expected = reference_mask(frames, per_frame, block, 0.8, padded, True)
    ours = radial_block_mask(frames, per_frame, block=block, decay=0.8, first_frame_dense=True)
    np.testing.assert_array_equal(ours, expected)


def test_mask_shape_of_the_rules():
    # first-frame rule: every query tile attends to frame 0 (tiles 0..3 with 256 tokens per frame, 64-token tiles)
    wan = radial_block_mask(9, 256, block=64, decay=1.0, first_frame_dense=True)
    hunyuan = radial_block_mask(9, 256, block=64, decay=1.0, first_frame_dense=False)
    assert wan[:, :4].all() and not hunyuan[20:24, :4].any()  # distance 5: thinned out
    assert np.array_equal(wan[:, 4:], hunyuan[:, 4:])
    # neighbours within one frame of distance are whole; the band thins with distance
    assert hunyuan[:8, :8].all()
    assert 0 < hunyuan[32:36, :4].sum() < hunyuan[32:36, 28:32].sum() == 16  # distance 8 against distance 1
    # text rows and columns are kept whole
    text = radial_block_mask(9, 256, block=64, decay=1.0, text_tokens=100, first_frame_dense=False)
    assert text[36:].all() and text[:, 36:].all() and np.array_equal(text[:36, :36], hunyuan)


def test_score_fraction():
    mask = radial_block_mask(21, 30 * 52, block=64, decay=0.8)
    tokens = 21 * 30 * 52
    sizes = tile_sizes(tokens, 64)
    assert sizes.sum() == tokens and sizes[-1] == tokens % 64
    expected = sum(sizes[r] * sizes[c] for r, c in zip(*np.nonzero(mask))) / tokens**2
    assert radial_score_fraction(21, 30, 52, block=64, decay=0.8) == pytest.approx(expected, rel=1e-12)
    # whole tiles: the plain tile count
    whole = radial_block_mask(13, 256, block=128, decay=0.2)
    assert radial_score_fraction(13, 16, 16, block=128, decay=0.2) == pytest.approx(whole.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="decay"):
        radial_score_fraction(5, 8, 8, block=64, decay=0.0)
    with pytest.raises(ValueError, match="latent frames"):
        radial_score_fraction(0, 8, 8, block=64, decay=1.0)


def dense_masked_reference(q, k, v, token_mask, key_mask, scale):
    """float64 softmax attention with every score outside `token_mask` (and masked keys) removed."""
    q, k, v = (np.asarray(a, dtype=np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    allowed = token_mask[None, None, : q.shape[2]]
    if key_mask is not None:
        allowed = allowed & key_mask
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights @ v
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("frames,height,width,block,text,heads,head_dim,budget_mb,queries,padded", [
    (3, 4, 6, 16, 5, 3, 40, None, None, False),
    (4, 5, 5, 8, 0, 2, 24, 0.001, None, False),  # a tiny score budget: every call split
    (5, 3, 4, 16, 7, 2, 72, None, 60, True),  # queries = the video alone (a last block), padded text keys
])
def test_portable_radial_attention_matches_dense_float64(monkeypatch, frames, height, width, block, text, heads,
                                                         head_dim, budget_mb, queries, padded):
    if budget_mb is not None:
        monkeypatch.setenv("MLXVID_ATTENTION_BUDGET_MB", str(budget_mb))
    per_frame = height * width
    tokens = frames * per_frame + text
    mask = radial_block_mask(frames, per_frame, block=block, decay=1.0, text_tokens=text, first_frame_dense=False)
    assert not mask.all()
    plan = RadialPlan.of(mask, block, tokens)
    token_mask = np.repeat(np.repeat(mask, block, axis=0), block, axis=1)[:tokens, :tokens]
    rng = np.random.default_rng(frames * 100 + head_dim)
    batch, q_len = 2, tokens if queries is None else queries
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32) for _ in range(2))
    key_mask = None
    if padded:
        key_mask = np.ones((batch, 1, 1, tokens), dtype=bool)
        key_mask[1, ..., tokens - 3:] = False  # the second sample's last text tokens are padding
    scale = 0.7 / math.sqrt(head_dim)
    out = radial_attention(mx.array(q), mx.array(k), mx.array(v), plan, scale=scale,
                           mask=None if key_mask is None else mx.array(key_mask))
    expected = dense_masked_reference(q, k, v, token_mask, key_mask, scale)
    assert out.shape == (batch, q_len, heads * head_dim)
    err = np.abs(np.array(out, dtype=np.float64) - expected).max() / np.abs(expected).max()
    assert err < 1e-5, err
    # and it differs from dense attention (the mask matters at this size)
    dense = dense_masked_reference(q, k, v, np.ones_like(token_mask), key_mask, scale)
    assert np.abs(dense - expected).max() > 1e-3


def test_plan_groups_cover_every_kept_tile_once():
    mask = radial_block_mask(6, 40, block=16, decay=0.9, text_tokens=9, first_frame_dense=True)
    tokens = 6 * 40 + 9
    plan = RadialPlan.of(mask, 16, tokens)
    rebuilt = np.zeros((tokens, tokens), dtype=bool)
    for g in plan.groups:
        for a, b in g.key_ranges:
            rebuilt[g.q_start:g.q_stop, a:b] = True
    expected = np.repeat(np.repeat(mask, 16, axis=0), 16, axis=1)[:tokens, :tokens]
    np.testing.assert_array_equal(rebuilt, expected)
    assert plan.groups[0].q_start == 0 and plan.groups[-1].q_stop == tokens
    assert plan.score_fraction() == pytest.approx(expected.mean())
    with pytest.raises(ValueError, match="does not cover"):
        RadialPlan.of(mask, 16, tokens + 16)


@pytest.mark.parametrize("frames,per_frame,block,text,heads,head_dim,budget_mb", [
    (6, 20, 8, 5, 3, 24, None),  # every group's scores in one call
    (5, 24, 8, 0, 2, 40, 0.08),  # a tiny budget: calls split, the gathered keys counted in it
])
def test_radial_attention_bytes_is_what_its_largest_call_holds(monkeypatch, frames, per_frame, block, text, heads,
                                                               head_dim, budget_mb):
    """The memory preflight's figure for the portable path (`radial_attention_bytes`) against the calls the path
    makes, recorded: per call, the float32 scores and softmax of its queries over its keys, plus its keys and
    values where they are not one contiguous slice of the sequence's (a gathered copy)."""
    from mlx_video.nn.attention import DEFAULT_BUDGET_MB
    from mlx_video.nn.radial import radial_attention_bytes

    if budget_mb is not None:
        monkeypatch.setenv("MLXVID_ATTENTION_BUDGET_MB", str(budget_mb))
    budget = int((budget_mb or DEFAULT_BUDGET_MB) * 1024**2)
    tokens, batch = frames * per_frame + text, 2
    mask = radial_block_mask(frames, per_frame, block=block, decay=0.9, text_tokens=text, first_frame_dense=True)
    plan = RadialPlan.of(mask, block, tokens)
    rng = np.random.default_rng(tokens)
    q, k, v = (rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32) for _ in range(3))
    keys_by_row = {k[0, i, 0].tobytes(): i for i in range(tokens)}  # random keys: each row is unique
    calls, real = [], mx.fast.scaled_dot_product_attention

    def recording(qc, kc, vc, **kwargs):
        rows = [keys_by_row[r.tobytes()] for r in np.array(kc[0, 0])]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        copied = 0 if contiguous else 2 * batch * heads * len(rows) * head_dim * 4
        calls.append(2 * batch * heads * qc.shape[2] * kc.shape[2] * 4 + copied)
        return real(qc, kc, vc, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", recording)
    mx.eval(radial_attention(mx.array(q), mx.array(k), mx.array(v), plan))
    assert len(calls) >= len(plan.groups)
    assert radial_attention_bytes(plan, batch, heads, tokens, head_dim, 4, budget) == max(calls)
    if budget_mb is not None:
        assert len(calls) > len(plan.groups) and max(calls) <= budget  # split to stay under the budget
