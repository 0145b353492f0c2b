"""HunyuanVideo diffusion transformer (the official `HYVideoDiffusionTransformer`), channels-last.

Structure: the latent patches and the refined text tokens go through `num_double_blocks` double-stream blocks
(separate weights per stream, joint attention) and then `num_single_blocks` single-stream blocks over the
concatenation [image; text]; a final adaLN layer maps the image tokens back to latent patches.

The forward is split in three so that a step cache can skip the blocks:

    state = model.embed(x, timestep, text, text_mask, pooled, guidance)
    state = model.run_blocks(state, start=0, stop=None)   # blocks start..stop-1; `blocks(state)`: all of them
    velocity = model.unembed(state)                       # also `head(state)`

The blocks are numbered double-stream first, then single-stream. `state.hidden` is the image stream, the part
of the residual the output is read from (what `mlx_video.pipelines.cache` stores and adds).

Precision: the residual streams, the conditioning vector, the modulation arithmetic and the norms are float32;
the linear layers run in `dtype` (the constructor's, not inferred from the weights). The timestep sinusoid is
float32 as in the official code.

Text padding: the official model splits each sample into [image + valid text] and [text padding] with
`cu_seqlens`; a key mask that hides the padding gives the image and valid-text tokens the same result. When
all samples have the same number of real tokens (always so for batch 1), the padding is dropped after the
token refiner instead, and the blocks run without a mask.
"""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from mlx_video.kernels import apply_rope_qk
from mlx_video.families.hunyuan.config import HunyuanTransformerConfig
from mlx_video.nn.attention import attention
from mlx_video.nn.dual_stream import (
    DualStreamBlock,
    DualStreamState,
    FinalLayer,
    FirstTokens,
    modulate,
    modulation,
    per_token,
)
from mlx_video.nn.rope import rope_tables_3d
from mlx_video.nn.token_refiner import (
    MLP,
    MLPEmbedder,
    TokenRefiner,
    gated_add,
    split_qkv,
    timestep_frequencies,
    timestep_sinusoid,
)

def _heads(x: mx.array, num_heads: int) -> mx.array:
    return x.reshape(*x.shape[:-1], num_heads, -1)

# --- double- and single-stream blocks --------------------------------------------------------------------

class StreamWeights(nn.Module):
    """One stream's half of a double-stream block (the official `img_*` or `txt_*` layers)."""

    def __init__(self, config: HunyuanTransformerConfig):
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.mod = nn.Linear(dim, 6 * dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim)
        self.attn_q_norm = nn.RMSNorm(head_dim, eps=config.eps)
        self.attn_k_norm = nn.RMSNorm(head_dim, eps=config.eps)
        self.attn_proj = nn.Linear(dim, dim)
        self.mlp = MLP(dim, config.mlp_dim, nn.gelu_approx)

    def qkv(self, x: mx.array, shift: mx.array, scale: mx.array, num_heads: int, eps: float, dtype: mx.Dtype):
        h = modulate(x, shift, scale, eps).astype(dtype)
        q, k, v = split_qkv(self.attn_qkv(h), num_heads)
        return self.attn_q_norm(q), self.attn_k_norm(k), v

class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over [image; text]: linear1 gives q | k | v | mlp, linear2 mixes attn and mlp."""

    def __init__(self, config: HunyuanTransformerConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.eps = config.eps
        self.split = (dim, 2 * dim, 3 * dim)
        self.linear1 = nn.Linear(dim, 3 * dim + config.mlp_dim)
        self.linear2 = nn.Linear(dim + config.mlp_dim, dim)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.eps)
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.eps)
        self.modulation = nn.Linear(dim, 3 * dim)
        self.sparse = None  # a sparse attention (mlx_video.nn.attention.attention's `sparse`)

    def __call__(self, x, n_img, vec, rope, mask, dtype, first: FirstTokens | None = None):
        mods = modulation(self.modulation, vec, 3, dtype)
        first_mods = None if first is None else modulation(self.modulation, first.vec, 3, dtype)
        count = 0 if first is None else first.count
        h = per_token(lambda y, shift, scale: self.linear1(modulate(y, shift, scale, self.eps).astype(dtype)),
                      (x,), mods[:2], first_mods and first_mods[:2], count)
        q, k, v, mlp = mx.split(h, self.split, axis=-1)
        q = self.q_norm(_heads(q, self.num_heads))
        k = self.k_norm(_heads(k, self.num_heads))
        img_q, img_k = apply_rope_qk(q[:, :n_img], k[:, :n_img], rope)
        q = mx.concatenate([img_q, q[:, n_img:]], axis=1)
        k = mx.concatenate([img_k, k[:, n_img:]], axis=1)
        out = attention(q, k, _heads(v, self.num_heads), mask=mask, sparse=self.sparse)
        y = self.linear2(mx.concatenate([out, nn.gelu_approx(mlp)], axis=-1))
        return per_token(lambda r, u, gate: gated_add(r, gate, u), (x, y), mods[2:], first_mods and first_mods[2:], count)

def _common_prefix_length(mask: mx.array) -> int | None:
    """n when every row of the (B, L) bool mask is n True then False (right padding, same count), else None."""
    counts = mask.astype(mx.int32).sum(axis=1)
    n = int(counts[0].item())
    prefix = mx.arange(mask.shape[1])[None, :] < n
    if n == 0 or not bool(mx.all(mask == prefix).item()):
        return None
    return n

# --- the model ---------------------------------------------------------------------------------------------

class HunyuanTransformer(nn.Module):
    def __init__(self, config: HunyuanTransformerConfig, dtype: mx.Dtype = mx.bfloat16):
        super().__init__()
        self.config = config
        self.dtype = dtype
        dim = config.hidden_size
        self.img_in = nn.Linear(math.prod(config.patch_size) * config.in_channels, dim)
        self.time_in = MLPEmbedder(config.freq_dim, dim)
        self.vector_in = MLPEmbedder(config.pooled_dim, dim)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(config.freq_dim, dim)
        self.txt_in = TokenRefiner(config.text_dim, dim, config.num_heads, config.num_refiner_blocks,
                                   config.refiner_mlp_ratio, config.freq_dim, config.eps)
        self.double_blocks = [DualStreamBlock(StreamWeights(config), StreamWeights(config), config.num_heads, config.eps)
                              for _ in range(config.num_double_blocks)]
        self.single_blocks = [SingleStreamBlock(config) for _ in range(config.num_single_blocks)]
        self.final_layer = FinalLayer(dim, math.prod(config.patch_size) * config.out_channels, config.eps)
        # Leading underscores keep these out of parameters().
        self._freqs = timestep_frequencies(config.freq_dim)
        self._rope_cache = {}

    def rope_tables(self, grid: tuple[int, int, int]) -> tuple[mx.array, mx.array]:
        if grid not in self._rope_cache:
            self._rope_cache[grid] = rope_tables_3d(
                grid, self.config.head_dim, theta=self.config.rope_theta, axis_dims=self.config.rope_axes
            )
        return self._rope_cache[grid]

    def embed(
        self,
        x: mx.array,
        timestep: mx.array,
        text: mx.array,
        text_mask: mx.array | None,
        pooled: mx.array,
        guidance: mx.array | None = None,
    ) -> DualStreamState:
        """Patchify and embed the latents, refine the text, build the conditioning vector, RoPE and mask.

        x: (B, T, H, W, C_in) latents. timestep: (B,) the flow time * 1000 (float). text: (B, L, text_dim) LLM
        states; text_mask: (B, L) (1 for real tokens, 0 for padding), None if all real. pooled: (B, pooled_dim)
        CLIP pooled output. guidance: (B,) embedded guidance scale * 1000 (the official code passes 6.0 as 6000);
        required when the model has a guidance embedding.
        """
        cfg, dtype = self.config, self.dtype
        batch, frames, height, width, channels = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {(frames, height, width)} is not a multiple of the patch {cfg.patch_size}")
        if channels != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} latent channels, got {channels}")
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text states must be ({batch}, L, {cfg.text_dim}), got {text.shape}")
        if cfg.guidance_embed and guidance is None:
            raise ValueError("this model embeds the guidance scale: pass guidance (scale * 1000)")
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (batch,))
        f, h, w = frames // pt, height // ph, width // pw

        patches = x.reshape(batch, f, pt, h, ph, w, pw, channels)
        patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, f * h * w, -1)
        img = self.img_in(patches.astype(dtype)).astype(mx.float32)

        t_sinusoid = timestep_sinusoid(timestep, self._freqs)
        vec = self.time_in(t_sinusoid, dtype) + self.vector_in(pooled, dtype)
        if cfg.guidance_embed:
            guidance = mx.broadcast_to(mx.array(guidance).reshape(-1), (batch,))
            vec = vec + self.guidance_in(timestep_sinusoid(guidance, self._freqs), dtype)

        first = None
        if cfg.image_condition == "token_replace":
            # the clean image's tokens (latent frame 0) are modulated as at timestep 0, without the guidance term
            clean = timestep_sinusoid(mx.zeros_like(timestep), self._freqs)
            first = FirstTokens(h * w, self.time_in(clean, dtype) + self.vector_in(pooled, dtype))

        if text_mask is not None:
            text_mask = text_mask.astype(mx.bool_)
        txt = self.txt_in(text, text_mask, t_sinusoid, dtype)

        mask = None
        if text_mask is not None:
            valid = _common_prefix_length(text_mask)
            if valid is not None:
                # Every row is `valid` real tokens then padding: drop the padding instead of masking it (what
                # the official cu_seqlens split amounts to), so the blocks attend without a mask.
                txt = txt[:, :valid]
            else:
                keys = mx.concatenate([mx.ones((batch, f * h * w), dtype=mx.bool_), text_mask], axis=1)
                mask = keys[:, None, None, :]
        return DualStreamState(img, txt, vec, self.rope_tables((f, h, w)), mask, (batch, frames, height, width, channels),
                               first)

    @property
    def num_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    def attention_sites(self) -> list:
        """The blocks' joint attentions in order, double-stream first (they take `--attention`'s sparse one)."""
        return [*self.double_blocks, *self.single_blocks]

    def run_blocks(self, state: DualStreamState, start: int = 0, stop: int | None = None) -> DualStreamState:
        """Blocks start..stop-1 (all by default), double-stream ones numbered first; returns a new state."""
        stop = self.num_blocks if stop is None else stop
        n_double = len(self.double_blocks)
        img, txt, dtype = state.img, state.txt, self.dtype
        for block in self.double_blocks[start:max(start, min(stop, n_double))]:
            img, txt = block(img, txt, state.vec, state.rope, state.mask, dtype, state.first)
        singles = self.single_blocks[max(start - n_double, 0):max(stop - n_double, 0)]
        if singles:
            n_img = img.shape[1]
            x = mx.concatenate([img, txt], axis=1)
            for block in singles:
                x = block(x, n_img, state.vec, state.rope, state.mask, dtype, state.first)
            img, txt = x[:, :n_img], x[:, n_img:]
        return replace(state, img=img, txt=txt)

    def blocks(self, state: DualStreamState) -> DualStreamState:
        """All double-stream then all single-stream blocks."""
        return self.run_blocks(state)

    def head(self, state: DualStreamState) -> mx.array:
        """Velocity (B, T, H, W, C_out) float32 from the image tokens."""
        cfg = self.config
        batch, frames, height, width, _ = state.latent_shape
        pt, ph, pw = cfg.patch_size
        f, h, w = frames // pt, height // ph, width // pw
        out = self.final_layer(state.img, state.vec, self.dtype)
        # The official patch vector is channel-first: (c, pt, ph, pw).
        out = out.reshape(batch, f, h, w, cfg.out_channels, pt, ph, pw)
        out = out.transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return out.reshape(batch, frames, height, width, cfg.out_channels)

    def unembed(self, state: DualStreamState) -> mx.array:
        return self.head(state)

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        text: mx.array,
        text_mask: mx.array | None,
        pooled: mx.array,
        guidance: mx.array | None = None,
    ) -> mx.array:
        return self.head(self.blocks(self.embed(x, timestep, text, text_mask, pooled, guidance)))
