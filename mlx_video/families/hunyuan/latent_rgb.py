"""Published latent-to-RGB factors for HunyuanVideo (16-channel) VAE latent previews (`mlx_video.preview`).

The numbers are ComfyUI's latent previews (comfy/latent_formats.py, HunyuanVideo): `rgb = latents @ weights + bias` on the
normalised latents the denoising loop holds, giving RGB in [-1, 1]. A rough approximation by design.
`FACTORS` maps a latent channel count to (weights (C, 3), bias (3,)) in that [-1, 1] convention.
"""

import numpy as np


def _table(text: str) -> np.ndarray:
    return np.array([[float(v) for v in row.split()] for row in text.strip().splitlines()], np.float32)


HUNYUAN_WEIGHTS = _table("""
    -0.0395 -0.0331 +0.0445
    +0.0696 +0.0795 +0.0518
    +0.0135 -0.0945 -0.0282
    +0.0108 -0.0250 -0.0765
    -0.0209 +0.0032 +0.0224
    -0.0804 -0.0254 -0.0639
    -0.0991 +0.0271 -0.0669
    -0.0646 -0.0422 -0.0400
    -0.0696 -0.0595 -0.0894
    -0.0799 -0.0208 -0.0375
    +0.1166 +0.1627 +0.0962
    +0.1165 +0.0432 +0.0407
    -0.2315 -0.1920 -0.1355
    -0.0270 +0.0401 -0.0821
    -0.0616 -0.0997 -0.0727
    +0.0249 -0.0469 -0.1703
""")
HUNYUAN_BIAS = np.array([0.0259, -0.0192, -0.0761], np.float32)

FACTORS = {16: (HUNYUAN_WEIGHTS, HUNYUAN_BIAS)}
