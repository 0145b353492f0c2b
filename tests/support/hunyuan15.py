"""A tiny random HunyuanVideo 1.5 reference pipeline, built offline with diffusers, transformers and tokenizers.

The Qwen tokenizer is a byte-level BPE with Qwen2's pre-tokenizer (NFC, its split pattern, then byte-level
without its own regex), trained on the chat template and a few prompts: it splits the system turn as the released
tokenizer does, into the 108 tokens diffusers crops. Its chat template renders a system and a user turn with the
generation prompt as Qwen2.5-VL's does (a minimal Jinja template of ours, for the two-turn case only). ByT5's
tokenizer is transformers' own (bytes, no files).

`official_state` / `official_vae_state`: a diffusers transformer / VAE state dict under the release's names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

TEXT_DIM, GLYPH_DIM, IMAGE_DIM = 20, 12, 16
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TWO_TURN_TEMPLATE = ("<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n<|im_start|>user\n"
                     "{{ messages[1]['content'] }}<|im_end|>\n{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% endif %}")
SENTENCES = ["a corgi surfs a wave at sunset, a neon sign that reads OPEN", "static, blurry, low quality"]


def tiny_transformer(heads=3, head_dim=24, layers=2, meanflow=False, seed=0, axes=(8, 8, 8), text_dim=TEXT_DIM):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        text_embed_dim=text_dim, text_embed_2_dim=GLYPH_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=axes,
        use_meanflow=meanflow, target_size=64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def tiny_vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(3)
    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()


def qwen_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlx_video.text_encoders.qwen25vl import chat_text

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([chat_text(s) for s in SENTENCES] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", padding_side="right",
                                   chat_template=TWO_TURN_TEMPLATE)


def randomize_(module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def tiny_encoders(with_vae: bool = True) -> dict:
    """The reference pipelines' prompt modules: a 5-layer Qwen2.5-VL text model (2 heads of 12, 24 wide states) with
    its tokenizer, a 2-layer ByT5 encoder with transformers' byte tokenizer; and the tiny VAE (`with_vae`)."""
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = qwen_tokenizer()
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=40, num_hidden_layers=5, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})).eval()
    randomize_(qwen, 1)
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=GLYPH_DIM, d_kv=6, d_ff=20, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)).eval()
    randomize_(byt5, 2)
    encoders = dict(text_encoder=qwen, tokenizer=tokenizer, text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer())
    return {**encoders, "vae": tiny_vae()} if with_vae else encoders


def build_tiny_t2v_pipeline(folder: Path, guidance: float = 6.0, shift: float = 5.0,
                            transformer: dict | None = None):
    """A HunyuanVideo15Pipeline (`tiny_encoders`, the tiny VAE, and a transformer: 2 blocks of 3 heads of 16 unless
    `transformer` gives `tiny_transformer`'s arguments), saved with save_pretrained into `folder`."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    sizes = transformer or dict(heads=3, head_dim=16, layers=2, seed=4, axes=(4, 6, 6))
    pipe = HunyuanVideo15Pipeline(
        transformer=tiny_transformer(**sizes, text_dim=24),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), guider=ClassifierFreeGuidance(guidance_scale=guidance),
        **tiny_encoders())
    pipe.save_pretrained(folder)
    return pipe


def build_tiny_i2v_pipeline(folder: Path, guidance: float = 1.0, shift: float = 7.0, meanflow: bool = True):
    """A HunyuanVideo15ImageToVideoPipeline: `tiny_encoders`, a 2-block transformer of 2 heads of 20 (MeanFlow by
    default, as the step-distilled model), a 1-layer SigLIP of 16 on 28x28 pixels; saved into `folder`."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(6)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=24, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14)).eval()
    randomize_(siglip, 7)
    pipe = HunyuanVideo15ImageToVideoPipeline(
        transformer=tiny_transformer(2, 20, 2, meanflow=meanflow, seed=5, axes=(4, 8, 8), text_dim=24),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), guider=ClassifierFreeGuidance(guidance_scale=guidance),
        image_encoder=siglip, feature_extractor=SiglipImageProcessor(size={"height": 28, "width": 28}),
        **tiny_encoders())
    pipe.save_pretrained(folder)
    return pipe


def save_transformer_folder(root: Path, model, pipeline="HunyuanVideo15Pipeline", guidance=6.0) -> Path:
    """A diffusers folder holding the transformer alone (model_index.json, transformer/, guider/)."""
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "guider").mkdir()
    (root / "guider" / "guider_config.json").write_text(json.dumps({"guidance_scale": guidance}))
    return root


# diffusers module -> official module (the release's names), as diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py
# renames them the other way; "#q/#k/#v": a slice of the official fused refiner q|k|v.
OFFICIAL_NAMES = [
    (r"x_embedder\.proj", "img_in.proj"),
    (r"time_embed\.timestep_embedder\.linear_([12])", lambda m: f"time_in.mlp.{2 * int(m[1]) - 2}"),
    (r"time_embed\.timestep_embedder_r\.linear_([12])", lambda m: f"time_r_in.mlp.{2 * int(m[1]) - 2}"),
    (r"context_embedder\.proj_in", "txt_in.input_embedder"),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_([12])",
     lambda m: f"txt_in.t_embedder.mlp.{2 * int(m[1]) - 2}"),
    (r"context_embedder\.time_text_embed\.text_embedder\.linear_([12])", r"txt_in.c_embedder.linear_\1"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv#\2"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(norm[12])", r"txt_in.individual_token_refiner.blocks.\1.\2"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2", r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear",
     r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1"),
    (r"context_embedder_2\.norm", "byt5_in.layernorm"),
    (r"context_embedder_2\.linear_([123])", r"byt5_in.fc\1"),
    (r"image_embedder\.norm_in", "vision_in.proj.0"),
    (r"image_embedder\.linear_1", "vision_in.proj.1"),
    (r"image_embedder\.linear_2", "vision_in.proj.3"),
    (r"image_embedder\.norm_out", "vision_in.proj.4"),
    (r"cond_type_embed", "cond_type_embedding"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.linear"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.linear"),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"double_blocks.\1.img_attn_\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", r"double_blocks.\1.txt_attn_\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])", r"double_blocks.\1.img_attn_\2_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])", r"double_blocks.\1.txt_attn_\2_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn_proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn_proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.fc2"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),  # official (shift, scale), diffusers (scale, shift)
    (r"proj_out", "final_layer.linear"),
]


def official_state(diffusers_state: dict) -> dict:
    """A diffusers HunyuanVideo15Transformer3DModel state dict under the release's names (see OFFICIAL_NAMES)."""
    out, parts = {}, {}
    for key, value in diffusers_state.items():
        module, _, leaf = key.rpartition(".")
        for pattern, target in OFFICIAL_NAMES:
            m = re.fullmatch(pattern, module)
            if m:
                name = target(m) if callable(target) else m.expand(target)
                break
        else:
            raise KeyError(key)
        value = value.detach().clone()
        if name == "final_layer.adaLN_modulation.1":
            value = torch.cat(value.chunk(2)[::-1])
        if "#" in name:
            fused, piece = name.split("#")
            parts.setdefault(f"{fused}.{leaf}", {})["qkv".index(piece)] = value
        else:
            out[f"{name}.{leaf}"] = value
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[i] for i in range(3)])
    return out


def official_vae_state(state: dict) -> dict:
    """A diffusers AutoencoderKLHunyuanVideo15 state dict under the release's names (the inverse of diffusers'
    convert_hunyuan_video1_5_to_diffusers.py)."""
    out = {}
    for key, value in state.items():
        for ours, theirs in ((".mid_block.resnets.0.", ".mid.block_1."), (".mid_block.resnets.1.", ".mid.block_2."),
                             (".mid_block.attentions.0.", ".mid.attn_1."), (".downsamplers.0.", ".downsample."),
                             (".upsamplers.0.", ".upsample."), (".resnets.", ".block."), ("down_blocks.", "down."),
                             ("up_blocks.", "up."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                             (".conv_shortcut.", ".nin_shortcut.")):
            key = key.replace(ours, theirs)
        out[key] = value
    return out
