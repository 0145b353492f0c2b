"""HunyuanVideo transformer: parity with diffusers' HunyuanVideoTransformer3DModel, official names, full-size keys."""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
from mlx.utils import tree_flatten
from safetensors.torch import load_file

from mlx_video.families.hunyuan.keys import (
    COMFYUI_TRANSFORMER,
    DIFFUSERS_TRANSFORMER,
    OFFICIAL_TRANSFORMER,
    PART_SEPARATOR,
    convert_weights,
    fuse_parts,
    transformer_config_from_diffusers,
)
from mlx_video.families.hunyuan.config import HUNYUAN_T2V_720P
from mlx_video.families.hunyuan.transformer import HunyuanTransformer
from support.hunyuan import official_state  # noqa: E402
from support.arrays import rel_err

PARITY_RTOL = 1e-5


def tiny_config(**overrides) -> dict:
    """2 heads of 24 (RoPE 4/10/10), 2 double + 3 single blocks, 1 refiner block, odd channel counts."""
    config = dict(
        in_channels=12,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=24,
        num_layers=2,
        num_single_layers=3,
        num_refiner_layers=1,
        mlp_ratio=3.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=20,
        pooled_projection_dim=12,
        rope_theta=256.0,
        rope_axes_dim=(4, 10, 10),
    )
    config.update(overrides)
    return config


class RoundedSinusoid(torch.nn.Module):
    """diffusers' float32 timestep sinusoid with correctly rounded frequencies.

    torch's float32 exp is off by one ulp in 2 of the 128 frequencies (CUDA's differs again); at t = 6000
    (guidance 6.0) that moves an angle by ~2e-4 rad. Ours uses exp rounded from float64, and so does the
    reference here; `test_parity_with_stock_diffusers_sinusoid` measures the stock difference."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = 128
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half
        freqs = torch.from_numpy(np.exp(exponent.numpy().astype(np.float64)).astype(np.float32))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def random_reference(config: dict, seed: int, stock_sinusoid: bool = False) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and not name.endswith("linear.weight") and not name.endswith("linear.bias"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    if not stock_sinusoid:
        model.time_text_embed.time_proj = RoundedSinusoid()
        model.context_embedder.time_text_embed.time_proj = RoundedSinusoid()
    return model


def saved_state_dict(model, tmp_path) -> dict[str, mx.array]:
    """The reference's weights as written by save_pretrained, read back as MLX arrays."""
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return {k: mx.array(v.float().numpy()) for k, v in state.items()}


def ours_from(reference, tmp_path) -> HunyuanTransformer:
    model = HunyuanTransformer(transformer_config_from_diffusers(dict(reference.config)), dtype=mx.float32)
    weights = convert_weights(DIFFUSERS_TRANSFORMER, saved_state_dict(reference, tmp_path))
    model.load_weights(list(weights.items()), strict=True)
    return model


def inputs(rng, batch, frames, height, width, channels, text_len, text_dim, pooled_dim, valid):
    latents = rng.standard_normal((batch, frames, height, width, channels)).astype(np.float32)
    text = rng.standard_normal((batch, text_len, text_dim)).astype(np.float32)
    mask = np.zeros((batch, text_len), dtype=np.int64)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    pooled = rng.standard_normal((batch, pooled_dim)).astype(np.float32)
    return latents, text, mask, pooled


def run_reference(reference, latents, timestep, text, mask, pooled, guidance):
    with torch.no_grad():
        out = reference(
            torch.from_numpy(latents).permute(0, 4, 1, 2, 3),
            torch.from_numpy(timestep),
            torch.from_numpy(text),
            torch.from_numpy(mask),
            torch.from_numpy(pooled),
            guidance=None if guidance is None else torch.from_numpy(guidance),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize(
    "frames,height,width,valid,guidance",
    [
        (3, 6, 10, [5, 2], True),  # non-square, odd post-patch grid, padded text in both samples
        (1, 4, 8, [7, 7], True),  # one latent frame, no padding
        (2, 8, 4, [1, 4], False),  # no guidance embedding, a single valid token
        (2, 6, 6, [4, 4], True),  # same padding in both samples: padding dropped instead of masked
    ],
)
def test_parity_with_diffusers(tmp_path, frames, height, width, valid, guidance):
    config = tiny_config(guidance_embeds=guidance)
    reference = random_reference(config, seed=frames)
    ours = ours_from(reference, tmp_path)
    rng = np.random.default_rng(frames)
    latents, text, mask, pooled = inputs(rng, 2, frames, height, width, 12, 7, 20, 12, valid)
    timestep = np.array([937.5, 120.25], dtype=np.float32)
    guidance_in = np.array([6000.0, 3500.0], dtype=np.float32) if guidance else None
    expected = run_reference(reference, latents, timestep, text, mask, pooled, guidance_in)
    got = ours(
        mx.array(latents), mx.array(timestep), mx.array(text), mx.array(mask), mx.array(pooled),
        None if guidance_in is None else mx.array(guidance_in),
    )
    assert got.dtype == mx.float32 and got.shape == expected.shape
    rel = rel_err(np.array(got), expected)
    print(f"transformer parity {frames}x{height}x{width} valid={valid}: rel {rel:.2e}")
    assert rel < PARITY_RTOL


@pytest.mark.parametrize("condition,channels,frames,guidance", [
    ("token_replace", 8, 3, True),  # the first frame's 3x5 tokens modulated as at timestep 0
    ("latent_concat", 17, 2, False),  # 8 noise + 8 image + 1 mask channels in, 8 out
])
def test_i2v_parity_with_diffusers(tmp_path, condition, channels, frames, guidance):
    """HunyuanVideo-I2V's two transformers (diffusers `image_condition_type`), 3 heads of 16 (RoPE 4/6/6)."""
    config = tiny_config(image_condition_type=condition, in_channels=channels, out_channels=8, num_attention_heads=3,
                         attention_head_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=guidance, num_single_layers=2)
    reference = random_reference(config, seed=21)
    ours = ours_from(reference, tmp_path)
    assert ours.config.image_condition == condition
    rng = np.random.default_rng(21)
    latents, text, mask, pooled = inputs(rng, 2, frames, 6, 10, channels, 7, 20, 12, [5, 2])
    timestep = np.array([937.5, 120.25], dtype=np.float32)
    guidance_in = np.array([6000.0, 3500.0], dtype=np.float32) if guidance else None
    expected = run_reference(reference, latents, timestep, text, mask, pooled, guidance_in)
    got = np.array(ours(*(None if a is None else mx.array(a)
                          for a in (latents, timestep, text, mask, pooled, guidance_in))))
    rel = rel_err(got, expected)
    print(f"I2V transformer parity ({condition}): rel {rel:.2e}")
    assert rel < PARITY_RTOL
    if condition == "token_replace":  # the first frame's own modulation matters: without it the result moves
        plain = HunyuanTransformer(replace(ours.config, image_condition=None), dtype=mx.float32)
        plain.update(ours.parameters())
        moved = np.array(plain(*(None if a is None else mx.array(a)
                                 for a in (latents, timestep, text, mask, pooled, guidance_in))))
        assert rel_err(moved, expected) > 1e-2


def test_parity_with_stock_diffusers_sinusoid(tmp_path):
    """Against diffusers' own float32 exp frequencies the guidance angle (t = 6000) differs by ~2e-4 rad in
    two frequencies; the bound is looser accordingly."""
    reference = random_reference(tiny_config(), seed=11, stock_sinusoid=True)
    ours = ours_from(reference, tmp_path)
    rng = np.random.default_rng(11)
    latents, text, mask, pooled = inputs(rng, 2, 2, 4, 6, 12, 6, 20, 12, [6, 2])
    timestep, guidance = np.array([999.0, 250.0], np.float32), np.array([6000.0, 6000.0], np.float32)
    expected = run_reference(reference, latents, timestep, text, mask, pooled, guidance)
    got = ours(*(mx.array(a) for a in (latents, timestep, text, mask, pooled, guidance)))
    rel = rel_err(np.array(got), expected)
    print(f"transformer parity vs stock diffusers sinusoid: rel {rel:.2e}")
    assert rel < 1e-4


def test_padding_does_not_leak(tmp_path):
    """Changing the padded text rows changes nothing: padding is masked out of every attention and the pool."""
    reference = random_reference(tiny_config(), seed=7)
    ours = ours_from(reference, tmp_path)
    rng = np.random.default_rng(7)
    latents, text, mask, pooled = inputs(rng, 1, 2, 4, 6, 12, 6, 20, 12, [3])
    args = [mx.array(np.array([500.0], np.float32)), None, mx.array(mask), mx.array(pooled), mx.array([6000.0])]
    first = np.array(ours(mx.array(latents), args[0], mx.array(text), *args[2:]))
    text[:, 3:] = rng.standard_normal(text[:, 3:].shape)
    second = np.array(ours(mx.array(latents), args[0], mx.array(text), *args[2:]))
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)
    state = ours.embed(mx.array(latents), args[0], mx.array(text), *args[2:])
    assert state.mask is None and state.txt.shape[1] == 3  # batch 1: padding dropped, no mask
    expected = run_reference(reference, latents, np.array([500.0], np.float32), text, mask, pooled,
                             np.array([6000.0], np.float32))
    assert rel_err(second, expected) < PARITY_RTOL


def test_embed_blocks_head_compose(tmp_path):
    reference = random_reference(tiny_config(), seed=3)
    ours = ours_from(reference, tmp_path)
    rng = np.random.default_rng(3)
    latents, text, mask, pooled = (mx.array(a) for a in inputs(rng, 1, 2, 4, 4, 12, 5, 20, 12, [4]))
    t, g = mx.array([300.0]), mx.array([6000.0])
    state = ours.embed(latents, t, text, mask, pooled, g)
    assert state.img.shape == (1, 2 * 2 * 2, 48) and state.txt.shape == (1, 4, 48)  # padding dropped
    full = ours(latents, t, text, mask, pooled, g)
    np.testing.assert_array_equal(np.array(ours.head(ours.blocks(state))), np.array(full))
    # Skipping the blocks (what a step cache does) gives a different, finite velocity of the same shape.
    skipped = ours.head(state)
    assert skipped.shape == full.shape and not np.allclose(np.array(skipped), np.array(full))


def test_bf16_close_to_fp32(tmp_path):
    reference = random_reference(tiny_config(), seed=4)
    ours = ours_from(reference, tmp_path)
    rng = np.random.default_rng(4)
    latents, text, mask, pooled = (mx.array(a) for a in inputs(rng, 2, 2, 4, 6, 12, 6, 20, 12, [6, 3]))
    t, g = mx.array([900.0, 100.0]), mx.array([6000.0, 6000.0])
    full = np.array(ours(latents, t, text, mask, pooled, g))
    ours.set_dtype(mx.bfloat16)
    ours.dtype = mx.bfloat16
    half = ours(latents.astype(mx.bfloat16), t, text.astype(mx.bfloat16), mask, pooled.astype(mx.bfloat16), g)
    assert half.dtype == mx.float32
    rel = rel_err(np.array(half), full)
    print(f"bf16 vs fp32: rel {rel:.2e}")
    assert np.isfinite(np.array(half)).all() and rel < 3e-2


def test_input_validation():
    model = HunyuanTransformer(transformer_config_from_diffusers(tiny_config()), dtype=mx.float32)
    text, mask, pooled = mx.zeros((1, 4, 20)), mx.ones((1, 4)), mx.zeros((1, 12))
    with pytest.raises(ValueError):  # guidance required
        model(mx.zeros((1, 1, 4, 4, 12)), mx.array([1.0]), text, mask, pooled)
    with pytest.raises(ValueError):  # not a multiple of the patch
        model(mx.zeros((1, 1, 5, 4, 12)), mx.array([1.0]), text, mask, pooled, mx.array([1.0]))
    with pytest.raises(ValueError):  # wrong channel count
        model(mx.zeros((1, 1, 4, 4, 16)), mx.array([1.0]), text, mask, pooled, mx.array([1.0]))
    with pytest.raises(ValueError, match="image_condition"):
        transformer_config_from_diffusers(tiny_config(image_condition_type="first_frame"))
    with pytest.raises(ValueError, match="in_channels must be 17"):  # noise 8 + image 8 + mask 1
        transformer_config_from_diffusers(tiny_config(image_condition_type="latent_concat"))


# --- official names ---------------------------------------------------------------------------------------


def test_official_names_convert_like_diffusers():
    reference = random_reference(tiny_config(), seed=5)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    official = official_state(state)
    # diffusers' own single-file converter takes our official-named dict back to exactly the diffusers one,
    # so the official names and layouts used here are the ones diffusers reads. (Its converter hard-codes the
    # 3072 split of linear1, so that round trip is checked at full width in the next test.)
    from_diffusers = convert_weights(DIFFUSERS_TRANSFORMER, {k: mx.array(v.numpy()) for k, v in state.items()})
    from_official = convert_weights(OFFICIAL_TRANSFORMER, {k: mx.array(v.numpy()) for k, v in official.items()})
    from_comfy = convert_weights(COMFYUI_TRANSFORMER,
                                 {f"model.diffusion_model.{k}": mx.array(v.numpy()) for k, v in official.items()})
    assert from_official.keys() == from_diffusers.keys() == from_comfy.keys()
    for key, value in from_diffusers.items():
        assert mx.array_equal(from_official[key], value), key
        assert mx.array_equal(from_comfy[key], value), key


def test_official_names_are_diffusers_single_file_names():
    """At the published width (3072, which diffusers' converter assumes), on the meta device."""
    config = tiny_config(num_attention_heads=24, attention_head_dim=128, rope_axes_dim=(16, 56, 56),
                         num_layers=1, num_single_layers=1, mlp_ratio=4.0, text_embed_dim=4096,
                         pooled_projection_dim=768, in_channels=16, out_channels=16)
    with torch.device("meta"):
        reference = HunyuanVideoTransformer3DModel(**config)
    state = reference.state_dict()
    official = official_state(state)
    round_trip = convert_hunyuan_video_transformer_to_diffusers(dict(official))
    assert sorted(round_trip) == sorted(state)
    assert {k: tuple(v.shape) for k, v in round_trip.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_fuse_parts_refuses_gaps():
    with pytest.raises(ValueError):
        fuse_parts({f"a{PART_SEPARATOR}0": mx.zeros((1,)), f"a{PART_SEPARATOR}2": mx.zeros((1,))})
    with pytest.raises(KeyError):
        DIFFUSERS_TRANSFORMER.apply("transformer_blocks.0.attn.to_w.weight", mx.zeros((1,)))


def published_diffusers_config() -> dict:
    return dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def test_full_size_keys_and_shapes():
    config = published_diffusers_config()
    assert transformer_config_from_diffusers(config) == HUNYUAN_T2V_720P
    with torch.device("meta"):
        reference = HunyuanVideoTransformer3DModel(**config)
    state = reference.state_dict()
    # Built lazily: the 12.8B parameters are never evaluated.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(HunyuanTransformer(HUNYUAN_T2V_720P).parameters())}
    total = sum(math.prod(s) for s in ours.values())
    print(f"HunyuanVideo transformer parameters: {total / 1e9:.3f}B")
    assert abs(total - 12.821e9) < 0.001e9  # worked out from Tencent/HunyuanVideo hyvideo/modules/models.py's 13B config

    for keymap, source in [(DIFFUSERS_TRANSFORMER, state), (OFFICIAL_TRANSFORMER, official_state(state))]:
        shapes = {k: tuple(v.shape) for k, v in source.items()}
        assert keymap.unknown_keys(shapes) == []
        converted = convert_weights(keymap, {k: mx.zeros(s) for k, s in shapes.items()})
        mapped = {k: tuple(v.shape) for k, v in converted.items()}
        assert sorted(set(ours) - set(mapped)) == [], "parameters no checkpoint key fills"
        assert sorted(set(mapped) - set(ours)) == [], "checkpoint keys with no parameter"
        assert {k: s for k, s in mapped.items() if s != ours[k]} == {}
