"""SigLIP vision encoder (HunyuanVideo 1.5 I2V's image states): a tiny transformers `SiglipVisionModel` (saved,
converted) against ours; the preprocessing against `SiglipImageProcessor`'s two backends; diffusers'
`_get_image_embeds`; full-size (so400m-patch14-384) key/shape coverage."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.torch import load_file
from transformers import SiglipImageProcessorPil, SiglipVisionConfig as HFConfig
from transformers import SiglipVisionModel

from mlx_video.convert.rules import convert_weights
from mlx_video.errors import MlxVideoError
from mlx_video.image_encoders.siglip import (
    SIGLIP_VISION_KEYS,
    SiglipPreprocess,
    SiglipVisionConfig,
    SiglipVisionEncoder,
    encode_image,
    preprocess_image,
)
from support.arrays import rel_err

PARITY_RTOL = 1e-5
SIZE = 42  # 7 x 7 patches of 6


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise and a sharp edge: resizing filters differ on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 200, y / height * 180, (x + y) % 97 * 2.0], -1)
    base[height // 3: height // 2, :] += 60
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    config = HFConfig(hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3,
                      image_size=SIZE, patch_size=6, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    reference = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "position" in name:
                p.copy_(0.5 * torch.randn_like(p))
    reference.save_pretrained(folder / "image_encoder")
    state = load_file(str(folder / "image_encoder" / "model.safetensors"))
    config_json = json.loads((folder / "image_encoder" / "config.json").read_text())
    ours = SiglipVisionEncoder(SiglipVisionConfig.from_transformers(config_json))
    weights = convert_weights(SIGLIP_VISION_KEYS, {k: mx.array(v.numpy()) for k, v in state.items()})
    ours.load_weights(list(weights.items()), strict=True)
    return reference, ours


def test_encoder_matches_transformers(siglip):
    reference, ours = siglip
    pixels = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    got = np.array(ours(mx.array(pixels)))
    assert got.shape == expected.shape == (2, 49, 36)
    rel = rel_err(got, expected)
    print(f"SigLIP vision parity: rel {rel:.2e}")
    assert rel < PARITY_RTOL
    with pytest.raises(MlxVideoError, match="pixels of shape"):
        ours(mx.zeros((1, 3, SIZE, SIZE)))


def test_preprocessing_matches_siglip_image_processor():
    """Equal to transformers' PIL backend (the SiglipImageProcessor of transformers 4, which the official
    HunyuanVideo-1.5 code pins); a bilinear resize would move the pixels measurably."""
    image = photo_like(97, 130)
    settings = SiglipPreprocess(height=SIZE, width=SIZE)
    ours = np.array(preprocess_image(image, settings))[0]
    size = {"height": SIZE, "width": SIZE}
    pil = SiglipImageProcessorPil(size=size)(Image.fromarray(image), return_tensors="np").pixel_values[0]
    np.testing.assert_allclose(ours, pil.transpose(1, 2, 0), atol=1e-6)
    bilinear = SiglipImageProcessorPil(size=size, resample=Image.BILINEAR)(
        Image.fromarray(image), return_tensors="np").pixel_values[0]
    moved = np.abs(ours - bilinear.transpose(1, 2, 0)) * 127.5  # in levels of 255
    print(f"SigLIP preprocessing, bilinear instead of bicubic: mean {moved.mean():.2f} levels")
    assert moved.mean() > 0.5
    with pytest.raises(MlxVideoError, match="uint8"):
        preprocess_image(image.astype(np.float32), settings)


def test_preprocessing_near_torch_antialiased_bicubic():
    """transformers 5's default SiglipImageProcessor, where torchvision is installed (it is not here), resizes
    the uint8 image with torchvision's antialiased bicubic, which runs torch's `interpolate(mode="bicubic",
    antialias=True)`; emulated here on floats rounded back to uint8. Ours (PIL's) stays within a few levels."""
    image = photo_like(97, 130)
    ours = np.array(preprocess_image(image, SiglipPreprocess(height=SIZE, width=SIZE)))[0]
    chw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(chw, size=(SIZE, SIZE), mode="bicubic", antialias=True,
                                              align_corners=False).round().clamp(0, 255)[0].permute(1, 2, 0)
    emulated = (resized.numpy() / 255 - 0.5) / 0.5
    diff = np.abs(ours - emulated) * 127.5
    print(f"SigLIP preprocessing vs torch antialiased bicubic: max {diff.max():.2f}, mean {diff.mean():.3f} levels")
    assert diff.max() <= 4 and diff.mean() < 0.3


def test_encode_image_matches_diffusers(siglip, tmp_path):
    reference, ours = siglip
    image = photo_like(64, 80, seed=2)
    processor = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(tmp_path / "feature_extractor")
    settings = SiglipPreprocess.from_file(tmp_path / "feature_extractor" / "preprocessor_config.json")
    assert settings == SiglipPreprocess(height=SIZE, width=SIZE)
    with torch.no_grad():
        expected = HunyuanVideo15ImageToVideoPipeline._get_image_embeds(
            reference, processor, Image.fromarray(image), device="cpu").numpy()
    got = np.array(encode_image(ours, image, settings))
    rel = rel_err(got, expected)
    print(f"SigLIP encode_image vs diffusers _get_image_embeds: rel {rel:.2e}")
    assert rel < PARITY_RTOL


def test_full_size_keys_and_shapes():
    """so400m-patch14-384 (FLUX.1-Redux-dev's image_encoder/), with transformers 5 names and with the older
    `vision_model.` prefix; the pooling head is ignored."""
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=384, patch_size=14)
    config = SiglipVisionConfig.from_transformers(so400m)
    assert config == SiglipVisionConfig() == SiglipVisionConfig.from_dict(config.to_dict())
    ours = {k: tuple(v.shape) for k, v in tree_flatten(SiglipVisionEncoder(config).parameters())}
    with torch.device("meta"):
        reference = SiglipVisionModel(HFConfig(**so400m))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert any(k.startswith("head.") for k in shapes)
    for source in (shapes, {f"vision_model.{k}": s for k, s in shapes.items()}):
        assert SIGLIP_VISION_KEYS.unknown_keys(source) == []
        mapped = {k: tuple(v.shape) for k, v in
                  convert_weights(SIGLIP_VISION_KEYS, {k: mx.zeros(s) for k, s in source.items()}).items()}
        assert mapped == ours
    assert config.num_patches == 729
    print(f"SigLIP so400m vision parameters: {sum(map(math.prod, ours.values())) / 1e6:.1f}M")
