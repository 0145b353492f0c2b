"""HunyuanVideo 1.5 (8.3B; T2V and I2V at 480p and 720p, CFG-distilled and step-distilled variants): the family's
package and its published models.

Settings are the release's recommendations (Tencent-Hunyuan/HunyuanVideo-1.5 README; shift and guidance also in
diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py): 121 frames at 24 fps, classifier-free guidance 6
(1 for the distilled models: one pass per step), 50 steps (8 for the step-distilled I2V, which also runs 12 or 4),
shift 5 at 480p, 9 (T2V) / 7 (I2V) at 720p, 7 for the step-distilled model. Sizes are the resolution buckets of
diffusers' HunyuanVideo15ImageProcessor (base 640 / 960, stride 16) for 16:9 and 9:16, except 720p portrait, listed
as 720x1280 (the bucket is 720x1264; both are valid sizes, as are the buckets of other aspects, e.g. 640x640).

Not here: the 720p/1080p super-resolution models and HunyuanVideo-I2V (1.0).
"""

from __future__ import annotations

from mlx_video.spec import Family, ModelSpec

from .config import HUNYUAN15_480P, HUNYUAN15_480P_MEANFLOW, HUNYUAN15_720P

SIZES_480P = ((848, 480), (480, 848))
SIZES_720P = ((1280, 720), (720, 1280))
REPO = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-"


def _spec(variant: str, task: str, guidance: float, shift: float, steps: int = 50, **extra) -> ModelSpec:
    resolution = variant[:4]
    distilled = "step-distilled" if "step_distilled" in variant else "CFG-distilled" if "distilled" in variant else ""
    what = {"t2v": "text-to-video", "i2v": "image-to-video"}[task]
    return ModelSpec(
        id="hunyuanvideo-1.5-" + variant.replace("_", "-"), family="hunyuan15", task=task, vae_stride=(4, 16, 16),
        size_multiple=16, sizes=SIZES_480P if resolution == "480p" else SIZES_720P,
        defaults=dict(steps=steps, shift=shift, guidance=guidance, sampler="euler", schedule="shifted-linear", fps=24,
                      frames=121, negative_prompt=""),
        hf_repo=None if "step_distilled" in variant else REPO + variant,
        transformer=HUNYUAN15_480P_MEANFLOW if "step_distilled" in variant else
        HUNYUAN15_480P if resolution == "480p" else HUNYUAN15_720P,
        description=f"HunyuanVideo 1.5 {what}, 8.3B ({resolution}{', ' + distilled if distilled else ''})",
        extra={"official_variant": variant, **extra},
    )


MODELS = (
    _spec("480p_t2v", "t2v", 6.0, 5.0),
    _spec("480p_i2v", "i2v", 6.0, 5.0),
    _spec("720p_t2v", "t2v", 6.0, 9.0),
    _spec("720p_i2v", "i2v", 6.0, 7.0),
    _spec("480p_t2v_distilled", "t2v", 1.0, 5.0),
    _spec("480p_i2v_distilled", "i2v", 1.0, 5.0),
    _spec("720p_i2v_distilled", "i2v", 1.0, 7.0),
    _spec("480p_i2v_step_distilled", "i2v", 1.0, 7.0, steps=8),
)

FAMILY = Family(
    "hunyuan15", "HunyuanVideo 1.5", MODELS, pipeline="pipeline:Hunyuan15Pipeline", order=2,
    text_encoders="Qwen2.5-VL-7B-Instruct's language model, and ByT5-small (Glyph-SDXL-v2) as --text-encoder-2",
    tokenizer="the Qwen2.5-VL tokenizer folder",
    official_layout="tencent/HunyuanVideo-1.5 with transformer/<variant>/ (and vae/, text_encoder/, vision_encoder/)",
)
