"""Config dataclasses read from config.json check each known field's type and name the culprit."""

from __future__ import annotations

import pytest

from mlx_video.errors import MlxVideoError
from mlx_video.families.mochi.config import MochiVAEConfig
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.vae import WanVAEConfig
from mlx_video.json_config import ConfigSource


def test_round_trip_through_json_types():
    config = WanTransformerConfig(num_layers=3, patch_size=(1, 2, 2), eps=1e-5)
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    assert WanTransformerConfig.from_dict(as_json) == config


def test_unknown_fields_are_ignored_and_integers_become_floats():
    config = WanTransformerConfig.from_dict({"_class_name": "WanTransformer3DModel", "eps": 0, "dim": 64})
    assert config.eps == 0.0 and isinstance(config.eps, float) and config.dim == 64


@pytest.mark.parametrize("field, value, expected", [
    ("num_layers", "40", "expected an integer"),
    ("num_layers", 40.0, "expected an integer"),
    ("num_layers", True, "expected an integer"),
    ("eps", "1e-6", "expected a number"),
    ("patch_size", [1, 2], "expected a list of 3 values"),
    ("patch_size", 2, "expected a list of 3 values"),
    ("patch_size", [1, "2", 2], "expected a list of 3 values"),
])
def test_wrong_types_name_the_field_value_and_type(field, value, expected):
    with pytest.raises(MlxVideoError) as e:
        WanTransformerConfig.from_dict({field: value})
    assert f"{field!r} is {value!r}" in str(e.value) and expected in str(e.value)
    assert "WanTransformerConfig" in str(e.value)  # no file known: the config's class is named instead


def test_the_source_file_is_named_when_known():
    data = ConfigSource({"base_dim": "96"}, "models/x/vae/config.json")
    with pytest.raises(MlxVideoError, match=r"^models/x/vae/config.json: 'base_dim' is '96'; expected an integer"):
        WanVAEConfig.from_dict(data)


def test_optional_and_variable_length_fields():
    assert WanVAEConfig.from_dict({"decoder_base_dim": None}).decoder_base_dim is None
    assert WanVAEConfig.from_dict({"decoder_base_dim": 64}).decoder_base_dim == 64
    with pytest.raises(MlxVideoError, match="expected an integer or null"):
        WanVAEConfig.from_dict({"decoder_base_dim": "64"})
    config = MochiVAEConfig.from_dict({"encoder_channels": [8, 16, 24, 32]})
    assert config.encoder_channels == (8, 16, 24, 32)
    with pytest.raises(MlxVideoError, match="expected a list of integers"):
        MochiVAEConfig.from_dict({"encoder_channels": [8, 16.5]})
    with pytest.raises(MlxVideoError, match="expected a list of booleans"):
        MochiVAEConfig.from_dict({"encoder_attention": [1, 0, 0, 0, 0]})


def test_inconsistent_values_are_refused_naming_the_file():
    data = ConfigSource({"temporal_downsample": [True, True]}, "vae/config.json")
    with pytest.raises(MlxVideoError, match=r"^vae/config.json: temporal_downsample needs 3 entries"):
        WanVAEConfig.from_dict(data)
