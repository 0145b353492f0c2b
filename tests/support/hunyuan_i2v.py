"""A tiny random HunyuanVideo-I2V reference pipeline (diffusers `HunyuanVideoImageToVideoPipeline`), built offline.

The LLaVA tokenizer is support.hunyuan's byte-level BPE with Llama 3's pre-tokenizer, trained on both prompt
templates, with `<image>` added as a special token: it splits the image template as LLaVA-Llama-3 does (the
`<image>` token 6th, 103 tokens before the prompt), so the reference's fixed positions hold. The vision tower
sees 48x48 images in 2x2 patches: 576 image tokens, the published count the reference's template assumes.
"""

from __future__ import annotations

from pathlib import Path

from support.hunyuan import clip_tokenizer, llama_tokenizer, randomize_, tiny_clip_text

IMAGE_TOKEN = "<image>"


def llava_tokenizer():
    from mlx_video.text_encoders.llava import I2V_TEMPLATE

    return llama_tokenizer(texts=[I2V_TEMPLATE.replace(IMAGE_TOKEN, "")], vocab_size=700, specials=[IMAGE_TOKEN])


def tiny_llava(tokenizer, seed: int):
    """LlavaForConditionalGeneration: a CLIP tower of 3 layers, 32 wide (4 heads of 8), 48x48 images in 2x2
    patches (576 tokens), quick_gelu; a 5-layer Llama 40 wide (4 heads of 10, 2 KV heads); the published
    vision_feature_layer -2, "default" selection and GELU projector."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                              image_size=48, patch_size=2, hidden_act="quick_gelu", projection_dim=32)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, resample=3,
                              do_center_crop=True, do_normalize=True, do_rescale=True, do_convert_rgb=True)


def build_tiny_hunyuan_i2v_pipeline(folder: Path, seed: int = 0):
    """Save a tiny random `diffusers.HunyuanVideoImageToVideoPipeline` at `folder` and return it.

    Transformer (token replace): 3 heads of 24 (RoPE 4/10/10, the published proportions, so that the release
    layout's transformer, whose file has no config, reads the same), 2 double + 2 single blocks, 1 refiner block, 6
    latent channels; LLaVA as `tiny_llava`; CLIP text: 3 layers, 36 wide; VAE: 4 levels (8/16/24/24)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    tokenizer, tokenizer_2 = llava_tokenizer(), clip_tokenizer()
    llava = tiny_llava(tokenizer, seed + 1)
    clip = tiny_clip_text(tokenizer_2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=6, out_channels=6, num_attention_heads=3, attention_head_dim=24, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=3.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=40, pooled_projection_dim=36, rope_theta=256.0, rope_axes_dim=(4, 10, 10),
        image_condition_type="token_replace",
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=6, block_out_channels=(8, 16, 24, 24), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    for i, module in enumerate((clip, transformer, vae)):
        randomize_(module, seed + 2 + i)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=llava, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tokenizer_2,
        image_processor=image_processor(),
    )
    pipe.save_pretrained(folder)
    return pipe


def write_i2v_release(root: Path, pipe) -> None:
    """tencent/HunyuanVideo-I2V's ckpts/ from the tiny pipeline: the transformer in the official names under
    "module", the VAE's pytorch_model.pt with the release's config.json, text_encoder_i2v/ as the whole LLaVA folder
    (weights, tokenizer, CLIP image processor) and text_encoder_2/ (CLIP-L's text model and tokenizer)."""
    import json

    import torch

    from mlx_video.families.hunyuan import planner
    from support.hunyuan import official_state, official_vae_config

    model = root / planner.RELEASE_I2V_MODEL
    (model / "transformers").mkdir(parents=True)
    official = official_state({k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()})
    torch.save({"module": official}, model / "transformers" / planner.RELEASE_TRANSFORMER)
    (model / "vae").mkdir()
    (model / "vae" / "config.json").write_text(json.dumps(official_vae_config(pipe.vae.config)))
    torch.save({k: v.detach().clone() for k, v in pipe.vae.state_dict().items()}, model / "vae" / "pytorch_model.pt")
    llava = root / planner.RELEASE_I2V_TEXT_ENCODER
    for part in (pipe.text_encoder, pipe.tokenizer, pipe.image_processor):
        part.save_pretrained(llava)
    for part in (pipe.text_encoder_2, pipe.tokenizer_2):
        part.save_pretrained(root / "text_encoder_2")
