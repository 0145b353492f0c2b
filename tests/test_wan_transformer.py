"""Wan 2.2 transformer: numerical parity with diffusers' WanTransformer3DModel, RoPE, and key maps."""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from mlx.utils import tree_flatten

from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER, transformer_config_from_diffusers
from mlx_video.families.wan.config import WAN_A14B_I2V, WAN_A14B_T2V, WAN_TI2V_5B
from mlx_video.families.wan.transformer import WanTransformer, sinusoid_frequencies, sinusoidal_embedding
from mlx_video.nn.attention import attention
from mlx_video.nn.rope import apply_rope_interleaved, rope_tables_3d

# Worst relative error ||ours - ref|| / ||ref|| allowed against diffusers in float32. Measured ~3e-7.
PARITY_RTOL = 1e-5


def tiny_config(**overrides) -> dict:
    """A small diffusers config exercising every path: 2 layers, 2 heads of 20 (RoPE split 8/6/6)."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=20,
        in_channels=12,
        out_channels=8,
        text_dim=24,
        freq_dim=32,
        ffn_dim=56,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    config.update(overrides)
    return config


def published_configs() -> dict:
    common = dict(
        patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    a14b = dict(common, num_attention_heads=40, ffn_dim=13824, num_layers=40)
    return {
        "T2V-A14B": (dict(a14b, in_channels=16, out_channels=16), WAN_A14B_T2V),
        "I2V-A14B": (dict(a14b, in_channels=36, out_channels=16), WAN_A14B_I2V),
        "TI2V-5B": (
            dict(common, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
            WAN_TI2V_5B,
        ),
    }


class Float64Sinusoid(torch.nn.Module):
    """The official sinusoidal_embedding_1d ([cos, sin], float64), replacing diffusers' float32 one."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        t = t.to(torch.float64)
        angles = torch.outer(t, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def random_reference(config: dict, seed: int, official_sinusoid: bool = True) -> WanTransformer3DModel:
    """diffusers model with every parameter randomised (norm weights and modulation tables included)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "norm" in name:  # RMSNorm / affine LayerNorm weights and biases
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    if official_sinusoid:
        model.condition_embedder.timesteps_proj = Float64Sinusoid(config["freq_dim"])
    return model


def convert_state_dict(keymap, state_dict: dict) -> dict[str, mx.array]:
    out = {}
    for key, tensor in state_dict.items():
        converted = keymap.apply(key, mx.array(tensor.detach().float().numpy()))
        if converted is not None:
            assert converted[0] not in out, f"two source keys map onto {converted[0]}"
            out[converted[0]] = converted[1]
    return out


def ours_from_reference(reference: WanTransformer3DModel) -> WanTransformer:
    model = WanTransformer(transformer_config_from_diffusers(dict(reference.config)))
    model.load_weights(list(convert_state_dict(DIFFUSERS_TRANSFORMER, reference.state_dict()).items()), strict=True)
    return model


def relative_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)), float(np.abs(ours - ref).max())


def padded_context(rng: np.random.Generator, batch: int, length: int, dim: int, real_lengths: list[int]) -> np.ndarray:
    context = rng.standard_normal((batch, length, dim)).astype(np.float32)
    for b, n in enumerate(real_lengths):
        context[b, n:] = 0.0
    return context


def run_both(reference, ours, latents, timestep_ref, timestep_ours, context):
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(latents).permute(0, 4, 1, 2, 3),
            torch.from_numpy(timestep_ref),
            torch.from_numpy(context),
            return_dict=False,
        )[0].permute(0, 2, 3, 4, 1).numpy()
    got = ours(mx.array(latents), mx.array(timestep_ours), mx.array(context))
    assert got.dtype == mx.float32 and got.shape == expected.shape
    return np.array(got), expected


# Latents with odd post-patch grid (3, 3, 5); batch 2 with different timesteps; zero-padded text rows.
T, H, W = 3, 6, 10


def test_parity_a14b_style():
    reference = random_reference(tiny_config(), seed=0)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, T, H, W, 12)).astype(np.float32)
    context = padded_context(rng, 2, 7, 24, real_lengths=[4, 6])
    timestep = np.array([999.0, 250.0], dtype=np.float32)
    got, expected = run_both(reference, ours, latents, timestep, timestep, context)
    rel, max_abs = relative_error(got, expected)
    print(f"A14B-style parity: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel < PARITY_RTOL


@pytest.mark.parametrize("image_mode", [True, False])
def test_parity_ti2v_style_per_frame_timesteps(image_mode):
    config = tiny_config(in_channels=16, out_channels=16)
    reference = random_reference(config, seed=1)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, T, H, W, 16)).astype(np.float32)
    context = padded_context(rng, 2, 5, 24, real_lengths=[2, 5])
    per_frame = np.array([[700.0] * T, [300.0] * T], dtype=np.float32)
    if image_mode:
        per_frame[:, 0] = 0.0  # the conditioning frame is clean
    tokens_per_frame = (H // 2) * (W // 2)
    per_token = np.repeat(per_frame, tokens_per_frame, axis=1)  # diffusers wants (B, seq_len)
    got, expected = run_both(reference, ours, latents, per_token, per_frame, context)
    rel, max_abs = relative_error(got, expected)
    print(f"TI2V-style parity (image_mode={image_mode}): rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel < PARITY_RTOL


def test_parity_with_stock_diffusers_float32_sinusoid():
    """diffusers computes the timestep sinusoid in float32 (up to ~6e-5 off at t=999); the official model and
    ours are closer to float64, so against stock diffusers the bound is looser. Measured ~2e-6."""
    reference = random_reference(tiny_config(), seed=2, official_sinusoid=False)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, T, H, W, 12)).astype(np.float32)
    context = padded_context(rng, 2, 7, 24, real_lengths=[7, 3])
    timestep = np.array([999.0, 517.25], dtype=np.float32)
    got, expected = run_both(reference, ours, latents, timestep, timestep, context)
    rel, max_abs = relative_error(got, expected)
    print(f"parity vs stock diffusers sinusoid: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel < 2e-5


@pytest.mark.parametrize(
    "heads, head_dim, length, real_lengths",
    [(2, 20, 7, [2, 5]), (3, 12, 40, [5, 17]), (4, 10, 33, [33, 2])],  # one sample unpadded in the last
)
def test_prepared_context_folds_the_padding(heads, head_dim, length, real_lengths):
    """The prepared context keeps each sample's rows and one padding row (its key raised by log(padding));
    against diffusers attending to every padding row it is the same computation to float rounding."""
    config = tiny_config(num_attention_heads=heads, attention_head_dim=head_dim)
    reference = random_reference(config, seed=4 + heads)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(heads)
    latents = rng.standard_normal((2, T, H, W, 12)).astype(np.float32)
    context = padded_context(rng, 2, length, 24, real_lengths=real_lengths)
    timestep = np.array([800.0, 400.0], dtype=np.float32)
    _, expected = run_both(reference, ours, latents, timestep, timestep, context)
    prepared = ours.prepare_context(mx.array(context))
    keys = max(n + (n < length) for n in real_lengths)
    assert prepared.text.shape[1] == keys and prepared.kv[0].k.shape[1] == keys <= length
    got = np.array(ours(mx.array(latents), mx.array(timestep), prepared))
    rel, max_abs = relative_error(got, expected)
    print(f"folded padding ({length} -> {keys} keys) vs diffusers: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel < PARITY_RTOL
    # The bias is what keeps it exact: without it the padding counts as one key, not many.
    unbiased = [kv._replace(bias=mx.where(mx.isinf(kv.bias), kv.bias, 0.0)) for kv in prepared.kv]
    wrong = np.array(ours(mx.array(latents), mx.array(timestep), type(prepared)(prepared.text, unbiased)))
    assert relative_error(wrong, expected)[0] > 100 * PARITY_RTOL


def test_prepared_context_in_bf16_stays_close():
    """bf16 compute: the folded bias is rounded to bf16 like the scores. The folded run is no further from the
    float32 model than the unfolded bf16 run (measured 3.87e-3 against 3.89e-3; 1.5e-3 between them)."""
    reference = random_reference(tiny_config(), seed=9)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(9)
    latents = mx.array(rng.standard_normal((2, T, H, W, 12)).astype(np.float32))
    context = mx.array(padded_context(rng, 2, 64, 24, real_lengths=[3, 11]))
    timestep = mx.array([900.0, 100.0])
    exact = np.array(ours(latents, timestep, context))
    ours.set_dtype(mx.bfloat16)
    ours.set_compute_dtype(mx.bfloat16)
    latents, context = latents.astype(mx.bfloat16), context.astype(mx.bfloat16)
    prepared = ours.prepare_context(context)
    assert prepared.kv[0].k.dtype == mx.bfloat16 and prepared.kv[0].k.shape[1] == 12
    unfolded = relative_error(np.array(ours(latents, timestep, context)), exact)[0]
    folded = relative_error(np.array(ours(latents, timestep, prepared)), exact)[0]
    print(f"bf16 vs fp32: folded {folded:.2e}, unfolded {unfolded:.2e}")
    assert folded < 1.25 * unfolded < 2e-2


def test_bf16_close_to_fp32():
    """bf16 parameters (8-bit mantissa) with a float32 residual stream and float32 modulation: the output
    stays close to the float32 model. Measured ~4e-3 relative; the bound leaves room for other seeds."""
    reference = random_reference(tiny_config(), seed=3)
    ours = ours_from_reference(reference)
    rng = np.random.default_rng(3)
    latents = mx.array(rng.standard_normal((2, T, H, W, 12)).astype(np.float32))
    context = mx.array(padded_context(rng, 2, 7, 24, real_lengths=[4, 7]))
    timestep = mx.array([900.0, 100.0])
    full = np.array(ours(latents, timestep, context))
    ours.set_dtype(mx.bfloat16)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(ours.parameters()))
    half = ours(latents.astype(mx.bfloat16), timestep, context.astype(mx.bfloat16))
    assert half.dtype == mx.float32
    half = np.array(half)
    assert np.isfinite(half).all()
    rel, max_abs = relative_error(half, full)
    print(f"bf16 vs fp32: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel < 2e-2


def test_sinusoid_close_to_float64():
    half = 128
    freq_head, freq_tail = sinusoid_frequencies(2 * half)
    freqs = 10000.0 ** (-np.arange(half) / half)
    for t, bound in [(np.arange(0, 1001, dtype=np.float32), 1e-6), (np.float32([0.5, 123.456, 987.654]), 1e-4)]:
        angles = np.outer(t.astype(np.float64), freqs)
        expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
        got = np.array(sinusoidal_embedding(mx.array(t), freq_head, freq_tail))
        err = np.abs(got - expected).max()
        print(f"sinusoid max abs error vs float64 ({len(t)} timesteps): {err:.2e}")
        assert err < bound


def complex_rope_reference(x: np.ndarray, grid, axis_dims, theta) -> np.ndarray:
    """Rotate interleaved pairs of x (B, L, heads, D) as complex numbers, in float64."""
    rotations = []
    for axis, (size, dims) in enumerate(zip(grid, axis_dims)):
        freqs = theta ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
        positions = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
        rotations.append(np.exp(1j * positions[:, axis : axis + 1] * freqs[None, :]))
    rotation = np.concatenate(rotations, axis=1)  # (L, D/2)
    z = x.astype(np.float64).reshape(*x.shape[:-1], -1, 2)
    z = (z[..., 0] + 1j * z[..., 1]) * rotation[None, :, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


@pytest.mark.parametrize(
    "head_dim,axis_dims,theta",
    [(128, None, 10000.0), (20, None, 10000.0), (128, (16, 56, 56), 256.0)],  # Wan, tiny Wan, HunyuanVideo
)
def test_rope_matches_complex_float64(head_dim, axis_dims, theta):
    grid = (3, 5, 7)
    cos, sin = rope_tables_3d(grid, head_dim, theta=theta, axis_dims=axis_dims)
    assert cos.shape == sin.shape == (math.prod(grid), head_dim // 2) and cos.dtype == mx.float32
    if axis_dims is None:
        axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    x = np.random.default_rng(0).standard_normal((2, math.prod(grid), 3, head_dim)).astype(np.float32)
    expected = complex_rope_reference(x, grid, axis_dims, theta)
    got = apply_rope_interleaved(mx.array(x), cos, sin)
    assert got.dtype == mx.float32
    rel, max_abs = relative_error(np.array(got), expected)
    print(f"RoPE head_dim={head_dim} dims={axis_dims}: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert max_abs < 1e-5
    assert apply_rope_interleaved(mx.array(x).astype(mx.bfloat16), cos, sin).dtype == mx.bfloat16


def test_rope_tables_match_diffusers():
    reference = random_reference(tiny_config(), seed=4)
    with torch.no_grad():
        ref_cos, ref_sin = reference.rope(torch.zeros(1, 12, T, H, W))
    cos, sin = rope_tables_3d((T, H // 2, W // 2), 20)
    # diffusers repeats each angle for both members of a pair
    np.testing.assert_allclose(np.array(cos), ref_cos[0, :, 0, 0::2].numpy(), atol=1e-7)
    np.testing.assert_allclose(np.array(sin), ref_sin[0, :, 0, 1::2].numpy(), atol=1e-7)


def test_attention_with_mask():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
    additive = np.where(rng.random((2, 1, 5, 7)) < 0.3, -np.inf, 0.0).astype(np.float32)
    additive[..., 0] = 0.0  # every query sees at least one key
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8) + additive
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 24)
    for mask in (mx.array(additive), mx.array(additive == 0)):
        got = attention(mx.array(q), mx.array(k), mx.array(v), mask=mask)
        np.testing.assert_allclose(np.array(got), expected, atol=1e-5)


# --- key maps -----------------------------------------------------------------------------------------

_OFFICIAL_NAMES = [  # diffusers -> official / ComfyUI (huggingface/diffusers scripts/convert_wan_to_diffusers.py, inverted), applied to whole keys
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.(?:to_)?", ".self_attn."),
    (r"\.attn2\.(?:to_)?", ".cross_attn."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def official_key(diffusers_key: str) -> str:
    for pattern, replacement in _OFFICIAL_NAMES:
        diffusers_key = re.sub(pattern, replacement, diffusers_key)
    return diffusers_key


def test_official_names_convert_like_diffusers():
    state = random_reference(tiny_config(), seed=5).state_dict()
    from_diffusers = convert_state_dict(DIFFUSERS_TRANSFORMER, state)
    from_official = convert_state_dict(OFFICIAL_TRANSFORMER, {official_key(k): v for k, v in state.items()})
    assert from_official.keys() == from_diffusers.keys()
    for key, value in from_diffusers.items():
        assert mx.array_equal(from_official[key], value), key


@pytest.mark.parametrize("name", list(published_configs()))
def test_full_size_keys_and_shapes(name):
    diffusers_config, expected_config = published_configs()[name]
    assert transformer_config_from_diffusers(diffusers_config) == expected_config
    with torch.device("meta"):
        reference = WanTransformer3DModel(**diffusers_config)
    source_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # Built lazily: the 14B parameters are never evaluated.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(WanTransformer(expected_config).parameters())}

    for keymap, shapes in [
        (DIFFUSERS_TRANSFORMER, source_shapes),
        (OFFICIAL_TRANSFORMER, {official_key(k): s for k, s in source_shapes.items()}),
    ]:
        assert keymap.unknown_keys(shapes) == []
        mapped = {}
        for key, shape in shapes.items():
            target, value = keymap.apply(key, mx.zeros(shape))
            assert target not in mapped, f"two source keys map onto {target}"
            mapped[target] = tuple(value.shape)
        assert sorted(set(ours) - set(mapped)) == [], "parameters no checkpoint key fills"
        assert sorted(set(mapped) - set(ours)) == [], "checkpoint keys with no parameter"
        assert {k: s for k, s in mapped.items() if s != ours[k]} == {}


def test_config_refusals():
    for bad in [
        dict(image_dim=1280),
        dict(added_kv_proj_dim=5120),
        dict(pos_embed_seq_len=514),
        dict(qk_norm="rms_norm"),
        dict(cross_attn_norm=False),
    ]:
        with pytest.raises(ValueError):
            transformer_config_from_diffusers(tiny_config(**bad))
    assert transformer_config_from_diffusers(tiny_config(out_channels=None)).out_channels == 12


def test_input_validation():
    model = WanTransformer(transformer_config_from_diffusers(tiny_config()))
    latents, context = mx.zeros((2, T, H, W, 12)), mx.zeros((2, 4, 24))
    for timestep in (mx.zeros((2, T + 1)), mx.zeros((3,)), mx.zeros((2, T, 1))):
        with pytest.raises(ValueError):
            model(latents, timestep, context)
    with pytest.raises(ValueError):
        model(mx.zeros((2, T, H + 1, W, 12)), mx.zeros((2,)), context)
