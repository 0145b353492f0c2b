"""HunyuanVideo 1.5 (8.3B; T2V and I2V at 480p and 720p, CFG-distilled and step-distilled variants): the family's
package and its published models.

Settings are the release's recommendations (Tencent-Hunyuan/HunyuanVideo-1.5 README; shift and guidance also in
diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py): 121 frames at 24 fps, classifier-free guidance 6
(1 for the distilled models: one pass per step), 50 steps (8 for the step-distilled I2V, which also runs 12 or 4),
shift 5 at 480p, 9 (T2V) / 7 (I2V) at 720p, 7 for the step-distilled model. Sizes are the resolution buckets of
diffusers' HunyuanVideo15ImageProcessor (base 640 / 960, stride 16) for 16:9 and 9:16, except 720p portrait, listed
as 720x1280 (the bucket is 720x1264; both are valid sizes, as are the buckets of other aspects, e.g. 640x640).

The super-resolution models (task "sr"; `sr.py`) take a finished 480p run to 720p (6 steps) or a 720p run to
"1080p" (8 steps): shift 2, guidance 1 (the release's `SR_PIPELINE_CONFIGS`); their sizes are the high-resolution
buckets the official SR pipeline maps the base sizes to (base 960 / 1440, stride 16: 848x480 -> 1280x720,
1280x720 -> 1904x1072, the 16-multiple nearest 1920x1080).

Step caching: the release's own cache (`--enable_cache`, Tencent-Hunyuan/HunyuanVideo-1.5 `generate.py` and
`hyvideo/commons/infer_state.py`; the AngelSlim helpers it calls) runs the transformer on steps 0-10, then every 4th
step from 11 to 44, then 45-49, of 50; the other steps reuse or forecast. Its `taylorcache` forecasts by a
second-order Taylor series of divided differences: our `--cache taylorseer` (`mlx_video.pipelines.cache`), whose
defaults on the 50-step models are the release's numbers in diffusers' fields (`TAYLORCACHE`). Its `deepcache` and
`teacache` modes are not here (README, "Faster generation").

HunyuanVideo-I2V (1.0) is a model of the HunyuanVideo family (`mlx_video/families/hunyuan`).
"""

from __future__ import annotations

from mlx_video.spec import Family, ModelSpec

from .config import HUNYUAN15_480P, HUNYUAN15_480P_MEANFLOW, HUNYUAN15_720P, HUNYUAN15_SR_720P, HUNYUAN15_SR_1080P

SIZES_480P = ((848, 480), (480, 848))
SIZES_720P = ((1280, 720), (720, 1280))
SIZES_SR_720P = ((1280, 720), (720, 1280))
SIZES_SR_1080P = ((1904, 1072), (1072, 1904))
REPO = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-"
# The release's cache schedule (`generate.py` defaults: --cache_start_step 11, --cache_end_step 45,
# --cache_step_interval 4, of --total_steps 50; AngelSlim's TaylorCacheHelper: max_order 2) in the fields of
# diffusers' TaylorSeerCacheConfig, name for name. One difference is diffusers' rule, not ours to change: after the
# warm-up the release computes the first step of each interval (11, 15, ..., 43), diffusers the second (12, 16,
# ..., 44), so the same 25 of 50 steps compute, those in the middle one step later. The release turns its cache
# off for the step-distilled model (`generate.py` refuses the two together), which keeps the shared defaults, and
# for the SR models, whose stage runs no step cache here either.
TAYLORCACHE = dict(disable_cache_before_step=11, disable_cache_after_step=45, cache_interval=4, max_order=2)


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
        extra={"official_variant": variant, **({} if "step_distilled" in variant else
                                                  {"cache_settings": {"taylorseer": TAYLORCACHE}}), **extra},
    )


def _sr_spec(variant: str, base: str, steps: int, bases: tuple[ModelSpec, ...]) -> ModelSpec:
    """`upscales`: the models whose runs it takes (the release's TRANSFORMER_VERSION_TO_SR_VERSION: every 480p model
    to the 720p SR model, every 720p one to the 1080p SR model); `output_resolution`: what `--upscale` calls it."""
    resolution = variant[: variant.index("p") + 1]
    sizes = SIZES_SR_720P if resolution == "720p" else SIZES_SR_1080P
    # quality profiles: ours, one step fewer per level at the one output size (the shared step fractions would
    # give 4 steps to both lower levels of a 6-step model)
    quality = {q: {"sizes": [list(s) for s in sizes], "steps": steps - i} for i, q in enumerate(("high", "medium", "low"))}
    return ModelSpec(
        id="hunyuanvideo-1.5-" + variant.replace("_", "-"), family="hunyuan15", task="sr", vae_stride=(4, 16, 16),
        size_multiple=16, sizes=sizes,
        defaults=dict(steps=steps, shift=2.0, guidance=1.0, sampler="euler", schedule="shifted-linear", fps=24,
                      frames=121, negative_prompt="", quality=quality),
        transformer=HUNYUAN15_SR_720P if resolution == "720p" else HUNYUAN15_SR_1080P,
        description=f"HunyuanVideo 1.5 super-resolution {base} -> {resolution}, step-distilled (upscales a run)",
        extra={"official_variant": variant, "upsampler": variant, "base_resolution": base, "output_resolution": resolution,
               "upscales": tuple(b.id for b in bases if b.extra["official_variant"].startswith(base))},
    )


BASE_MODELS = (
    _spec("480p_t2v", "t2v", 6.0, 5.0),
    _spec("480p_i2v", "i2v", 6.0, 5.0),
    _spec("720p_t2v", "t2v", 6.0, 9.0),
    _spec("720p_i2v", "i2v", 6.0, 7.0),
    _spec("480p_t2v_distilled", "t2v", 1.0, 5.0),
    _spec("480p_i2v_distilled", "i2v", 1.0, 5.0),
    _spec("720p_i2v_distilled", "i2v", 1.0, 7.0),
    _spec("480p_i2v_step_distilled", "i2v", 1.0, 7.0, steps=8),
)
MODELS = (
    *BASE_MODELS,
    _sr_spec("720p_sr_distilled", "480p", 6, BASE_MODELS),
    _sr_spec("1080p_sr_distilled", "720p", 8, BASE_MODELS),
)

FAMILY = Family(
    "hunyuan15", "HunyuanVideo 1.5", MODELS, pipeline="pipeline:Hunyuan15Pipeline", order=2,
    task_pipelines=(("sr", "sr:Hunyuan15SRPipeline"),),
    text_encoders="Qwen2.5-VL-7B-Instruct's language model, and ByT5-small (Glyph-SDXL-v2) as --text-encoder-2",
    tokenizer="the Qwen2.5-VL tokenizer folder",
    bench="bench",
    official_layout="tencent/HunyuanVideo-1.5 with transformer/<variant>/ (and vae/, text_encoder/, vision_encoder/)",
)
