"""wav2vec2 (stable-layer-norm, xlsr-53 architecture) against transformers' Wav2Vec2ForCTC on CPU torch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_video.audio.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from mlx_video.families.wan.wav2vec2_keys import TRANSFORMERS_WAV2VEC2, convert_wav2vec2_weights, fold_weight_norm
from support.arrays import rel_err_f64

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two tiny configs that differ in every width: head widths 24 and 20 (not a power of two), an even and an odd
# positional kernel (the even one drops a padded step), different conv stacks and group counts.
TINY = [
    dict(hidden_size=72, num_attention_heads=3, intermediate_size=100, num_hidden_layers=3,
         conv_dim=(24, 20, 28), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    dict(hidden_size=100, num_attention_heads=5, intermediate_size=84, num_hidden_layers=2,
         conv_dim=(32, 36), conv_kernel=(7, 4), conv_stride=(3, 2),
         num_conv_pos_embeddings=9, num_conv_pos_embedding_groups=5),
]
# wav2vec2-large-xlsr-53-english (jonatasgrosman), the model Wan2.2-S2V ships.
XLSR_53 = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33,
)
STABLE = dict(do_stable_layer_norm=True, feat_extract_norm="layer", feat_extract_activation="gelu", hidden_act="gelu")


def reference_model(tiny: dict, seed: int):
    config = transformers.Wav2Vec2Config(**tiny, **STABLE, conv_bias=True, vocab_size=11,
                                         hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                         feat_proj_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    # Non-trivial norms and biases, and a weight-norm magnitude that differs from ||v|| per kernel tap.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "original0" in name or name.endswith("weight_g"):
                p.copy_(p + 0.3 * torch.randn_like(p))
    return model


def reference_states(model, waveform: np.ndarray) -> list[np.ndarray]:
    """Hidden states as transformers 4.x (the official S2V pin) returns them: layer inputs, then the final norm.

    transformers 5 returns the last layer's output before the final LayerNorm as its last state; in both
    versions the first num_layers states are the layer inputs and last_hidden_state is the normed output.
    """
    with torch.no_grad():
        out = model.wav2vec2(torch.from_numpy(waveform), output_hidden_states=True)
    layers = model.config.num_hidden_layers
    states = list(out.hidden_states[:layers]) + [out.last_hidden_state]
    return [s.numpy() for s in states]


def load_converted(model, tmp_path) -> Wav2Vec2Model:
    model.save_pretrained(tmp_path)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    config_json = model.config.to_dict()
    ours = Wav2Vec2Model(Wav2Vec2Config.from_transformers(config_json))
    ours.load_weights(list(convert_wav2vec2_weights(weights).items()), strict=True)
    return ours


@pytest.mark.parametrize("index", range(len(TINY)))
def test_every_hidden_state_matches_transformers(tmp_path, index):
    model = reference_model(TINY[index], seed=index)
    ours = load_converted(model, tmp_path)
    rng = np.random.default_rng(index)
    for num_samples in (1999, 3217):
        waveform = rng.standard_normal((1, num_samples)).astype(np.float32)
        ref = reference_states(model, waveform)
        got = ours.hidden_states(mx.array(waveform))
        assert len(got) == len(ref) == TINY[index]["num_hidden_layers"] + 1
        assert got[0].shape[1] == ours.config.output_length(num_samples)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape, i
            err = rel_err_f64(np.array(g), r)
            assert err <= 1e-5, f"hidden state {i}: relative error {err:.2e}"


def test_legacy_weight_g_weight_v_checkpoint(tmp_path):
    """Older checkpoints (torch.nn.utils.weight_norm) store weight_g / weight_v; both spellings convert alike."""
    model = reference_model(TINY[0], seed=5)
    state = {k: mx.array(v.numpy()) for k, v in model.state_dict().items()}
    legacy = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        legacy[key] = value
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in legacy
    new, old = convert_wav2vec2_weights(state), convert_wav2vec2_weights(legacy)
    assert new.keys() == old.keys()
    np.testing.assert_array_equal(np.array(new["encoder.pos_conv_embed.conv.weight"]),
                                  np.array(old["encoder.pos_conv_embed.conv.weight"]))
    # The folded weight is the one the reference convolves with (torch layout: out, in/groups, kernel).
    folded = np.array(new["encoder.pos_conv_embed.conv.weight"]).transpose(0, 2, 1)
    np.testing.assert_allclose(folded, model.wav2vec2.encoder.pos_conv_embed.conv.weight.detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="incomplete"):
        convert_wav2vec2_weights({k: v for k, v in legacy.items() if not k.endswith("weight_v")})


def test_fold_weight_norm_matches_torch():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((12, 3, 5)).astype(np.float32)
    g = rng.standard_normal((1, 1, 5)).astype(np.float32)
    expected = torch._weight_norm(torch.from_numpy(v), torch.from_numpy(g), 2).numpy()
    np.testing.assert_allclose(np.array(fold_weight_norm(mx.array(g), mx.array(v))), expected, rtol=1e-6)


def test_unknown_keys_and_other_variants_are_refused():
    with pytest.raises(KeyError, match="quantizer"):
        convert_wav2vec2_weights({"quantizer.codevectors": mx.zeros((1, 2, 3))})
    base = transformers.Wav2Vec2Config().to_dict()  # wav2vec2-base: group norm, post-LN encoder
    with pytest.raises(ValueError, match="do_stable_layer_norm"):
        Wav2Vec2Config.from_transformers(base)


def test_full_size_xlsr53_keys_and_shapes():
    """Every tensor of the full-size Wav2Vec2ForCTC maps onto a parameter of the same (converted) shape."""
    config = transformers.Wav2Vec2Config(**XLSR_53, **STABLE)
    with torch.device("meta"):
        reference = transformers.Wav2Vec2ForCTC(config)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert any("pos_conv_embed.conv.parametrizations" in k or k.endswith("weight_g") for k in shapes)
    # Lazy stand-ins: nothing is allocated unless evaluated, and only shapes are read.
    converted = convert_wav2vec2_weights({k: mx.zeros(s) for k, s in shapes.items()})

    ours = Wav2Vec2Model(Wav2Vec2Config.from_transformers(config.to_dict()))
    assert ours.config == Wav2Vec2Config()  # our defaults are the xlsr-53 shapes
    expected = {k: tuple(v.shape) for k, v in tree_flatten(ours.parameters())}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    ignored = {k for k in shapes if TRANSFORMERS_WAV2VEC2.is_ignored(k)}
    assert ignored == {"lm_head.weight", "lm_head.bias"} | ({"wav2vec2.masked_spec_embed"} & shapes.keys())
    # Nothing dropped but the head, the mask embedding and the weight-norm magnitude (folded into the weight).
    magnitude = [k for k in shapes if k.endswith(("weight_g", "original0"))]
    dropped = sum(int(np.prod(shapes[k])) for k in ignored | set(magnitude))
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(int(np.prod(s)) for s in expected.values()) == total - dropped
