"""Mochi transformer: parity with diffusers' MochiTransformer3DModel (fp32, tiny random configs), the official
key map, and full-size key/shape coverage of both formats."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mlx_video.families.mochi.keys import (  # noqa: E402
    DIFFUSERS_TRANSFORMER,
    OFFICIAL_TRANSFORMER,
    convert_weights,
    transformer_config_from_diffusers,
)
from mlx_video.families.mochi.config import MOCHI_1_PREVIEW  # noqa: E402
from mlx_video.families.mochi.transformer import MochiTransformer, timestep_from_sigma  # noqa: E402
from support.mochi import official_state_dict  # noqa: E402
from support.arrays import rel_err_f64  # noqa: E402

TINY = [
    # heads, head_dim, text width, layers, in channels, T5 width
    dict(num_attention_heads=3, attention_head_dim=20, pooled_projection_dim=36, num_layers=3, in_channels=12, text_embed_dim=48),
    dict(num_attention_heads=2, attention_head_dim=24, pooled_projection_dim=20, num_layers=2, in_channels=4, text_embed_dim=40),
]


def randomize(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") and "linear" not in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name == "pos_frequencies":
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(max(p.shape[-1], 1)))


def tiny_reference(tmp_path, kwargs, seed):
    model = diffusers.MochiTransformer3DModel(time_embed_dim=32, **kwargs).eval()
    randomize(model, seed)
    model.save_pretrained(tmp_path)
    return model


def load_ours(path, config, keymap=DIFFUSERS_TRANSFORMER, weights=None):
    if weights is None:
        weights = mx.load(str(path / "diffusion_pytorch_model.safetensors"))
    converted = convert_weights(keymap, weights)
    model = MochiTransformer(config)
    expected = dict(tree_flatten(model.parameters()))
    assert set(converted) == set(expected), (set(expected) - set(converted), set(converted) - set(expected))
    for k, v in converted.items():
        assert v.shape == expected[k].shape, (k, v.shape, expected[k].shape)
    model.load_weights(list(converted.items()), strict=True)
    return model


def run_both(ref, ours, latents, sigmas, text, mask):
    t = torch.tensor([timestep_from_sigma(s) for s in sigmas], dtype=torch.float32)
    with torch.no_grad():
        expected = ref(
            hidden_states=torch.from_numpy(latents),
            encoder_hidden_states=torch.from_numpy(text),
            timestep=t,
            encoder_attention_mask=torch.from_numpy(mask),
            return_dict=False,
        )[0].numpy()
    got = ours(
        mx.array(latents.transpose(0, 2, 3, 4, 1)),
        mx.array(t.numpy()),
        mx.array(text),
        mx.array(mask),
    )
    return np.array(got).transpose(0, 4, 1, 2, 3), expected


@pytest.mark.parametrize("case", [0, 1])
def test_parity_with_diffusers(tmp_path, case):
    kwargs = TINY[case]
    ref = tiny_reference(tmp_path, kwargs, seed=case)
    import json

    config = transformer_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert config.dim == kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    ours = load_ours(tmp_path, config)
    rng = np.random.default_rng(10 + case)
    c = kwargs["in_channels"]
    text_len = 7
    # (batch, frames, height, width, valid text tokens per sample, sigmas)
    shapes = [
        (2, 3, 4, 6, [5, 7], [1.0, 0.35]),
        (1, 2, 6, 4, [3], [0.6]),  # batch 1: padding dropped
        (1, 1, 2, 8, [0], [0.02]),  # empty prompt: visual tokens only
        (3, 5, 2, 2, [0, 2, 7], [0.9, 0.5, 0.0]),
    ]
    for batch, frames, height, width, valid, sigmas in shapes:
        latents = rng.standard_normal((batch, c, frames, height, width)).astype(np.float32)
        text = rng.standard_normal((batch, text_len, kwargs["text_embed_dim"])).astype(np.float32)
        mask = np.zeros((batch, text_len), dtype=bool)
        for i, n in enumerate(valid):
            mask[i, :n] = True
        got, expected = run_both(ref, ours, latents, sigmas, text, mask)
        assert got.shape == expected.shape
        err = rel_err_f64(got, expected)
        assert err <= 1e-5, (batch, frames, height, width, valid, err)


def test_blockwise_api_matches_call(tmp_path):
    kwargs = TINY[0]
    tiny_reference(tmp_path, kwargs, seed=3)
    import json

    ours = load_ours(tmp_path, transformer_config_from_diffusers(json.loads((tmp_path / "config.json").read_text())))
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 2, 4, 4, 12)).astype(np.float32))
    text = mx.array(rng.standard_normal((2, 5, 48)).astype(np.float32))
    mask = mx.array(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool))
    t = mx.array([100.0, 700.0])
    state = ours.embed(x, t, text, mask)
    hx, hy = state.x, state.y
    for block in ours.blocks:
        hx, hy = block(hx, hy, state)
    manual = ours.head(hx, state)
    assert np.array_equal(np.array(manual), np.array(ours(x, t, text, mask)))
    # The last block leaves the text stream alone.
    _, y_last = ours.blocks[-1](hx, hy, state)
    assert y_last is hy


def test_official_names_give_the_same_model(tmp_path):
    kwargs = TINY[1]
    ref = tiny_reference(tmp_path, kwargs, seed=7)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    official = official_state_dict(sd, kwargs["num_layers"])
    assert len(official) == len(sd) - 4 * kwargs["num_layers"]  # q/k/v fused per stream
    import json

    config = transformer_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    ours = load_ours(tmp_path, config, OFFICIAL_TRANSFORMER, {k: mx.array(v.numpy()) for k, v in official.items()})
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, 4, 3, 4, 4)).astype(np.float32)
    text = rng.standard_normal((2, 6, 40)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    got, expected = run_both(ref, ours, latents, [0.8, 0.1], text, mask)
    assert rel_err_f64(got, expected) <= 1e-5


def test_unknown_keys_and_missing_parts_are_refused():
    with pytest.raises(KeyError):
        convert_weights(DIFFUSERS_TRANSFORMER, {"transformer_blocks.0.attn1.to_qkv.weight": mx.zeros((3, 3))})
    with pytest.raises(KeyError):
        convert_weights(OFFICIAL_TRANSFORMER, {"blocks.0.attn.qkv_z.weight": mx.zeros((3, 3))})
    with pytest.raises(ValueError, match="parts"):  # q and v without k
        convert_weights(
            DIFFUSERS_TRANSFORMER,
            {f"transformer_blocks.0.attn1.to_{c}.weight": mx.zeros((3, 3)) for c in "qv"},
        )


def _shapes_after(keymap, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Converted names and shapes, transforming zero-strided stand-ins (nothing is materialised)."""
    stand_ins = {k: mx.broadcast_to(mx.zeros((1,) * len(s)), s) for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in convert_weights(keymap, stand_ins).items()}


def test_full_size_key_and_shape_coverage():
    with torch.device("meta"):
        ref = diffusers.MochiTransformer3DModel()
    diffusers_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = transformer_config_from_diffusers(dict(ref.config))
    assert config == MOCHI_1_PREVIEW
    ours = dict(tree_flatten(MochiTransformer(config).parameters()))  # MLX arrays are lazy: nothing is filled
    ours_shapes = {k: tuple(v.shape) for k, v in ours.items()}

    assert DIFFUSERS_TRANSFORMER.unknown_keys(diffusers_shapes) == []
    assert _shapes_after(DIFFUSERS_TRANSFORMER, diffusers_shapes) == ours_shapes

    with torch.device("meta"):
        official = official_state_dict(dict(ref.state_dict()), config.num_layers)
    official_shapes = {k: tuple(v.shape) for k, v in official.items()}
    assert official_shapes["blocks.0.attn.qkv_x.weight"] == ours_shapes["blocks.0.attn.qkv_x.weight"] == (3 * 3072, 3072)
    assert official_shapes["blocks.47.mod_y.weight"] == (1536, 3072)
    assert "blocks.47.attn.proj_y.weight" not in official_shapes
    assert OFFICIAL_TRANSFORMER.unknown_keys(official_shapes) == []
    assert _shapes_after(OFFICIAL_TRANSFORMER, official_shapes) == ours_shapes
    total = sum(math.prod(s) for s in ours_shapes.values())
    assert abs(total / 1e9 - 10.03) < 0.01  # worked out from genmo/mochi's DiT config: 10.028B


def test_runs_in_bfloat16_with_fp32_rope(tmp_path):
    """bf16 weights and compute dtype (pos_frequencies kept fp32): close to the fp32 run, no NaN."""
    import json

    from mlx.utils import tree_map_with_path

    kwargs = TINY[0]
    tiny_reference(tmp_path, kwargs, seed=11)
    config = transformer_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    ours = load_ours(tmp_path, config)
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((2, 3, 4, 6, 12)).astype(np.float32))
    text = mx.array(rng.standard_normal((2, 7, 48)).astype(np.float32))
    mask = mx.array(np.arange(7)[None, :] < np.array([[4], [7]]))
    t = mx.array([timestep_from_sigma(0.7), timestep_from_sigma(0.2)])
    full = np.array(ours(x, t, text, mask))
    ours.update(
        tree_map_with_path(lambda p, v: v if p == "pos_frequencies" else v.astype(mx.bfloat16), ours.parameters())
    )
    ours.compute_dtype = mx.bfloat16
    assert ours.pos_frequencies.dtype == mx.float32
    half = ours(x, t, text, mask)
    assert half.dtype == mx.float32
    half = np.array(half)
    assert np.isfinite(half).all()
    assert rel_err_f64(half, full) < 3e-2
