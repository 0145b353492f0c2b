"""A tiny random Mochi 1 reference pipeline, built offline with diffusers, transformers and sentencepiece.

The T5 tokenizer is a SentencePiece unigram model trained in a second on a few sentences (as tests/support/wan.py
does). 12 latent channels and the 6x8x8 VAE strides are kept: diffusers' MochiPipeline hard-codes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from support.wan import train_spiece

# transformer: 3 heads of 20, text stream 36 wide, 2 blocks, T5 width 48
TRANSFORMER = dict(num_attention_heads=3, attention_head_dim=20, pooled_projection_dim=36, num_layers=2,
                   in_channels=12, text_embed_dim=48, time_embed_dim=32)
T5 = dict(vocab_size=64, d_model=48, d_kv=12, num_heads=4, d_ff=56, num_layers=2, relative_attention_num_buckets=32,
          relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          is_encoder_decoder=False)
VAE = dict(encoder_block_out_channels=(32, 64, 64, 96), decoder_block_out_channels=(32, 32, 64, 64),
           latent_channels=12, layers_per_block=(1, 1, 2, 1, 1), scaling_factor=1.25)


def randomize_(module, seed: int) -> None:
    """Random weights everywhere (norm gains around 1, small biases), so that no term is a no-op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name or "layer_norm" in name) and name.endswith("weight") and "linear" not in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name == "pos_frequencies":
                p.copy_(0.5 * noise)
            elif "relative_attention_bias" in name or "shared" in name or "embed_tokens" in name:
                p.copy_(noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(max(p[0].numel(), 1)))


def build_tiny_mochi_pipeline(folder: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = False,
                              transformer_dims: dict | None = None):
    """Save a tiny random `diffusers.MochiPipeline` at `folder` (save_pretrained) and return it.
    `transformer_dims` overrides TRANSFORMER's entries (e.g. widths that --group-size divides, for quantized
    conversions; text_embed_dim is also the T5 width)."""
    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    (folder / "spiece").mkdir(parents=True, exist_ok=True)
    spiece = train_spiece(folder / "spiece" / "spiece.model")
    tokenizer = T5Tokenizer.from_pretrained(str(folder / "spiece"), extra_ids=0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dims = {**TRANSFORMER, **(transformer_dims or {})}
    text_encoder = T5EncoderModel(T5Config(**{**T5, "d_model": dims["text_embed_dim"]})).eval()
    transformer = MochiTransformer3DModel(**dims).eval()
    vae = AutoencoderKLMochi(**VAE, latents_mean=tuple(rng.normal(0, 0.3, 12).tolist()),
                             latents_std=tuple(rng.uniform(0.6, 1.5, 12).tolist())).eval()
    for i, module in enumerate((text_encoder, transformer, vae)):
        randomize_(module, seed + 1 + i)
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.save_pretrained(folder)
    if not (folder / "tokenizer" / "spiece.model").is_file():  # hub repos ship it beside tokenizer.json
        spiece.rename(folder / "tokenizer" / "spiece.model")
    else:
        spiece.unlink()
    (folder / "spiece").rmdir()
    return pipe
