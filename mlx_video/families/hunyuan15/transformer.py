"""HunyuanVideo 1.5 diffusion transformer (the official `HunyuanVideo_1_5_DiffusionTransformer`), channels-last.

The latents (noisy 32 + condition 32 + mask 1 channels, patch 1x1x1) and a joint text sequence go through
`num_blocks` double-stream blocks (separate weights per stream, separate q/k/v projections with RMS qk-norm,
joint attention over [image; text], RoPE on the image tokens only); a final adaLN layer maps the image tokens
back to latents. The text sequence is made of three sources, each marked by `cond_type_embedding` (0, 1, 2):

    the Qwen2.5-VL states refined by `txt_in` (the token refiner shared with HunyuanVideo 1.0),
    the ByT5 glyph states through `byt5_in` (LayerNorm, Linear, GELU, Linear, GELU, Linear),
    the SigLIP image features through `vision_in` (LayerNorm, Linear, GELU, Linear, LayerNorm), I2V only.

The reference puts each sample's valid tokens first, in the order [image, glyph, text], and masks the rest (the
text padding, the unquoted prompt's glyph slots, and for T2V every image slot, since its image features are all
zero). Attention of a valid token never sees a masked one, so we keep only the valid tokens; where samples of a
batch (CFG's conditional and unconditional passes) keep different numbers, the shorter are padded and their
padding hidden from the keys.

The timestep embedding is `time_in(t)`, plus `time_r_in(r)` for the step-distilled (MeanFlow) model, r being
the next step's timestep (0 at the last step); the refiner is conditioned on t alone.

The forward is split in three so that a step cache can skip the blocks:

    state = model.embed(x, timestep, text, text_mask, glyph, glyph_mask, image, timestep_r)
    state = model.run_blocks(state, start=0, stop=None)
    velocity = model.unembed(state)

Precision: residual streams, the conditioning vector, modulation and norms in float32; linear layers in `dtype`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_video.families.hunyuan15.config import Hunyuan15Config
from mlx_video.nn.dual_stream import DualStreamBlock, DualStreamState, FinalLayer, modulate
from mlx_video.nn.norms import layer_norm_fp32
from mlx_video.nn.rope import rope_tables_3d
from mlx_video.nn.token_refiner import MLP, MLPEmbedder, TokenRefiner, timestep_frequencies, timestep_sinusoid

TEXT, GLYPH, IMAGE = 0, 1, 2  # the rows of cond_type_embedding


class AffineNorm(nn.Module):
    """torch.nn.LayerNorm (affine, eps 1e-5 by default) computed in float32."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm_fp32(x, self.weight, self.bias, self.eps)


class GlyphProjection(nn.Module):
    """`byt5_in`: LayerNorm, fc1, GELU, fc2, GELU, fc3 (no residual in the 1.5 model)."""

    def __init__(self, in_dim: int, hidden: int, dim: int):
        super().__init__()
        self.layernorm = AffineNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        h = nn.gelu(self.fc1(self.layernorm(x).astype(dtype)))
        return self.fc3(nn.gelu(self.fc2(h))).astype(mx.float32)


class VisionProjection(nn.Module):
    """`vision_in`: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm_in = AffineNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, dim)
        self.norm_out = AffineNorm(dim)

    def __call__(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        h = self.linear_2(nn.gelu(self.linear_1(self.norm_in(x).astype(dtype))))
        return self.norm_out(h)


class StreamWeights(nn.Module):
    """One stream's half of a double-stream block (the official `img_*` or `txt_*` layers)."""

    def __init__(self, config: Hunyuan15Config):
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.mod = nn.Linear(dim, 6 * dim)
        self.attn_q = nn.Linear(dim, dim)
        self.attn_k = nn.Linear(dim, dim)
        self.attn_v = nn.Linear(dim, dim)
        self.attn_q_norm = nn.RMSNorm(head_dim, eps=config.eps)
        self.attn_k_norm = nn.RMSNorm(head_dim, eps=config.eps)
        self.attn_proj = nn.Linear(dim, dim)
        self.mlp = MLP(dim, config.mlp_dim, nn.gelu_approx)

    def qkv(self, x: mx.array, shift: mx.array, scale: mx.array, num_heads: int, eps: float, dtype: mx.Dtype):
        h = modulate(x, shift, scale, eps).astype(dtype)
        heads = lambda y: y.reshape(*y.shape[:-1], num_heads, -1)  # noqa: E731
        return self.attn_q_norm(heads(self.attn_q(h))), self.attn_k_norm(heads(self.attn_k(h))), heads(self.attn_v(h))


def valid_tokens(parts: list[tuple[mx.array, mx.array | None]]) -> tuple[mx.array, mx.array | None]:
    """Each sample's valid tokens of `parts` [(tokens (B, L, dim), mask (B, L) or None: all valid)], in order,
    as (B, N, dim) with N the most any sample keeps, and a (B, N) bool mask when some sample keeps fewer (None
    when all keep N). The masks are read on the host: they are inputs, not computed."""
    tokens = mx.concatenate([p for p, _ in parts], axis=1)
    masks = [np.ones(p.shape[:2], bool) if m is None else np.array(m).astype(bool) for p, m in parts]
    keep = np.concatenate(masks, axis=1)
    counts = keep.sum(axis=1)
    n = int(counts.max())
    index = np.zeros((len(keep), n), np.int32)
    for b, row in enumerate(keep):
        index[b, : counts[b]] = np.nonzero(row)[0]
    gathered = mx.take_along_axis(tokens, mx.array(index)[..., None], axis=1)
    if (counts == n).all():
        return gathered, None
    return gathered, mx.array(np.arange(n)[None, :] < counts[:, None])


def used_columns(tokens: mx.array, mask: mx.array | None) -> tuple[mx.array | None, mx.array | None]:
    """`tokens` (B, L, dim) and `mask` (B, L) without the columns that are padding in every sample; (None, None)
    when no column is valid. A mask that keeps every column is returned as None."""
    if mask is None:
        return tokens, None
    keep = np.array(mask).astype(bool)
    columns = np.nonzero(keep.any(axis=0))[0]
    if len(columns) == 0:
        return None, None
    if len(columns) < keep.shape[1]:
        tokens, mask = tokens[:, mx.array(columns)], mask[:, mx.array(columns)]
        keep = keep[:, columns]
    return tokens, None if keep.all() else mask


class Hunyuan15Transformer(nn.Module):
    def __init__(self, config: Hunyuan15Config, dtype: mx.Dtype = mx.bfloat16):
        super().__init__()
        self.config = config
        self.dtype = dtype
        dim = config.hidden_size
        self.img_in = nn.Linear(math.prod(config.patch_size) * config.in_channels, dim)
        self.time_in = MLPEmbedder(config.freq_dim, dim)
        if config.use_meanflow:
            self.time_r_in = MLPEmbedder(config.freq_dim, dim)
        self.txt_in = TokenRefiner(config.text_dim, dim, config.num_heads, config.num_refiner_blocks, 4.0,
                                   config.freq_dim, config.eps)
        self.byt5_in = GlyphProjection(config.glyph_dim, config.glyph_hidden, dim)
        self.vision_in = VisionProjection(config.image_dim, dim)
        self.cond_type_embedding = nn.Embedding(3, dim)
        self.double_blocks = [DualStreamBlock(StreamWeights(config), StreamWeights(config), config.num_heads, config.eps)
                              for _ in range(config.num_blocks)]
        self.final_layer = FinalLayer(dim, math.prod(config.patch_size) * config.out_channels, config.eps)
        # Leading underscores keep these out of parameters().
        self._freqs = timestep_frequencies(config.freq_dim)
        self._rope_cache = {}

    def rope_tables(self, grid: tuple[int, int, int]) -> tuple[mx.array, mx.array]:
        if grid not in self._rope_cache:
            self._rope_cache[grid] = rope_tables_3d(grid, self.config.head_dim, theta=self.config.rope_theta,
                                                    axis_dims=self.config.rope_axes)
        return self._rope_cache[grid]

    def check_inputs(self, x, text, glyph, image) -> None:
        cfg, batch = self.config, x.shape[0]
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, T, H, W, {cfg.in_channels}), got {x.shape}")
        if any(n % p for n, p in zip(x.shape[1:4], cfg.patch_size)):
            raise ValueError(f"latent size {x.shape[1:4]} is not a multiple of the patch {cfg.patch_size}")
        for name, value, dim in (("text", text, cfg.text_dim), ("glyph", glyph, cfg.glyph_dim),
                                 ("image", image, cfg.image_dim)):
            if value is not None and (value.ndim != 3 or value.shape[0] != batch or value.shape[2] != dim):
                raise ValueError(f"{name} states must be ({batch}, L, {dim}), got {value.shape}")

    def conditioning(self, timestep: mx.array, timestep_r: mx.array | None, batch: int):
        """(vec, the timestep's sinusoid): time_in(t) (+ time_r_in(r) for MeanFlow)."""
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (batch,))
        t_sinusoid = timestep_sinusoid(timestep, self._freqs)
        vec = self.time_in(t_sinusoid, self.dtype)
        if timestep_r is not None:
            if not self.config.use_meanflow:
                raise ValueError("timestep_r is the MeanFlow input; this model has no time_r_in")
            timestep_r = mx.broadcast_to(mx.array(timestep_r).reshape(-1), (batch,))
            vec = vec + self.time_r_in(timestep_sinusoid(timestep_r, self._freqs), self.dtype)
        return vec, t_sinusoid

    def text_tokens(self, text, text_mask, glyph, glyph_mask, image, t_sinusoid):
        """The joint text sequence (valid image, glyph and text tokens) and its padding mask (see valid_tokens).
        Columns that are padding in every sample are dropped first (the 1000-token Qwen padding, the 256 glyph
        slots): a valid token never attends to them, and the refiner's pooling skips them."""
        dtype, kind = self.dtype, self.cond_type_embedding.weight.astype(mx.float32)
        parts = []
        if image is not None:
            parts.append((self.vision_in(image, dtype) + kind[IMAGE], None))
        if glyph is not None:
            glyph, glyph_mask = used_columns(glyph, glyph_mask)
            if glyph is not None:
                parts.append((self.byt5_in(glyph, dtype) + kind[GLYPH], glyph_mask))
        text, text_mask = used_columns(text, text_mask)
        if text is not None:
            mask = None if text_mask is None else text_mask.astype(mx.bool_)
            parts.append((self.txt_in(text, mask, t_sinusoid, dtype) + kind[TEXT], text_mask))
        if not parts:
            return mx.zeros((t_sinusoid.shape[0], 0, self.config.hidden_size)), None
        return valid_tokens(parts)

    def embed(self, x: mx.array, timestep: mx.array, text: mx.array, text_mask: mx.array | None,
              glyph: mx.array | None = None, glyph_mask: mx.array | None = None, image: mx.array | None = None,
              timestep_r: mx.array | None = None) -> DualStreamState:
        """Patchify and embed the latents, build the joint text sequence, the conditioning vector, RoPE, mask.

        x: (B, T, H, W, in_channels) = [noisy latents, condition latents, mask]. timestep / timestep_r: (B,) the
        flow time x 1000. text: (B, L, text_dim) Qwen2.5-VL states, text_mask (B, L) 1 for real tokens (None: all
        real). glyph: (B, Lg, glyph_dim) ByT5 states of the quoted text with glyph_mask, or None (no quoted text).
        image: (B, 729, image_dim) SigLIP features (I2V), or None (T2V: the reference masks all-zero features).
        """
        self.check_inputs(x, text, glyph, image)
        cfg, dtype = self.config, self.dtype
        batch, frames, height, width, channels = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        patches = x.reshape(batch, f, pt, h, ph, w, pw, channels)
        patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, f * h * w, -1)
        img = self.img_in(patches.astype(dtype)).astype(mx.float32)
        vec, t_sinusoid = self.conditioning(timestep, timestep_r, batch)
        txt, txt_mask = self.text_tokens(text, text_mask, glyph, glyph_mask, image, t_sinusoid)
        mask = None
        if txt_mask is not None:
            mask = mx.concatenate([mx.ones((batch, f * h * w), dtype=mx.bool_), txt_mask], axis=1)[:, None, None, :]
        return DualStreamState(img, txt, vec, self.rope_tables((f, h, w)), mask, (batch, frames, height, width, channels))

    @property
    def num_blocks(self) -> int:
        return len(self.double_blocks)

    def attention_sites(self) -> list:
        """The blocks' joint attentions in order (they take `--attention`'s sparse one)."""
        return list(self.double_blocks)

    def run_blocks(self, state: DualStreamState, start: int = 0, stop: int | None = None) -> DualStreamState:
        """Blocks start..stop-1 (all by default); returns a new state."""
        img, txt = state.img, state.txt
        for block in self.double_blocks[start:stop]:
            img, txt = block(img, txt, state.vec, state.rope, state.mask, self.dtype)
        return replace(state, img=img, txt=txt)

    def blocks(self, state: DualStreamState) -> DualStreamState:
        return self.run_blocks(state)

    def head(self, state: DualStreamState) -> mx.array:
        """Velocity (B, T, H, W, out_channels) float32 from the image tokens."""
        cfg = self.config
        batch, frames, height, width, _ = state.latent_shape
        pt, ph, pw = cfg.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        out = self.final_layer(state.img, state.vec, self.dtype)
        # The official patch vector is channel-first: (c, pt, ph, pw).
        out = out.reshape(batch, f, h, w, cfg.out_channels, pt, ph, pw).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return out.reshape(batch, frames, height, width, cfg.out_channels)

    def unembed(self, state: DualStreamState) -> mx.array:
        return self.head(state)

    def __call__(self, x, timestep, text, text_mask, glyph=None, glyph_mask=None, image=None, timestep_r=None):
        return self.head(self.blocks(self.embed(x, timestep, text, text_mask, glyph, glyph_mask, image, timestep_r)))
