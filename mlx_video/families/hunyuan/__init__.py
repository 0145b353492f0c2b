"""HunyuanVideo (T2V 720p, guidance-distilled) and HunyuanVideo-I2V: the family's package and its published models."""

from __future__ import annotations

from mlx_video.spec import Family, ModelSpec

from .config import HUNYUAN_I2V_720P, HUNYUAN_T2V_720P

MODELS = (
    ModelSpec(
        id="hunyuanvideo-t2v", family="hunyuan", task="t2v", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280), (960, 544), (544, 960)),
        # guidance is the embedded (distilled) scale; --true-cfg adds real CFG with a negative prompt
        defaults=dict(steps=50, shift=7.0, guidance=6.0, sampler="euler", schedule="shifted-linear", fps=24,
                      frames=129, negative_prompt="", text_len=256),
        hf_repo="hunyuanvideo-community/HunyuanVideo", transformer=HUNYUAN_T2V_720P,
        description="HunyuanVideo text-to-video, 13B (720p, guidance-distilled)",
        extra={"embedded_guidance": True},
    ),
    ModelSpec(
        # the updated release (token replace, guidance-distilled): tencent/HunyuanVideo-I2V's README runs it at
        # 720p, 129 frames, 50 steps, embedded guidance 6 and --flow-shift 7 with --i2v-stability (the 0.999
        # noise blend diffusers always applies)
        id="hunyuanvideo-i2v", family="hunyuan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280)),
        defaults=dict(steps=50, shift=7.0, guidance=6.0, sampler="euler", schedule="shifted-linear", fps=24,
                      frames=129, negative_prompt="", text_len=256),
        hf_repo="hunyuanvideo-community/HunyuanVideo-I2V", transformer=HUNYUAN_I2V_720P,
        description="HunyuanVideo image-to-video, 13B (720p, token replace, guidance-distilled)",
        extra={"embedded_guidance": True},
    ),
)

FAMILY = Family(
    "hunyuan", "HunyuanVideo", MODELS, pipeline="pipeline:HunyuanPipeline", latent_rgb="latent_rgb", order=1,
    task_pipelines=(("i2v", "i2v_pipeline:HunyuanI2VPipeline"),),
    text_encoders="LLaVA-LLaMA-3-8B, and CLIP-L as --text-encoder-2", tokenizer="the LLaMA tokenizer folder",
    official_layout="ckpts/ with hunyuan-video-t2v-720p/ (fp8 .pt + scale map too) or hunyuan-video-i2v-720p/",
    bench="bench",
)
