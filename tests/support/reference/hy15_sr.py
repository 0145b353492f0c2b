"""A torch transcription of HunyuanVideo 1.5's super-resolution pieces, for tests/test_hunyuan15_sr.py in CI (the
official repository is not on PyPI and is not vendored). Transcribed from Tencent-Hunyuan/HunyuanVideo-1.5 at
commit 60783e7 (the tencent release's code):

- `hyvideo/models/transformers/modules/upsample.py`: SRResidualCausalBlock3D, SRTo720pUpsampler,
  SRTo1080pUpsampler;
- `hyvideo/models/autoencoders/hunyuanvideo_15_vae.py`: CausalConv3d (replicate padding, causal in time),
  RMS_norm, ResnetBlock, which the 1080p upsampler uses;
- `hyvideo/pipelines/hunyuan_video_sr_pipeline.py` (`__call__`, `add_noise_to_lq`, `_prepare_lq_cond_latents`)
  and `hunyuan_video_pipeline.py` (`_prepare_cond_latents`, T2V): the SR step's conditioning.

Module and parameter names are the official ones, so a state dict of these modules is a checkpoint in the
official layout. `test_transcription_matches_official` (when HUNYUANVIDEO15_REPO points at a checkout) checks these
against the official classes and pipeline code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv3d(nn.Module):
    def __init__(self, chan_in, chan_out, kernel_size=3):
        super().__init__()
        self.time_causal_padding = (kernel_size // 2,) * 4 + (kernel_size - 1, 0)  # W, H, T
        self.conv = nn.Conv3d(chan_in, chan_out, kernel_size)

    def forward(self, x):
        return self.conv(F.pad(x, self.time_causal_padding, mode="replicate"))


class RMS_norm(nn.Module):  # noqa: N801 (the official name)
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = RMS_norm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = RMS_norm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class SRResidualCausalBlock3D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(CausalConv3d(channels, channels), nn.SiLU(), CausalConv3d(channels, channels),
                                   nn.SiLU(), CausalConv3d(channels, channels))

    def forward(self, x):
        return x + self.block(x)


class SRTo720pUpsampler(nn.Module):
    def __init__(self, in_channels, out_channels, hidden_channels=None, num_blocks=6, global_residual=False):
        super().__init__()
        hidden_channels = 64 if hidden_channels is None else hidden_channels
        self.in_conv = CausalConv3d(in_channels, hidden_channels)
        self.blocks = nn.ModuleList([SRResidualCausalBlock3D(hidden_channels) for _ in range(num_blocks)])
        self.out_conv = CausalConv3d(hidden_channels, out_channels)
        self.global_residual = bool(global_residual)

    def forward(self, x):
        y = self.in_conv(x)
        for blk in self.blocks:
            y = blk(y)
        y = self.out_conv(y)
        return y + x if self.global_residual and y.shape == x.shape else y


class SRTo1080pUpsampler(nn.Module):
    def __init__(self, z_channels, out_channels, block_out_channels, num_res_blocks=2):
        super().__init__()
        self.num_res_blocks, self.block_out_channels, self.z_channels = num_res_blocks, block_out_channels, z_channels
        block_in = block_out_channels[0]
        self.conv_in = CausalConv3d(z_channels, block_in)
        self.up = nn.ModuleList()
        for ch in block_out_channels:
            block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, ch))
                block_in = ch
            up = nn.Module()
            up.block = block
            self.up.append(up)
        self.norm_out = RMS_norm(block_in)
        self.conv_out = CausalConv3d(block_in, out_channels)

    def forward(self, z):
        repeats = self.block_out_channels[0] // self.z_channels
        h = self.conv_in(z) + z.repeat_interleave(repeats=repeats, dim=1)
        for level in self.up:
            for blk in level.block:
                h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def sr_condition(upsampler, lq_latents, noise, target_hw, strength=0.7):
    """The SR pipeline's T2V conditioning from (B, C, T, h, w) latents: (condition, zero_lq_condition), both
    (B, 2C + 2, T, H, W). `noise` is what `add_noise_to_lq` draws (torch.randn_like)."""
    bsz = lq_latents.shape[0]
    lq = lq_latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (b f) c h w
    lq = F.interpolate(lq, size=target_hw, mode="bilinear", align_corners=False)
    lq = lq.unflatten(0, (bsz, -1)).permute(0, 2, 1, 3, 4)
    lq = upsampler(lq.float())
    t = torch.tensor([1000.0]) * strength
    lq = (1 - t / 1000.0) * lq + (t / 1000.0) * noise
    b, c, f, h, w = lq.shape
    cond_latents = torch.cat([torch.zeros(b, c, f, h, w), torch.zeros(b, 1, f, h, w)], dim=1)  # T2V
    condition = torch.cat([cond_latents, torch.cat([lq, torch.ones(b, 1, f, h, w)], dim=1)], dim=1)
    zero_lq = condition.clone()
    zero_lq[:, c + 1: 2 * c + 1] = torch.zeros_like(lq)
    zero_lq[:, 2 * c + 1] = 0
    return condition, zero_lq
