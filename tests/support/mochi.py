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


# ---- Mochi: a diffusers transformer state dict in the official layout ----
def official_state_dict(diffusers_sd: dict, num_layers: int) -> dict:
    """Rename a diffusers state dict to the genmo dit.safetensors names (the inverse of diffusers' converter)."""
    import torch

    out = {}
    simple = {
        "patch_embed.proj": "x_embedder.proj",
        "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_embed.pooler.to_kv": "t5_y_embedder.to_kv",
        "time_embed.pooler.to_q": "t5_y_embedder.to_q",
        "time_embed.pooler.to_out": "t5_y_embedder.to_out",
        "time_embed.caption_proj": "t5_yproj",
        "proj_out": "final_layer.linear",
    }
    for k, v in diffusers_sd.items():
        head, _, leaf = k.rpartition(".")
        if head in simple:
            out[f"{simple[head]}.{leaf}"] = v
    out["pos_frequencies"] = diffusers_sd["pos_frequencies"]
    for leaf in ("weight", "bias"):
        scale, shift = diffusers_sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.mod.{leaf}"] = torch.cat([shift, scale])
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        last = i == num_layers - 1
        for leaf in ("weight", "bias"):
            out[o + f"mod_x.{leaf}"] = diffusers_sd[d + f"norm1.linear.{leaf}"]
            out[o + f"mod_y.{leaf}"] = diffusers_sd[d + ("norm1_context.linear_1." if last else "norm1_context.linear.") + leaf]
            out[o + f"attn.proj_x.{leaf}"] = diffusers_sd[d + f"attn1.to_out.0.{leaf}"]
            if not last:
                out[o + f"attn.proj_y.{leaf}"] = diffusers_sd[d + f"attn1.to_add_out.{leaf}"]
        out[o + "attn.qkv_x.weight"] = torch.cat([diffusers_sd[d + f"attn1.to_{c}.weight"] for c in "qkv"])
        out[o + "attn.qkv_y.weight"] = torch.cat([diffusers_sd[d + f"attn1.add_{c}_proj.weight"] for c in "qkv"])
        for c in "qk":
            out[o + f"attn.{c}_norm_x.weight"] = diffusers_sd[d + f"attn1.norm_{c}.weight"]
            out[o + f"attn.{c}_norm_y.weight"] = diffusers_sd[d + f"attn1.norm_added_{c}.weight"]
        streams = [("x", "ff")] + ([] if last else [("y", "ff_context")])
        for s, ff in streams:
            proj, gate = diffusers_sd[d + f"{ff}.net.0.proj.weight"].chunk(2)
            out[o + f"mlp_{s}.w1.weight"] = torch.cat([gate, proj])
            out[o + f"mlp_{s}.w2.weight"] = diffusers_sd[d + f"{ff}.net.2.weight"]
    return out


# ---- Mochi: a diffusers VAE state dict as the official encoder and decoder ----
_STACK = {"norm1.norm_layer": "0", "conv1.conv": "2", "norm2.norm_layer": "3", "conv2.conv": "5"}


def official_vae_state_dicts(sd: dict, layers=(3, 3, 4, 6, 3)) -> tuple[dict, dict]:
    """(decoder.safetensors, encoder.safetensors) names for a diffusers VAE state dict (genmo's module layout)."""
    return _official_decoder(sd, layers), _official_encoder(sd, layers)


def _copy_resnet(sd: dict, dst: dict, src_prefix: str, dst_prefix: str) -> None:
    for name, idx in _STACK.items():
        for leaf in ("weight", "bias"):
            dst[f"{dst_prefix}.stack.{idx}.{leaf}"] = sd[f"{src_prefix}.{name}.{leaf}"]


def _copy_attention(sd: dict, dst: dict, src_prefix: str, i: int, dst_prefix: str) -> None:
    import torch

    dst[f"{dst_prefix}.attn_block.attn.qkv.weight"] = torch.cat([sd[f"{src_prefix}.attentions.{i}.to_{c}.weight"]
                                                                 for c in "qkv"])
    for leaf in ("weight", "bias"):
        dst[f"{dst_prefix}.attn_block.attn.out.{leaf}"] = sd[f"{src_prefix}.attentions.{i}.to_out.0.{leaf}"]
        dst[f"{dst_prefix}.attn_block.norm.{leaf}"] = sd[f"{src_prefix}.norms.{i}.norm_layer.{leaf}"]


def _official_decoder(sd: dict, layers) -> dict:
    dec = {}
    for leaf in ("weight", "bias"):
        dec[f"blocks.0.0.{leaf}"] = sd[f"decoder.conv_in.{leaf}"]
        dec[f"output_proj.{leaf}"] = sd[f"decoder.proj_out.{leaf}"]
    for i in range(layers[-1]):
        _copy_resnet(sd, dec, f"decoder.block_in.resnets.{i}", f"blocks.0.{i + 1}")
    for b, count in enumerate([layers[3], layers[2], layers[1]]):
        for i in range(count):
            _copy_resnet(sd, dec, f"decoder.up_blocks.{b}.resnets.{i}", f"blocks.{b + 1}.blocks.{i}")
        for leaf in ("weight", "bias"):
            dec[f"blocks.{b + 1}.proj.{leaf}"] = sd[f"decoder.up_blocks.{b}.proj.{leaf}"]
    for i in range(layers[0]):
        _copy_resnet(sd, dec, f"decoder.block_out.resnets.{i}", f"blocks.4.{i}")
    return dec


def _official_encoder(sd: dict, layers) -> dict:
    enc = {}
    for leaf in ("weight", "bias"):
        enc[f"layers.0.{leaf}"] = sd[f"encoder.proj_in.{leaf}"]
        enc[f"output_norm.{leaf}"] = sd[f"encoder.norm_out.norm_layer.{leaf}"]
    enc["output_proj.weight"] = sd["encoder.proj_out.weight"]
    for i in range(layers[0]):
        _copy_resnet(sd, enc, f"encoder.block_in.resnets.{i}", f"layers.{i + 1}")
    for b, count in enumerate(layers[1:4]):
        for leaf in ("weight", "bias"):
            enc[f"layers.{b + 4}.layers.0.{leaf}"] = sd[f"encoder.down_blocks.{b}.conv_in.conv.{leaf}"]
        for i in range(count):
            _copy_resnet(sd, enc, f"encoder.down_blocks.{b}.resnets.{i}", f"layers.{b + 4}.layers.{i + 1}")
            _copy_attention(sd, enc, f"encoder.down_blocks.{b}", i, f"layers.{b + 4}.layers.{i + 1}")
    for i in range(layers[4]):
        _copy_resnet(sd, enc, f"encoder.block_out.resnets.{i}", f"layers.{i + 7}")
        _copy_attention(sd, enc, "encoder.block_out", i, f"layers.{i + 7}")
    return enc




# ---- Mochi: published configs ----
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
