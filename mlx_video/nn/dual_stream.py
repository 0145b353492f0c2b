"""The double-stream (MMDiT) pieces that HunyuanVideo and HunyuanVideo 1.5 share, layer for layer.

Both models' double blocks hold an image and a text stream with their own 6-way adaLN, joint attention over
[image; text] with RoPE on the image tokens only, and a gated MLP per stream (official code:
Tencent/HunyuanVideo `hyvideo/modules/models.py` MMDoubleStreamBlock and Tencent-Hunyuan/HunyuanVideo-1.5
`hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py`). They differ only in how a stream projects q, k
and v (one fused linear in 1.0, three in 1.5), so a family passes its own stream weights: any module with
`mod`, `qkv(x, shift, scale, num_heads, eps, dtype)`, `attn_proj` and `mlp`.

HunyuanVideo-I2V's token replace (diffusers `HunyuanVideoTokenReplaceTransformerBlock`) gives the image tokens of
the first latent frame, the clean image's, the modulation of timestep 0 (`FirstTokens`); every modulated step is
per token, so it runs on the two token ranges apart (`per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_video.kernels import adaln_modulate, apply_rope_qk
from mlx_video.nn.token_refiner import gated_add
from mlx_video.nn.attention import attention


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then x * (1 + scale) + shift; shift/scale are (B, dim), x is (B, L, dim)."""
    return adaln_modulate(x, shift[:, None, :], scale[:, None, :], eps)


@dataclass(frozen=True)
class FirstTokens:
    """The first `count` image tokens take their modulation from `vec` (B, dim) instead of the run's vector."""

    count: int
    vec: mx.array


def per_token(fn, arrays, params, first_params=None, count: int = 0):
    """fn(*arrays, *params), a per-token function of (B, L, ...) arrays; with `first_params`, the first `count`
    tokens are computed with those instead (outputs joined along the token axis)."""
    length = arrays[0].shape[1]
    if first_params is None or count <= 0:
        return fn(*arrays, *params)
    if count >= length:
        return fn(*arrays, *first_params)
    head = fn(*(a[:, :count] for a in arrays), *first_params)
    tail = fn(*(a[:, count:] for a in arrays), *params)
    if isinstance(head, tuple):
        return tuple(mx.concatenate([a, b], axis=1) for a, b in zip(head, tail))
    return mx.concatenate([head, tail], axis=1)


def modulation(linear: nn.Module, vec: mx.array, parts: int, dtype: mx.Dtype) -> list[mx.array]:
    """The `parts` float32 (B, dim) vectors an adaLN linear makes from the conditioning vector."""
    return mx.split(linear(nn.silu(vec).astype(dtype)).astype(mx.float32), parts, axis=-1)


class DualStreamBlock(nn.Module):
    """One double-stream block over the image stream `img` (B, N, dim) and the text stream `txt` (B, L, dim)."""

    def __init__(self, img: nn.Module, txt: nn.Module, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.img = img
        self.txt = txt
        self.sparse = None  # a sparse joint attention (mlx_video.nn.attention.attention's `sparse`)

    def __call__(self, img, txt, vec, rope, mask, dtype, first: FirstTokens | None = None):
        img_mod, txt_mod = modulation(self.img.mod, vec, 6, dtype), modulation(self.txt.mod, vec, 6, dtype)
        first_mod = None if first is None else modulation(self.img.mod, first.vec, 6, dtype)
        count = 0 if first is None else first.count

        def img_part(fn, arrays, which):
            picked = None if first_mod is None else [first_mod[i] for i in which]
            return per_token(fn, arrays, [img_mod[i] for i in which], picked, count)

        heads, eps = self.num_heads, self.eps
        img_q, img_k, img_v = img_part(lambda x, sh, sc: self.img.qkv(x, sh, sc, heads, eps, dtype), (img,), (0, 1))
        txt_q, txt_k, txt_v = self.txt.qkv(txt, txt_mod[0], txt_mod[1], heads, eps, dtype)
        img_q, img_k = apply_rope_qk(img_q, img_k, rope)
        out = attention(mx.concatenate([img_q, txt_q], axis=1), mx.concatenate([img_k, txt_k], axis=1),
                        mx.concatenate([img_v, txt_v], axis=1), mask=mask, sparse=self.sparse)
        n_img = img.shape[1]
        img = img_part(lambda x, o, g: gated_add(x, g, self.img.attn_proj(o)), (img, out[:, :n_img]), (2,))
        txt = gated_add(txt, txt_mod[2], self.txt.attn_proj(out[:, n_img:]))
        img = img_part(lambda x, sh, sc, g: gated_add(x, g, self.img.mlp(modulate(x, sh, sc, eps).astype(dtype))),
                       (img,), (3, 4, 5))
        txt = gated_add(txt, txt_mod[5], self.txt.mlp(modulate(txt, txt_mod[3], txt_mod[4], eps).astype(dtype)))
        return img, txt


class FinalLayer(nn.Module):
    """adaLN (shift, scale: the official chunk order) then the linear to the patch's output features."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_features)

    def __call__(self, x: mx.array, vec: mx.array, dtype: mx.Dtype) -> mx.array:
        shift, scale = mx.split(self.adaLN_modulation(nn.silu(vec).astype(dtype)).astype(mx.float32), 2, axis=-1)
        return self.linear(modulate(x, shift, scale, self.eps).astype(dtype)).astype(mx.float32)


@dataclass
class DualStreamState:
    """What flows between embed, blocks and head. img (B, N, dim) and txt (B, L, dim) are float32."""

    img: mx.array
    txt: mx.array
    vec: mx.array
    rope: tuple[mx.array, mx.array]
    mask: mx.array | None  # (B, 1, 1, N + L) bool key mask, or None when no sample has padding
    latent_shape: tuple[int, int, int, int, int]  # (B, T, H, W, C) of the input latents
    first: FirstTokens | None = None  # token replace (HunyuanVideo-I2V): the first frame's own modulation

    @property
    def hidden(self) -> mx.array:
        """The image stream (the step cache's residual)."""
        return self.img

    @hidden.setter
    def hidden(self, value: mx.array) -> None:
        self.img = value
