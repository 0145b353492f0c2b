"""Radial attention: a static block-sparse mask for video self-attention, and attention under it.

Radial Attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video
Generation", NeurIPS 2025; code: github.com/mit-han-lab/radial-attention, commit 72788d4,
`radial_attn/attn_mask.py`) lets a token attend to nearby frames through a wide band of tokens and to distant
frames through a band that halves each time the temporal distance doubles. The mask is built here from the
token layout alone, the same way that file builds it:

* Tokens: `frames` latent frames of `tokens_per_frame` tokens each (frame-major), then `text_tokens` other
  tokens (text, or any tokens a model appends after the video). Attention is cut into tiles of `block` x
  `block` tokens; the mask is one boolean per (query block, key block).
* For each pair of frames (i, j) at distance d = |i - j|, a token-level mask over the two frames' tokens
  (indexed within each frame, n = tokens_per_frame):
  - first-frame rule (`first_frame_dense`, a per-model setting of the reference): every token attends to all of
    frame 0 (j == 0), with no thinning;
  - band: d <= 1 gives the whole frame; else tokens whose in-frame indices differ by at most
    max(block, 2**bitlen(n) / 2**bitlen(d) * decay);
  - thinning: with L = 2**bitlen(n) / 2**bitlen(d), a pair with L < 128 is kept only when d is a multiple of
    128 / L (the reference hard-codes 128 whatever the block size, so with fewer than 128 tokens per frame
    even adjacent frames drop out).
* Reduction to tiles, per frame pair: the pair's token mask is placed at its offset inside the tiles its
  first tokens fall in (the reference keeps ceil(n / block) tiles per frame, starting at the tile of the
  frame's first token, so the tail of a frame that straddles one more tile is left out of that pair); a tile
  is kept when more than 60% of its non-empty key columns are more than 1/3 filled. A tile is kept when any
  frame pair keeps it.
* Text: every tile row and column from the tile that holds the first text token on is kept (text queries see
  everything, every query sees the text).

Where the reference is undefined, our rule: when the video does not fill whole tiles (e.g. 30x52 or 45x80
tokens per frame in 64-token tiles, where the reference's code fails), the sequence is seen as padded to whole
tiles with the padding treated like text: the video's partial last tile is kept whole (row and column), and the
pair contributions past the last tile are dropped. This is exactly the reference's mask of the sequence zero-padded to whole tiles (its
`pad_qkv` helper), and wherever the reference builds a mask (whole tiles, or text after the video) ours equals
it tile for tile (tests/test_radial.py checks both against a transcription of that file).

`radial_attention` computes softmax attention over only the kept tiles. On a GPU it runs the block-sparse
kernel of `mlx_video.kernels` (an online softmax over the kept key tiles of each query tile; the path below is
its oracle). Elsewhere (the portable path), for each run of query tiles with the
same kept key tiles it slices the contiguous key ranges, concatenates them and calls MLX's attention on them,
so no score outside a kept tile is ever computed and no key is gathered one by one. Where MLX has no fused
attention (the CPU back-end) each call's scores, with the keys and values it gathered, stay under the budget of
`mlx_video.nn.attention` and are evaluated one call at a time, as the dense attention there does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..kernels import block_sparse_attention, tile_lists
from .attention import query_block, score_budget_bytes

# The reference's thinning threshold, hard-coded there to 128 tokens whatever the block size
# (radial_attn/attn_mask.py, get_diagonal_split_mask).
THINNING_TOKENS = 128


@dataclass(frozen=True)
class RadialDefaults:
    """A family's radial-attention parameters: tile size, band decay, and how many denoising steps (counted over
    the whole run) and blocks (counted within each expert) stay dense by default."""

    block: int
    decay: float
    dense_steps: int
    dense_blocks: int
    first_frame_dense: bool  # every token attends to all of latent frame 0 (the reference's attention sink)
    source: str  # where the numbers come from


def _pair_kept(distance: int, tokens_per_frame: int) -> bool:
    """The thinning rule: is the frame pair at this distance attended at all."""
    shift = tokens_per_frame.bit_length() - distance.bit_length()  # band length L = 2**shift
    threshold_shift = THINNING_TOKENS.bit_length() - 1
    if shift >= threshold_shift:
        return True
    return distance % (2 ** (threshold_shift - shift)) == 0


def _band_width(distance: int, tokens_per_frame: int, decay: float, block: int) -> int | None:
    """The largest in-frame index difference attended between two frames at `distance`; None: all tokens."""
    if distance <= 1:
        return None
    length = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length() * decay
    width = math.floor(max(length, block))
    return None if width >= tokens_per_frame - 1 else width


@functools.lru_cache(maxsize=4096)
def _pair_tiles(row_offset: int, col_offset: int, tokens_per_frame: int, block: int, width: int | None) -> np.ndarray:
    """The kept tiles (ceil(n / block) square) of one frame pair whose first tokens sit `row_offset` and
    `col_offset` tokens into their tiles; `width`: the band (None: the whole frame)."""
    n = tokens_per_frame
    tiles = -(-n // block)
    span = tiles * block
    starts = np.arange(tiles) * block
    lo = np.maximum(starts, row_offset) - row_offset  # each row tile's in-frame query range [lo, hi)
    hi = np.minimum(np.minimum(starts + block, row_offset + n), span) - row_offset
    cols = np.arange(span) - col_offset  # in-frame key index of each column; valid where 0 <= c < n
    lo, hi, cols = lo[:, None], hi[:, None], cols[None, :]
    if width is None:
        counts = np.broadcast_to(np.maximum(hi - lo, 0), (tiles, span))
    else:
        counts = np.maximum(np.minimum(hi - 1, cols + width) - np.maximum(lo, cols - width) + 1, 0)
    counts = np.where((cols >= 0) & (cols < n), counts, 0).reshape(tiles, tiles, block)
    filled = (counts > 0).sum(axis=-1)
    dense = (3 * counts > block).sum(axis=-1)
    kept = 5 * dense > 3 * filled  # more than 60% of the non-empty columns more than 1/3 filled
    kept.setflags(write=False)
    return kept


def _check_layout(frames: int, tokens_per_frame: int, block: int, decay: float, text_tokens: int) -> None:
    for name, value, minimum in (("latent frames", frames, 1), ("tokens per frame", tokens_per_frame, 1),
                                 ("block", block, 1), ("text tokens", text_tokens, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"radial attention: {name} must be an integer >= {minimum}, got {value!r}")
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay > 0):
        raise ValueError(f"radial attention: decay must be a positive number, got {decay!r}")


def radial_block_mask(frames: int, tokens_per_frame: int, *, block: int, decay: float, text_tokens: int = 0,
                      first_frame_dense: bool = True) -> np.ndarray:
    """The kept tiles, (n, n) bool with n = ceil((frames * tokens_per_frame + text_tokens) / block); rows are
    query tiles, columns key tiles. See the module docstring for the rule."""
    _check_layout(frames, tokens_per_frame, block, decay, text_tokens)
    frames, tokens_per_frame, block, text_tokens = int(frames), int(tokens_per_frame), int(block), int(text_tokens)
    video = frames * tokens_per_frame
    n = -(-(video + text_tokens) // block)
    mask = np.zeros((n, n), dtype=bool)
    border = video // block  # the first tile holding a text (or padding) token
    mask[border:, :] = True
    mask[:, border:] = True
    for i in range(frames):
        r0 = i * tokens_per_frame // block
        for j in range(frames):
            distance = abs(i - j)
            if first_frame_dense and j == 0:
                width = None
            elif _pair_kept(distance, tokens_per_frame):
                width = _band_width(distance, tokens_per_frame, decay, block)
            else:
                continue
            tiles = _pair_tiles(i * tokens_per_frame % block, j * tokens_per_frame % block, tokens_per_frame,
                                block, width)
            c0 = j * tokens_per_frame // block
            mask[r0:r0 + len(tiles), c0:c0 + len(tiles)] |= tiles[: n - r0, : n - c0]
    return mask


def tile_sizes(tokens: int, block: int) -> np.ndarray:
    """The token count of each of the ceil(tokens / block) tiles along one side (the last may be short)."""
    sizes = np.full(-(-tokens // block), block, dtype=np.int64)
    if tokens % block:
        sizes[-1] = tokens % block
    return sizes


def score_fraction(mask: np.ndarray, tokens: int, block: int) -> float:
    """The fraction of a tokens x tokens score matrix that lies in the kept tiles of `mask`."""
    sizes = tile_sizes(tokens, block)
    return float(sizes @ mask.astype(np.int64) @ sizes) / float(tokens) ** 2


def radial_score_fraction(latent_frames: int, height_tokens: int, width_tokens: int, *, block: int,
                          decay: float, text_tokens: int = 0, first_frame_dense: bool = True) -> float:
    """The fraction of the (video + text)^2 scores that radial attention computes in a sparse block: the
    kept tiles' share of the score matrix, weighted by tile area (the short tiles at the end of a sequence
    that does not fill whole tiles count for what they hold). Dense blocks and steps compute 1.0."""
    if not isinstance(height_tokens, (int, np.integer)) or not isinstance(width_tokens, (int, np.integer)) \
            or height_tokens < 1 or width_tokens < 1:
        raise ValueError(f"radial attention: the token grid must be positive integers, got "
                         f"{height_tokens!r} x {width_tokens!r}")
    tokens_per_frame = int(height_tokens) * int(width_tokens)
    mask = radial_block_mask(latent_frames, tokens_per_frame, block=block, decay=decay, text_tokens=text_tokens,
                             first_frame_dense=first_frame_dense)
    return score_fraction(mask, latent_frames * tokens_per_frame + text_tokens, block)


@dataclass(frozen=True)
class TileGroup:
    """A run of query tokens [q_start, q_stop) that attend to the same key token ranges."""

    q_start: int
    q_stop: int
    key_ranges: tuple[tuple[int, int], ...]

    @property
    def keys(self) -> int:
        return sum(stop - start for start, stop in self.key_ranges)


@dataclass(frozen=True)
class RadialPlan:
    """A block mask turned into the calls radial attention makes, for sequences of `tokens` keys."""

    mask: np.ndarray
    block: int
    tokens: int
    groups: tuple[TileGroup, ...]
    tile_ptr: np.ndarray  # the kept key tiles of each query tile, for the GPU kernel (kernels.tile_lists)
    tile_idx: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, block: int, tokens: int) -> "RadialPlan":
        n = -(-tokens // block)
        if mask.shape != (n, n):
            raise ValueError(f"a block mask of shape {mask.shape} does not cover {tokens} tokens in tiles of {block}")
        groups, row = [], 0
        while row < n:
            stop = row + 1
            while stop < n and np.array_equal(mask[stop], mask[row]):
                stop += 1
            groups.append(TileGroup(row * block, min(stop * block, tokens), _runs(mask[row], block, tokens)))
            row = stop
        return cls(mask, block, tokens, tuple(groups), *tile_lists(mask))

    def score_fraction(self) -> float:
        return score_fraction(self.mask, self.tokens, self.block)


def _runs(row: np.ndarray, block: int, tokens: int) -> tuple[tuple[int, int], ...]:
    """The kept tiles of one mask row as contiguous key token ranges."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
    return tuple((int(a) * block, min(int(b) * block, tokens)) for a, b in zip(edges[::2], edges[1::2]))


def gathered_bytes(group: TileGroup, batch: int, heads: int, head_dim: int, itemsize: int) -> int:
    """The keys and values a call over `group` gathers: none from one contiguous range (a view), else their
    concatenation (`head_dim` wide, `itemsize` bytes each)."""
    return 0 if len(group.key_ranges) == 1 else 2 * batch * heads * group.keys * head_dim * itemsize


def group_query_block(group: TileGroup, batch: int, heads: int, q_len: int, gathered: int, budget: int | None) -> int:
    """Queries per call over `group` so that the call's float32 scores and softmax and its gathered keys and
    values fit in `budget` together (at least one query; all of them where attention is fused)."""
    queries = min(group.q_stop, q_len) - group.q_start
    return query_block(batch, heads, queries, group.keys, None if budget is None else max(1, budget - gathered))


def radial_attention_bytes(plan: RadialPlan, batch: int, heads: int, q_len: int, head_dim: int, itemsize: int,
                           budget: int) -> int:
    """Bytes alive at once in `radial_attention`'s portable path with the score budget `budget` (the memory
    preflight's figure; the GPU kernel keeps no scores): the largest call's float32 scores and their softmax
    plus the keys and values it gathered (`gathered_bytes`). At most the budget, unless one query's scores and
    the gathered keys exceed it; far less where the calls' scores are small (few heads, a short sequence)."""
    peak = 0
    for group in plan.groups:
        if group.q_start >= q_len:
            break
        gathered = gathered_bytes(group, batch, heads, head_dim, itemsize)
        queries = group_query_block(group, batch, heads, q_len, gathered, budget)
        peak = max(peak, 2 * batch * heads * queries * group.keys * 4 + gathered)
    return peak


def _take_ranges(t: mx.array, ranges: tuple[tuple[int, int], ...], axis: int) -> mx.array:
    if len(ranges) == 1 and ranges[0] == (0, t.shape[axis]):
        return t
    index = [slice(None)] * t.ndim
    parts = []
    for start, stop in ranges:
        index[axis] = slice(start, stop)
        parts.append(t[tuple(index)])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def radial_attention(q: mx.array, k: mx.array, v: mx.array, plan: RadialPlan, scale: float | None = None,
                     mask: mx.array | None = None) -> mx.array:
    """Scaled dot-product attention over the tiles `plan` keeps.

    q: (B, Lq, heads, D) with Lq <= plan.tokens (the first Lq tokens of the sequence ask); k, v: (B, plan.tokens,
    heads, D). `mask`: an additive or boolean key mask broadcastable to (B, heads, 1, Lk) (e.g. text padding),
    or None. Returns (B, Lq, heads * D) in the dtype of q, the same as `attention` with every score outside the
    kept tiles masked out.
    """
    batch, q_len, heads, head_dim = q.shape
    if k.shape[1] != plan.tokens or v.shape[1] != plan.tokens or q_len > plan.tokens:
        raise ValueError(f"radial attention planned for {plan.tokens} tokens got {q_len} queries and "
                         f"{k.shape[1]} keys")
    if mask is not None and (mask.ndim != 4 or mask.shape[-2] != 1):
        raise ValueError(f"radial attention takes a key mask of shape (B, heads or 1, 1, Lk), not {mask.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    fused = block_sparse_attention(q, k, v, plan.tile_ptr, plan.tile_idx, plan.block, scale, mask)
    if fused is not None:  # the Metal / CUDA kernel (mlx_video.kernels), where one runs
        return fused
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    budget = score_budget_bytes()
    parts = []
    for group in plan.groups:
        if group.q_start >= q_len:
            break
        keys = _take_ranges(k, group.key_ranges, 2)
        values = _take_ranges(v, group.key_ranges, 2)
        key_mask = None if mask is None else _take_ranges(mask, group.key_ranges, 3)
        stop = min(group.q_stop, q_len)
        step = group_query_block(group, batch, heads, q_len, gathered_bytes(group, batch, heads, head_dim,
                                                                            q.dtype.size), budget)
        for start in range(group.q_start, stop, step):
            part = mx.fast.scaled_dot_product_attention(q[:, :, start:min(stop, start + step)], keys, values,
                                                        scale=scale, mask=key_mask)
            if budget is not None:
                mx.eval(part)  # one call's scores at a time, as `attention` bounds them
            parts.append(part)
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * head_dim)
