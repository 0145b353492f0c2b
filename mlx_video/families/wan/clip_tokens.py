"""The CLIP image encoder's tokens for the Wan models with an image context (Wan2.1 I2V / FLF2V-14B,
Wan2.2-Animate-14B): `hidden_states[-2]` of the converted `image_encoder/`, each image preprocessed as
`CLIPImageProcessor` does (diffusers' pipelines' `encode_image`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

IMAGE_ENCODER = "image_encoder"


def clip_tokens(folder, images: list[np.ndarray], progress: bool = False) -> mx.array:
    """(1, len(images) * tokens, width): the images' ((H, W, 3) uint8) penultimate-layer tokens side by side."""
    from mlx_video.image_encoders.clip_vision import CLIPPreprocess, CLIPVisionConfig, CLIPVisionEncoder

    config = folder.config(IMAGE_ENCODER)
    with tqdm(total=1, desc="image encoding", disable=not progress, leave=False) as bar:
        encoder = CLIPVisionEncoder(CLIPVisionConfig.from_dict(config))
        folder.load_module(IMAGE_ENCODER, encoder)
        preprocess = CLIPPreprocess.from_dict(config.get("preprocess", {}))
        pixels = mx.array(np.stack([preprocess(image) for image in images]))
        tokens = encoder.penultimate(pixels)
        tokens = tokens.reshape(1, -1, tokens.shape[-1])
        mx.eval(tokens)
        bar.update()
    del encoder  # no reference cycles: freed now, without a garbage-collection pass
    mx.clear_cache()
    return tokens
