"""Tiny random Wan 2.2 reference pipelines, built offline with diffusers and transformers, for parity tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SENTENCES = [
    "a cat walks on the grass in the morning light",
    "a corgi surfs a wave at sunset, cinematic",
    "slow motion of rain falling on a quiet street",
    "the camera pans over snowy mountains and a frozen lake",
    "two people dance in a kitchen, warm colours",
]


def train_spiece(path: Path, vocab_size: int = 64) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=vocab_size,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, model_type="unigram",
    )
    path.write_bytes(buf.getvalue())
    return path


def randomize_(module, seed: int, scale: float = 0.2) -> None:
    """Replace every parameter with random values, so that no term of the reference is a no-op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name and "weight" in name):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(noise * (scale if p.ndim == 1 else 1.0 / np.sqrt(fan_in)))


def tiny_transformer_config(in_channels: int = 4, out_channels: int = 4, text_dim: int = 32, heads: int = 2,
                            head_dim: int = 12, **extra) -> dict:
    return dict(**extra,
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=out_channels, text_dim=text_dim, freq_dim=16, ffn_dim=40, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def build_tiny_wan_pipeline(
    folder: Path, two_experts: bool = True, shift: float = 12.0, seed: int = 0, wan22_vae: bool = False,
    image_to_video: bool = False, image_encoder=None, image_processor=None, **transformer_overrides,
):
    """Save a tiny random `diffusers.WanPipeline` at `folder` (the real diffusers layout) and return it.

    `two_experts=True` gives an A14B-style pipeline (transformer_2, boundary_ratio 0.875) with a Wan 2.1-style
    VAE; `two_experts=False, wan22_vae=True` a TI2V-5B-style one (expand_timesteps, a Wan 2.2-style VAE with
    2x2 patchify and 16x spatial compression). `image_to_video=True` builds a `WanImageToVideoPipeline` instead:
    with two experts I2V-A14B-style (noise, mask and image latent channels in; boundary 0.9), with one the
    TI2V-5B image mode; with an `image_encoder` (a transformers CLIPVisionModel, and its `image_processor`) and one
    expert, Wan 2.1 I2V / FLF2V-style (pass the transformer's image_dim and added_kv_proj_dim as overrides).
    """
    import torch
    from diffusers import (
        AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel,
    )
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    (folder / "spiece").mkdir(parents=True, exist_ok=True)
    spiece = train_spiece(folder / "spiece" / "spiece.model")
    # transformers 5: T5Tokenizer(vocab_file=...) silently builds a 4-token vocabulary; from_pretrained reads it.
    tokenizer = T5Tokenizer.from_pretrained(str(folder / "spiece"), extra_ids=0)
    assert 8 < tokenizer.vocab_size <= 64

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    randomize_(text_encoder, seed + 1, scale=0.5)
    rng = np.random.default_rng(seed)
    if wan22_vae:
        z = 6
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=12, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
            patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
            latents_mean=rng.normal(0, 0.5, z).tolist(), latents_std=rng.uniform(0.5, 2.0, z).tolist(),
        ).eval()
    else:
        z = 4
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            latents_mean=rng.normal(0, 0.5, z).tolist(), latents_std=rng.uniform(0.5, 2.0, z).tolist(),
        ).eval()
    channel_condition = image_to_video and (two_experts or image_encoder is not None)
    in_channels = 2 * z + 4 if channel_condition else z
    transformer = WanTransformer3DModel(**tiny_transformer_config(in_channels, z, **transformer_overrides)).eval()
    randomize_(transformer, seed + 2)
    transformer_2 = None
    if two_experts:
        transformer_2 = WanTransformer3DModel(**tiny_transformer_config(in_channels, z, **transformer_overrides)).eval()
        randomize_(transformer_2, seed + 3)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if image_to_video:
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, image_processor=image_processor,
            image_encoder=image_encoder, transformer=transformer, transformer_2=transformer_2,
            boundary_ratio=0.9 if two_experts else None, expand_timesteps=not channel_condition,
        )
    else:
        pipe = WanPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
            transformer_2=transformer_2, boundary_ratio=0.875 if two_experts else None,
            expand_timesteps=not two_experts,
        )
    pipe.save_pretrained(folder)
    # Real hub repos ship spiece.model beside tokenizer.json; transformers 5 saves only the latter.
    spiece.rename(folder / "tokenizer" / "spiece.model")
    (folder / "spiece").rmdir()
    return pipe


# diffusers -> official Wan (Wan-Video/Wan2.1 wan/modules/model.py) names of a transformer with the CLIP image
# context (I2V-14B, FLF2V-14B; Wan2.2-Animate's backbone): (pattern, replacement) for re.sub, in order
WAN_IMAGE_OFFICIAL_RENAMES = [
    (r"condition_embedder\.time_embedder\.linear_([12])", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.text_embedder\.linear_([12])", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.time_proj", lambda m: "time_projection.1"),
    (r"condition_embedder\.image_embedder\.norm1", lambda m: "img_emb.proj.0"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", lambda m: "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", lambda m: "img_emb.proj.3"),
    (r"condition_embedder\.image_embedder\.norm2", lambda m: "img_emb.proj.4"),
    (r"condition_embedder\.image_embedder\.pos_embed", lambda m: "img_emb.emb_pos"),
    (r"attn1\.to_([qkv])", lambda m: f"self_attn.{m[1]}"), (r"attn1\.to_out\.0", lambda m: "self_attn.o"),
    (r"attn1\.norm_([qk])", lambda m: f"self_attn.norm_{m[1]}"),
    (r"attn2\.to_([qkv])", lambda m: f"cross_attn.{m[1]}"), (r"attn2\.to_out\.0", lambda m: "cross_attn.o"),
    (r"attn2\.norm_([qk])", lambda m: f"cross_attn.norm_{m[1]}"),
    (r"attn2\.add_([kv])_proj", lambda m: f"cross_attn.{m[1]}_img"),
    (r"attn2\.norm_added_k", lambda m: "cross_attn.norm_k_img"),
    (r"blocks\.(\d+)\.norm2", lambda m: f"blocks.{m[1]}.norm3"),
    (r"ffn\.net\.0\.proj", lambda m: "ffn.0"), (r"ffn\.net\.2", lambda m: "ffn.2"),
    (r"^proj_out", lambda m: "head.head"), (r"^scale_shift_table", lambda m: "head.modulation"),
    (r"blocks\.(\d+)\.scale_shift_table", lambda m: f"blocks.{m[1]}.modulation"),
]


def renamed_keys(state_dict: dict, renames) -> dict:
    """`state_dict` with every (pattern, replacement) of `renames` applied to each key in turn (re.sub)."""
    import re

    out = {}
    for key, value in state_dict.items():
        for pattern, target in renames:
            key = re.sub(pattern, target, key)
        out[key] = value
    return out


def decode_like_diffusers(pipe, latents):
    """(frames, H, W, 3) in [0, 1]: a Wan pipeline's own output_type="np" decoding of its latent output."""
    import torch

    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]


def use_official_sigmas(pipe) -> None:
    """Make the reference scheduler use the official Wan grid linspace(0.999, 0, n+1)[:-1] (before the shift)."""
    scheduler = pipe.scheduler
    original = getattr(scheduler, "_unpatched_set_timesteps", scheduler.set_timesteps)
    scheduler._unpatched_set_timesteps = original

    def set_timesteps(num_inference_steps=None, device=None, sigmas=None, **kw):
        grid = np.linspace(1 - 1 / scheduler.config.num_train_timesteps, 0, num_inference_steps + 1)[:-1]
        return original(device=device, sigmas=grid, **kw)

    scheduler.set_timesteps = set_timesteps


def build_tiny_vace_pipeline(folder: Path, two_experts: bool = False, shift: float = 16.0, seed: int = 0,
                             vace_layers=(0, 2), num_layers: int = 3, **transformer_overrides):
    """Save a tiny random `diffusers.WanVACEPipeline` at `folder` (the real diffusers layout) and return it:
    the tiny Wan 2.1-style VAE and text encoder of `build_tiny_wan_pipeline`, `WanVACETransformer3DModel`s
    with context blocks at `vace_layers` and 2 x z + 64 conditioning channels; `two_experts=True` gives a
    Wan2.2 VACE-Fun-style pair with boundary_ratio 0.875."""
    import shutil

    import torch
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    base = build_tiny_wan_pipeline(folder.parent / (folder.name + "-base"), two_experts=False, shift=shift, seed=seed)
    z = base.vae.config.z_dim
    config = dict(tiny_transformer_config(z, z, **transformer_overrides), num_layers=num_layers,
                  vace_layers=list(vace_layers), vace_in_channels=2 * z + 64)
    torch.manual_seed(seed)
    transformers = []
    for k in range(2 if two_experts else 1):
        model = WanVACETransformer3DModel(**config).eval()
        randomize_(model, seed + 5 + k)
        transformers.append(model)
    pipe = WanVACEPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=transformers[0], transformer_2=transformers[1] if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
    )
    pipe.save_pretrained(folder)
    shutil.copy(folder.parent / (folder.name + "-base") / "tokenizer" / "spiece.model", folder / "tokenizer")
    return pipe
