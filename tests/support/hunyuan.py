"""A tiny random HunyuanVideo reference pipeline, built offline with diffusers, transformers and tokenizers.

The Llama tokenizer is a byte-level BPE with Llama 3's pre-tokenizer (its split pattern, then byte-level
without its own regex) trained on the prompt template and a few sentences: it splits the template as Llama 3
does, into the published 95 tokens before the prompt, so both pipelines use the real crop.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

SENTENCES = [
    "a cat walks on the grass in the morning light, realistic style",
    "a corgi surfs a wave at sunset, cinematic",
    "static, blurry, low quality, jittery camera",
    "the camera pans over snowy mountains and a frozen lake",
]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's pre-tokenization pattern (as its tokenizer.json publishes it).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def llama_tokenizer(texts=(), vocab_size: int = 600, specials=()):
    """Byte-level BPE with Llama 3's pre-tokenization and specials, trained on the T2V template, SENTENCES and
    `texts`; `specials` are added after training (e.g. LLaVA's <image>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mlx_video.text_encoders.llama import VIDEO_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([VIDEO_TEMPLATE, *texts, *SENTENCES] * 5, trainer)
    if specials:
        tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>", padding_side="right")


def tiny_clip_text(tokenizer):
    """transformers' CLIPTextModel, 3 layers of 3 heads of 12, quick_gelu, on `clip_tokenizer()`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=36, intermediate_size=60, num_hidden_layers=3, num_attention_heads=3,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=eos, pad_token_id=eos,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
    )).eval()


def clip_tokenizer():
    """Byte-level BPE with CLIP's specials; <|endoftext|> gets the largest id, as in CLIP's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 5, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("<|startoftext|>", "<|endoftext|>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def randomize_(module, seed: int) -> None:
    """Random weights everywhere (norm gains around 1, small biases), so that no term is a no-op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name and not name.endswith(("linear.weight", "linear.bias"))
            if is_norm:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "embed_tokens" in name or "token_embedding" in name or "position_embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def build_tiny_hunyuan_pipeline(folder: Path, seed: int = 0, transformer_dims: dict | None = None,
                                llama_dims: dict | None = None):
    """Save a tiny random `diffusers.HunyuanVideoPipeline` at `folder` (save_pretrained) and return it.
    `transformer_dims` / `llama_dims` override the constructor arguments below (e.g. widths that --group-size
    divides, for quantized conversions; the Llama's hidden_size is the transformer's text_embed_dim).

    Transformer: 2 heads of 24 (RoPE 4/10/10), 2 double + 2 single blocks, 1 refiner block, 6 latent channels;
    Llama: 5 layers, 40 wide, 4 heads of 10 (2 KV heads); CLIP: 3 layers, 36 wide; VAE: 4 levels (8/16/24/24)."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = llama_tokenizer(), clip_tokenizer()
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(**{**dict(
        vocab_size=len(tokenizer), hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
    ), **(llama_dims or {})})).eval()
    clip = tiny_clip_text(tokenizer_2)
    transformer = HunyuanVideoTransformer3DModel(**{**dict(
        in_channels=6, out_channels=6, num_attention_heads=2, attention_head_dim=24, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=3.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=40, pooled_projection_dim=36, rope_theta=256.0, rope_axes_dim=(4, 10, 10),
    ), **(transformer_dims or {})}).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=6, block_out_channels=(8, 16, 24, 24), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    for i, module in enumerate((llama, clip, transformer, vae)):
        randomize_(module, seed + 1 + i)
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(folder)
    return pipe


# ---- HunyuanVideo: a diffusers state dict in the official layout ----
_TO_OFFICIAL = [  # diffusers -> official (huggingface/diffusers scripts/convert_hunyuan_video_to_diffusers.py, inverted), whole-key regex substitutions
    (r"^x_embedder\.", "img_in."),
    (r"^time_text_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
    (r"^time_text_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
    (r"^time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.mlp.0."),
    (r"^time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.mlp.2."),
    (r"^time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
    (r"^time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
    (r"^context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_(\d)\.",
     lambda m: f"txt_in.t_embedder.mlp.{2 * int(m[1]) - 2}."),
    (r"^context_embedder\.time_text_embed\.text_embedder\.", "txt_in.c_embedder."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.", "txt_in.individual_token_refiner.blocks."),
    (r"(individual_token_refiner\.blocks\.\d+)\.attn\.to_out\.0\.", r"\1.self_attn_proj."),
    (r"(individual_token_refiner\.blocks\.\d+)\.ff\.net\.0\.proj\.", r"\1.mlp.fc1."),
    (r"(individual_token_refiner\.blocks\.\d+)\.ff\.net\.2\.", r"\1.mlp.fc2."),
    (r"(individual_token_refiner\.blocks\.\d+)\.norm_out\.linear\.", r"\1.adaLN_modulation.1."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_(q|k)\.", r"double_blocks.\1.img_attn_\2_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_(q|k)\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (r"^single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_(q|k)\.", r"single_blocks.\1.\2_norm."),
    (r"^single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.linear."),
    (r"^proj_out\.", "final_layer.linear."),
]

# Fused in the official layout: (diffusers pieces in order, official key), per block kind.
_FUSED = [
    (r"^(context_embedder\.token_refiner\.refiner_blocks)\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$",
     "txt_in.individual_token_refiner.blocks.{n}.self_attn_qkv.{wb}", "qkv"),
    (r"^(transformer_blocks)\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$", "double_blocks.{n}.img_attn_qkv.{wb}", "qkv"),
    (r"^(transformer_blocks)\.(\d+)\.attn\.add_([qkv])_proj\.(weight|bias)$",
     "double_blocks.{n}.txt_attn_qkv.{wb}", "qkv"),
    (r"^(single_transformer_blocks)\.(\d+)\.(?:attn\.to_([qkv])|proj_(mlp))\.(weight|bias)$",
     "single_blocks.{n}.linear1.{wb}", "qkvm"),
]


def official_state(diffusers_state: dict) -> dict:
    """The official checkpoint's keys and tensors, built from a diffusers state dict (the inverse of that script's renaming)."""
    import torch

    out, pieces = {}, {}
    for key, value in diffusers_state.items():
        for pattern, target, order in _FUSED:
            m = re.match(pattern, key)
            if m:
                groups = [g for g in m.groups() if g is not None]
                n, part, wb = groups[1], groups[2], groups[3]
                pieces.setdefault(target.format(n=n, wb=wb), {})[order.index(part[0])] = value
                break
        else:
            if key.startswith("norm_out.linear."):  # diffusers (scale, shift) -> official (shift, scale)
                scale, shift = value.chunk(2, dim=0)
                out[key.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = torch.cat([shift, scale])
                continue
            for pattern, replacement in _TO_OFFICIAL:
                key = re.sub(pattern, replacement, key)
            out[key] = value
    for key, parts in pieces.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out




# ---- HunyuanVideo: published configs ----
PUBLISHED_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
    num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
    text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)

LLAMA_8B = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=8192)

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def official_vae_config(vae_config) -> dict:
    """vae/config.json as the release ships it (the official AutoencoderKLCausal3D's field names)."""
    levels = len(vae_config.block_out_channels)
    return {
        "_class_name": "AutoencoderKLCausal3D", "_diffusers_version": "0.4.2", "act_fn": "silu",
        "block_out_channels": list(vae_config.block_out_channels), "down_block_types": ["DownEncoderBlockCausal3D"] * levels,
        "in_channels": 3, "latent_channels": vae_config.latent_channels, "layers_per_block": vae_config.layers_per_block,
        "norm_num_groups": vae_config.norm_num_groups, "out_channels": 3, "sample_size": 256, "sample_tsize": 64,
        "up_block_types": ["UpDecoderBlockCausal3D"] * levels, "scaling_factor": vae_config.scaling_factor,
        "time_compression_ratio": 4, "mid_block_add_attention": True,
    }


def official_sigmas(steps: int) -> np.ndarray:
    """HunyuanVideo's grid before the shift: torch.linspace(1, 0, steps + 1)[:-1] in float32."""
    import torch

    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1].numpy()
