"""Genmo Mochi 1 preview: the family's package (the AsymmDiT transformer and the AsymmVAE, channels-last) and
its published model."""

from __future__ import annotations

from mlx_video.spec import Family, ModelSpec

from .config import MOCHI_1_PREVIEW

MODELS = (
    ModelSpec(
        id="mochi-1-preview", family="mochi", task="t2v", vae_stride=(6, 8, 8), size_multiple=16,
        sizes=((848, 480), (480, 848)),
        # guidance is classifier-free (diffusers' MochiPipeline and the official README: 4.5; genmo's demo
        # CLI defaults to 6.0); the schedule is Mochi's linear-quadratic one, without shift
        defaults=dict(steps=64, shift=1.0, guidance=4.5, sampler="euler", schedule="linear-quadratic", fps=30,
                      frames=163, negative_prompt="", text_len=256, zero_empty_prompt=False),
        hf_repo="genmo/mochi-1-preview", transformer=MOCHI_1_PREVIEW,
        description="Genmo Mochi 1 preview text-to-video, 10B (480p)",
    ),
)

FAMILY = Family("mochi", "Mochi 1", MODELS, pipeline="pipeline:MochiPipeline", order=2,
                text_encoders="T5-v1.1-XXL encoder", tokenizer="google/t5-v1_1-xxl", bench="bench")
