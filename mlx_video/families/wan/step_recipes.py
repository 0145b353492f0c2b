"""Few-step recipes published for Wan 2.2 (the `recipes` of the family; see mlx_video.recipes).

Numbers (ModelTC/Wan2.2-Lightning README.md and wan/configs/wan_{t2v,i2v}_A14B.py; ModelTC/LightX2V
configs/distill/*.json and step_distill/scheduler.py): Wan2.2-Lightning and the lightx2v Wan2.2 distill LoRAs both
train on the timesteps [1000, 937.5, 833.33, 625] = σ of linspace(1, 0, 5) shifted by 5, sampled with the flow
Euler rule x += (σ_next − σ)·v, without classifier-free guidance; the A14B boundary then gives high, high, low, low.
"""

from __future__ import annotations

from mlx_video.recipes import Recipe


def _shifted(steps: int, shift: float) -> list[float]:
    grid = [1.0 - i / steps for i in range(steps)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in grid]

_FOUR_STEP = {"sigmas": _shifted(4, 5.0), "shift": 5.0, "sampler": "euler", "schedule": "shifted-linear",
              "guidance": 1.0, "guidance_2": 1.0}

RECIPES = [
    Recipe(
        "lightning", ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"), _FOUR_STEP,
        "--lora-high .../high_noise_model.safetensors --lora-low .../low_noise_model.safetensors",
        "lightx2v/Wan2.2-Lightning (Wan2.2-{T2V,I2V}-A14B-4steps-lora-rank64-Seko-V1.1)",
        "Wan2.2-Lightning: 4 steps, flow Euler, shift 5, timesteps 1000, 937.5, 833.33, 625, no CFG",
    ),
    Recipe(
        "lightx2v", ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"), _FOUR_STEP,
        "--lora-high ..._high_noise_lora_rank64_lightx2v_4step_*.safetensors "
        "--lora-low ..._low_noise_lora_rank64_lightx2v_4step_*.safetensors",
        "lightx2v/Wan2.2-Distill-Loras",
        "lightx2v Wan2.2 distill LoRAs: the same 4-step grid (the deterministic Wan2.2 scheduler is the Euler rule)",
    ),
]
