"""Wan VACE: the Wan transformer with a context branch (`vace_blocks`) that turns the conditioning latents (the
control or source video split by the mask, the mask itself, reference-image frames) into hints added to the
residual stream after chosen blocks, each scaled by its own `--control-scale`.

The layout follows the published checkpoints (Wan-Video/Wan2.1 wan/modules/vace_model.py; diffusers
`WanVACETransformer3DModel`): `vace_patch_embedding` patchifies the conditioning like the latents; context
block 0 projects it (`before_proj`) and adds the patched latents; every context block is a Wan block whose
output, projected by `after_proj`, is the hint for main block `vace_layers[j]`, and whose stream feeds the
next context block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.transformer import PreparedContext, TextKV, WanBlock, WanState, WanTransformer


@dataclass(frozen=True)
class WanVACEConfig(WanTransformerConfig):
    vace_layers: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30, 35)  # the main blocks that take a hint
    vace_in_channels: int = 96  # 2 x 16 latent channels (inactive, reactive) + 64 mask channels (8 x 8 pixels)

    def __post_init__(self):
        object.__setattr__(self, "vace_layers", tuple(int(i) for i in self.vace_layers))
        layers = self.vace_layers
        if not layers or layers[0] != 0 or list(layers) != sorted(set(layers)) or layers[-1] >= self.num_layers:
            raise ValueError(f"vace_layers {list(layers)} must start at block 0, rise, and stay below the "
                             f"{self.num_layers} blocks")


def evenly_spaced_vace_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """The hinted blocks of a checkpoint that does not list them: every ceil(num_layers / count)-th block from 0, as
    both published sizes place them (1.3B: 15 of 30 blocks, every 2nd; 14B: 8 of 40, every 5th)."""
    step = -(-num_layers // max(count, 1))
    layers = tuple(range(0, num_layers, step))
    if count < 1 or len(layers) != count:
        raise ValueError(f"{count} context blocks do not spread evenly over {num_layers} blocks; give a config.json "
                         "with vace_layers")
    return layers


# Published sizes (Wan2.1 wan/configs t2v_1_3B / t2v_14B with the VACE layers of wan/modules/vace_model.py, and
# the Wan2.2 VACE-Fun A14B experts: the T2V-A14B backbone with the 14B context blocks).
WAN21_VACE_1_3B = WanVACEConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                vace_layers=tuple(range(0, 30, 2)))
WAN21_VACE_14B = WanVACEConfig()
WAN22_VACE_FUN_A14B = WanVACEConfig()


class VACEBlock(WanBlock):
    """A Wan block of the context branch, with its input projection (block 0 only) and its hint projection."""

    def __init__(self, config: WanTransformerConfig, first: bool):
        super().__init__(config)
        if first:
            self.before_proj = nn.Linear(config.dim, config.dim)
        self.after_proj = nn.Linear(config.dim, config.dim)
        self.compute_dtype = mx.float32

    def hint(self, stream: mx.array) -> mx.array:
        return self.after_proj(stream.astype(self.compute_dtype)).astype(mx.float32)

    def enter(self, control: mx.array, patched: mx.array) -> mx.array:
        """Block 0's input: the projected conditioning tokens plus the patched latents."""
        return self.before_proj(control.astype(self.compute_dtype)).astype(mx.float32) + patched


class WanVACETransformer(WanTransformer):
    """`WanTransformer` plus the context branch. Set the conditioning with `set_control` before calling it."""

    def __init__(self, config: WanVACEConfig, dtype: mx.Dtype = mx.float32):
        super().__init__(config, dtype)
        patch_volume = math.prod(config.patch_size)
        self.vace_patch_embedding = nn.Linear(patch_volume * config.vace_in_channels, config.dim)
        self.vace_blocks = [VACEBlock(config, j == 0) for j in range(len(config.vace_layers))]
        self.set_compute_dtype(dtype)
        self._control = None
        self._control_scales = None

    def set_control(self, control: mx.array | None, scales=None) -> None:
        """The conditioning latents (1, T, H, W, vace_in_channels) channels-last, and one scale per context block
        (a number for all of them). The whole branch depends only on them, the latents, the time and the text."""
        if control is not None and control.shape[-1] != self.config.vace_in_channels:
            raise ValueError(f"expected {self.config.vace_in_channels} conditioning channels, got {control.shape[-1]}")
        count = len(self.vace_blocks)
        scales = [1.0] * count if scales is None else scales
        scales = [float(scales)] * count if isinstance(scales, (int, float)) else [float(v) for v in scales]
        if len(scales) != count:
            raise ValueError(f"{len(scales)} control scales for {count} context blocks")
        self._control, self._control_scales = control, scales

    def embed(self, x: mx.array, timestep: mx.array, context) -> WanState:
        """The main stream's state, with the context branch run on it: `state.hints` maps a block to its hint."""
        if self._control is None:
            raise ValueError("a VACE transformer needs its conditioning: call set_control first")
        if self.sequence_split is not None:
            raise ValueError("the VACE context branch does not run sequence-parallel")
        state = super().embed(x, timestep, context)
        if state.hidden.shape[1] != 1:
            raise ValueError("the VACE transformer takes one timestep per sample")
        patched = state.hidden
        stream = self.vace_blocks[0].enter(self.control_tokens(x.shape), patched)
        kv = state.cross_kv
        hints = {}
        offset = len(self.blocks)
        for j, (block, layer) in enumerate(zip(self.vace_blocks, self.config.vace_layers)):
            stream = block(stream, state.block_time, state.context, state.rope,
                           None if kv is None else kv[offset + j])
            hints[layer] = block.hint(stream) * self._control_scales[j]
        state.hints = hints
        return state

    def control_tokens(self, latent_shape: tuple[int, ...]) -> mx.array:
        """The conditioning patchified and embedded, (B, 1, N, dim), zero tokens after it where it is shorter."""
        batch, frames, height, width, _ = latent_shape
        control = self._control
        pt, ph, pw = self.config.patch_size
        cf, ch, cw = control.shape[1] // pt, control.shape[2] // ph, control.shape[3] // pw
        if (ch, cw) != (height // ph, width // pw) or cf > frames // pt:
            raise ValueError(f"conditioning of shape {control.shape[1:4]} does not fit latents {(frames, height, width)}")
        patches = control.reshape(control.shape[0], cf, pt, ch, ph, cw, pw, control.shape[-1])
        patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(control.shape[0], cf * ch * cw, -1)
        tokens = self.vace_patch_embedding(patches.astype(self.compute_dtype)).astype(mx.float32)
        missing = (frames // pt) * ch * cw - tokens.shape[1]
        if missing:
            tokens = mx.concatenate([tokens, mx.zeros((tokens.shape[0], missing, tokens.shape[2]))], axis=1)
        tokens = mx.broadcast_to(tokens, (batch, *tokens.shape[1:])) if tokens.shape[0] != batch else tokens
        return tokens[:, None]

    def run_blocks(self, state: WanState, start: int = 0, stop: int | None = None) -> WanState:
        """Blocks start..stop-1 with each hinted block's hint added after it."""
        kv = state.cross_kv
        hints = getattr(state, "hints", {})
        for i, block in enumerate(self.blocks[start:stop], start):
            state.hidden = block(state.hidden, state.block_time, state.context, state.rope,
                                 None if kv is None else kv[i])
            if i in hints:
                state.hidden = state.hidden + hints[i]
        return state

    def prepare_context(self, context: mx.array) -> PreparedContext:
        """As `WanTransformer.prepare_context`, with the context blocks' keys and values after the main blocks'."""
        prepared = PreparedContext.of(self, context)
        bias = prepared.kv[0].bias if prepared.kv else None
        extra = [TextKV(*block.cross_attn.project_kv(prepared.text), bias) for block in self.vace_blocks]
        mx.eval(extra)
        return PreparedContext(prepared.text, prepared.kv + extra)

    def attention_sites(self) -> list:
        return [block.self_attn for block in self.blocks] + [block.self_attn for block in self.vace_blocks]

    def set_sequence_split(self, split) -> None:
        if split is not None and split.seq_ranks > 1:
            raise ValueError("the VACE context branch does not run sequence-parallel")
        super().set_sequence_split(split)
