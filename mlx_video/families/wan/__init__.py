"""Wan 2.2 (T2V-A14B, I2V-A14B, TI2V-5B, S2V-14B, Animate-14B), Wan 2.1 I2V-14B and FLF2V-14B, and Wan VACE (2.1 1.3B / 14B, 2.2 VACE-Fun A14B):
the family's package and its published models."""

from __future__ import annotations

from mlx_video.spec import Family, ModelSpec

from .animate_model import WAN_ANIMATE_14B
from .config import WAN_A14B_I2V, WAN_A14B_T2V, WAN_TI2V_5B
from .image_model import WAN21_FLF2V_14B, WAN21_I2V_14B
from .s2v_model import WAN_S2V_14B
from .vace_model import WAN21_VACE_1_3B, WAN21_VACE_14B, WAN22_VACE_FUN_A14B

# The official release's default negative prompt (Wan2.2 wan/configs/shared_config.py), used when none is given.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Wan2.2-S2V's own negative prompt (wan/configs/wan_s2v_14B.py sample_neg_prompt).
WAN_S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))
_COMMON = dict(sampler="unipc", negative_prompt=WAN_NEGATIVE_PROMPT, text_len=512)
MODELS = (
    ModelSpec(
        id="wan2.2-t2v-a14b", family="wan", task="t2v", vae_stride=(4, 8, 8), size_multiple=16, sizes=_A14B_SIZES,
        defaults=dict(_COMMON, steps=40, shift=12.0, guidance=4.0, guidance_2=3.0, fps=16, frames=81, boundary=0.875),
        hf_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers", experts=2, transformer=WAN_A14B_T2V,
        description="Wan 2.2 text-to-video, two 14B experts",
    ),
    ModelSpec(
        id="wan2.2-i2v-a14b", family="wan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16, sizes=_A14B_SIZES,
        defaults=dict(_COMMON, steps=40, shift=5.0, guidance=3.5, guidance_2=3.5, fps=16, frames=81, boundary=0.900),
        hf_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers", experts=2, transformer=WAN_A14B_I2V,
        description="Wan 2.2 image-to-video, two 14B experts",
    ),
    ModelSpec(
        id="wan2.2-ti2v-5b", family="wan", task="ti2v", vae_stride=(4, 16, 16), size_multiple=32,
        sizes=((1280, 704), (704, 1280)),
        defaults=dict(_COMMON, steps=50, shift=5.0, guidance=5.0, fps=24, frames=121, per_frame_timesteps=True),
        hf_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers", transformer=WAN_TI2V_5B,
        description="Wan 2.2 text- and image-to-video, 5B",
    ),
    ModelSpec(
        # frames: per clip (4n; the video follows the audio, clip after clip); sizes are multiples of 64 (the
        # 4x frame-pack projection) and, without --size, the portrait's aspect ratio within max_area sets it
        id="wan2.2-s2v-14b", family="wan", task="s2v", vae_stride=(4, 8, 8), size_multiple=64,
        sizes=((1024, 704), (704, 1024)), frame_offset=0,
        defaults=dict(_COMMON, negative_prompt=WAN_S2V_NEGATIVE_PROMPT, steps=40, shift=3.0, guidance=4.5, fps=16,
                      frames=80, max_area=1024 * 704, drop_first_motion=True),
        hf_repo="Wan-AI/Wan2.2-S2V-14B", transformer=WAN_S2V_14B,
        description="Wan 2.2 speech-to-video: a portrait and a voice track to a talking video, 14B",
    ),
    # Wan 2.1 image-to-video and first-last-frame-to-video, 14B, with a CLIP image context. Published settings:
    # Wan2.1 generate.py (I2V: 40 steps, shift 5, 3 at 480p; FLF2V: 50 steps, shift 16; guidance 5, 81 frames)
    # and its SUPPORTED_SIZES; 16 fps (wan/configs). The 480P and 720P checkpoints are separate releases.
    ModelSpec(
        id="wan2.1-i2v-14b-720p", family="wan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280)),
        defaults=dict(_COMMON, steps=40, shift=5.0, guidance=5.0, fps=16, frames=81),
        hf_repo="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", transformer=WAN21_I2V_14B,
        description="Wan 2.1 image-to-video, 14B, 720p (CLIP image context)",
    ),
    ModelSpec(
        id="wan2.1-i2v-14b-480p", family="wan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((832, 480), (480, 832)),
        defaults=dict(_COMMON, steps=40, shift=3.0, guidance=5.0, fps=16, frames=81),
        hf_repo="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", transformer=WAN21_I2V_14B,
        description="Wan 2.1 image-to-video, 14B, 480p (CLIP image context)",
    ),
    ModelSpec(
        id="wan2.1-flf2v-14b", family="wan", task="i2v", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280)),
        defaults=dict(_COMMON, steps=50, shift=16.0, guidance=5.0, fps=16, frames=81),
        hf_repo="Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", transformer=WAN21_FLF2V_14B,
        description="Wan 2.1 first-last-frame-to-video, 14B, 720p: --image and --last-image (CLIP image context)",
    ),
    # VACE (reference, control, inpainting, outpainting, extension). Wan 2.1's published settings: Wan2.1
    # generate.py (50 steps, shift 16 for vace tasks, guidance 5, 81 frames at 16 fps; its SUPPORTED_SIZES).
    ModelSpec(
        id="wan2.1-vace-1.3b", family="wan", task="vace", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((832, 480), (480, 832)),
        defaults=dict(_COMMON, steps=50, shift=16.0, guidance=5.0, fps=16, frames=81),
        hf_repo="Wan-AI/Wan2.1-VACE-1.3B-diffusers", transformer=WAN21_VACE_1_3B,
        description="Wan 2.1 VACE: reference, control, inpaint/outpaint, extension; 1.3B",
    ),
    ModelSpec(
        id="wan2.1-vace-14b", family="wan", task="vace", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
        defaults=dict(_COMMON, steps=50, shift=16.0, guidance=5.0, fps=16, frames=81),
        hf_repo="Wan-AI/Wan2.1-VACE-14B-diffusers", transformer=WAN21_VACE_14B,
        description="Wan 2.1 VACE: reference, control, inpaint/outpaint, extension; 14B",
    ),
    ModelSpec(
        # alibaba-pai/Wan2.2-VACE-Fun-A14B: the T2V-A14B experts with VACE context blocks; its sampling
        # settings here are T2V-A14B's (boundary, shift, guidance)
        id="wan2.2-vace-fun-a14b", family="wan", task="vace", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=_A14B_SIZES,
        defaults=dict(_COMMON, steps=40, shift=12.0, guidance=4.0, guidance_2=3.0, fps=16, frames=81, boundary=0.875),
        hf_repo="alibaba-pai/Wan2.2-VACE-Fun-A14B", experts=2, transformer=WAN22_VACE_FUN_A14B,
        description="Wan 2.2 VACE-Fun (alibaba-pai): VACE on two 14B experts",
    ),
    ModelSpec(
        # frames: per segment (--segment-frames; each carries one frame from the one before); the pose video's
        # length sets the video's. Published settings: Wan2.2 wan/configs/wan_animate_14B.py (shift 5, 20 steps,
        # guidance 1, 77-frame segments, 30 fps) and diffusers' WanAnimatePipeline (1280x720).
        id="wan2.2-animate-14b", family="wan", task="animate", vae_stride=(4, 8, 8), size_multiple=16,
        sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
        defaults=dict(_COMMON, steps=20, shift=5.0, guidance=1.0, fps=30, frames=77),
        hf_repo="Wan-AI/Wan2.2-Animate-14B-Diffusers", transformer=WAN_ANIMATE_14B,
        description="Wan 2.2 character animation: a character image driven by pose and face videos, or replacing "
                    "the performer in a video, 14B",
    ),
)

FAMILY = Family(
    "wan", "Wan 2.2", MODELS, pipeline="pipeline:WanPipeline", task_pipelines=(("s2v", "s2v_pipeline:WanS2VPipeline"),
                                                                        ("vace", "vace_pipeline:WanVACEPipeline"),
                                                                        ("animate", "animate_pipeline:WanAnimatePipeline")),
    latent_rgb="latent_rgb", mag_tables="cache_tables:MAG_TABLES", recipes="step_recipes:RECIPES", catch_all=True, order=0,
    bench="bench",
    text_encoders="UMT5-XXL encoder", tokenizer="google/umt5-xxl",
    official_layout="high_noise_model/ + low_noise_model/ (or the TI2V-5B / Animate-14B shards),\n"
                    "models_t5_umt5-xxl-enc-bf16.pth, Wan2.x_VAE.pth, google/umt5-xxl/\n"
                    "(Animate: + models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)",
    schedule_names=(("wan", "unipc-grid"),),  # `--schedule wan`, the name it had before it was shared
)
