"""Multi-head attention over (batch, tokens, heads, head_dim) tensors.

Where MLX has no fused attention kernel (its CPU back-end), `mx.fast.scaled_dot_product_attention` builds the
whole (B, heads, Lq, Lk) score matrix: an A14B 480p x 81 self-attention would need tens of GB for it. There
the queries are split into blocks whose score matrices stay under a budget (`MLXVID_ATTENTION_BUDGET_MB`,
default 1024). Each query row's softmax runs over all keys in every block, so the result is the same
computation, row for row; on a GPU (fused kernel, no score matrix) nothing is split. The blocks are evaluated
one by one (a host synchronisation), which is what bounds the memory.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import numpy as np

DEFAULT_BUDGET_MB = 1024


def score_budget_bytes() -> int | None:
    """The score-matrix budget that applies now; None where attention is fused (nothing to bound)."""
    value = os.environ.get("MLXVID_ATTENTION_BUDGET_MB")
    if value is None and mx.default_device().type == mx.DeviceType.gpu:
        return None
    return int(float(value if value is not None else DEFAULT_BUDGET_MB) * 1024**2)


def query_block(batch: int, heads: int, q_len: int, k_len: int, budget: int | None) -> int:
    """How many queries one block takes so that its float32 scores and softmax fit in `budget` bytes."""
    if budget is None:
        return q_len
    per_query = 2 * batch * heads * k_len * 4  # scores and their softmax, float32
    return max(1, min(q_len, budget // max(1, per_query)))


def blocked_score_bytes(batch: int, heads: int, q_len: int, k_len: int, budget: int | None = None, *, sparse=None,
                        head_dim: int = 0, itemsize: int = 4) -> int:
    """Bytes of the scores (and their softmax, float32) alive at once where attention is not fused: one query
    block's. `budget`: as `score_budget_bytes()`, or the default when that is None. For the cost models.

    `sparse`: the run's sparse attention at this site, as `attention` takes it (e.g. a
    `mlx_video.pipelines.attention_mode.RadialRun`), or None (dense). It answers with its own figure,
    `sparse.attention_bytes(batch, heads, q_len, k_len, head_dim, itemsize, budget)`, which also counts the keys
    and values it gathers (`head_dim` wide, `itemsize` bytes each)."""
    if budget is None:
        budget = score_budget_bytes() or DEFAULT_BUDGET_MB * 1024**2
    if sparse is not None:
        return int(sparse.attention_bytes(batch, heads, q_len, k_len, head_dim, itemsize, budget))
    return 2 * batch * heads * query_block(batch, heads, q_len, k_len, budget) * k_len * 4


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float | None = None,
    mask: mx.array | str | None = None,
    sparse=None,
) -> mx.array:
    """Scaled dot-product attention.

    q: (B, Lq, heads, D); k, v: (B, Lk, heads, D). `mask` is anything `mx.fast.scaled_dot_product_attention`
    accepts: an additive or boolean array broadcastable to (B, heads, Lq, Lk), or "causal".
    `sparse`: a callable `(q, k, v, scale, mask)` that returns the attention over a sparse mask, or None when
    this call is dense (e.g. `mlx_video.pipelines.attention_mode.RadialSite`); None attends densely.
    Returns (B, Lq, heads * D) in the dtype of q.
    """
    batch, q_len, heads, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if sparse is not None:
        out = sparse(q, k, v, scale, mask)
        if out is not None:
            return out
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    block = q_len if isinstance(mask, str) else query_block(batch, heads, q_len, k.shape[2], score_budget_bytes())
    if block >= q_len:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    else:
        parts = []
        for start in range(0, q_len, block):
            stop = min(q_len, start + block)
            part_mask = mask
            if isinstance(mask, mx.array) and mask.ndim >= 2 and mask.shape[-2] == q_len:
                part_mask = mask[..., start:stop, :]
            part = mx.fast.scaled_dot_product_attention(q[:, :, start:stop], k, v, scale=scale, mask=part_mask)
            # Evaluated block by block: left lazy, MLX may schedule every block's scores before any softmax and
            # the bound is lost. This only happens without a fused kernel (not inside a compiled GPU step).
            mx.eval(part)
            parts.append(part)
        out = mx.concatenate(parts, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * head_dim)


def fold_zero_padding(context: mx.array) -> tuple[mx.array, mx.array | None]:
    """Attention over zero-padded text with the padding folded into one key per sample.

    context: (B, L, C), each sample's rows followed by all-zero padding rows (a model that pads every prompt
    with zeros to a fixed length and attends to all of them). A row-wise map (the text embedding, then the key and value
    projections) turns the n padding rows of a sample into n identical keys and values, and softmax attention
    over n copies of a key equals attention over one copy whose score is raised by log(n). So only each
    sample's own rows and one padding row are kept: returns context[:, :K] (K = the longest sample's rows + 1)
    and the additive key bias (B, 1, 1, K), float32: 0 on a sample's rows, log(n) on its padding row, -inf on
    the rows past it (another sample's rows). Same result to float rounding, with the cross-attention's scores,
    keys and values shrunk from L to K. Returns (context, None) when no sample has two or more padding rows.
    """
    batch, length, _ = context.shape
    nonzero = np.array(mx.any(context != 0, axis=-1))  # (B, L), a host read, once per prompt
    rows = np.array([int(np.flatnonzero(r)[-1]) + 1 if r.any() else 0 for r in nonzero])
    padding = length - rows
    if padding.max() < 2:
        return context, None
    keys = int(min(length, (rows + (padding > 0)).max()))
    bias = np.full((batch, keys), -np.inf, dtype=np.float32)
    for b in range(batch):
        bias[b, : rows[b]] = 0.0
        if padding[b]:
            bias[b, rows[b]] = math.log(padding[b])
    return context[:, :keys], mx.array(bias.reshape(batch, 1, 1, keys))
