"""Wan2.2-S2V transformer: parity with the official `WanModel_S2V` and the official checkpoint's keys.

The official code (Wan2.2 wan/modules/s2v) is not installable, so its outputs were recorded by
tests/fixtures/s2v/make_reference.py: two tiny random configs (2 heads of 24 / 3 heads of 20, 73 / 9 motion
frames), run on CPU torch in float32 with its flash_attention replaced by exact SDPA. Each file holds the official
state dict under the official key names, the inputs and the outputs of each case.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_video.convert.convert import ComponentPlan, plan_component
from mlx_video.families.wan.s2v_keys import OFFICIAL_S2V_TRANSFORMER
from mlx_video.families.wan.s2v_model import WAN_S2V_14B, WanS2VConfig, WanS2VTransformer
from support.arrays import rel_err_f64
from support.wan_s2v import FIXTURES, Fixture, ours_layout, run

# ||ours - official|| / ||official|| in float32; measured up to ~4e-7.
PARITY_RTOL = 1e-5


@pytest.fixture(scope="module", params=["a", "b"])
def fixture(request):
    fx = Fixture(request.param)
    return fx, fx.model()


def test_forward_matches_official(fixture):
    fx, model = fixture
    for case, spec in fx.cases.items():
        args = ours_layout(fx.inputs(case))
        if case == "no_pose":  # the official pipeline passes all-zero pose latents; ours takes None for that
            assert not np.any(np.asarray(args["cond_latents"]))
            args["cond_latents"] = None
        ours = run(model, args, spec["drop_motion"])
        err = rel_err_f64(ours, fx.arrays[f"{case}/out"])
        assert err <= PARITY_RTOL, f"{case}: relative error {err:.2e}"


def test_prepared_context_matches_official(fixture):
    fx, model = fixture
    args = ours_layout(fx.inputs("full"))
    args["context"] = model.prepare_context(args["context"])
    assert rel_err_f64(run(model, args, False), fx.arrays["full/out"]) <= PARITY_RTOL


def test_batch_of_two_matches_official_single_calls():
    """CFG batches the conditional and the unconditional pass (other text, audio * 0); rows must not mix."""
    fx = Fixture("a")
    model = fx.model()
    cond, uncond = ours_layout(fx.inputs("full")), ours_layout(fx.inputs("uncond"))
    batched = {k: mx.concatenate([cond[k], uncond[k]], axis=0) for k in cond}
    out = run(model, batched, False)
    assert rel_err_f64(out[:1], fx.arrays["full/out"]) <= PARITY_RTOL
    assert rel_err_f64(out[1:], fx.arrays["uncond/out"]) <= PARITY_RTOL


def test_audio_encoder_and_injector_match_official():
    fx = Fixture("a")
    model = fx.model()
    audio = fx.arrays["audio_encoder/in"].astype(mx.float32).transpose(0, 3, 1, 2)
    local, glob = model.audio_encoder(audio)
    assert rel_err_f64(local, fx.arrays["audio_encoder/local"]) <= PARITY_RTOL
    assert rel_err_f64(glob, fx.arrays["audio_encoder/global"][:, :, 0]) <= PARITY_RTOL
    x, tokens, glob = (fx.arrays[f"injector/{k}"].astype(mx.float32) for k in ("x", "audio", "global"))
    assert rel_err_f64(model.audio_injectors[1](x, tokens, glob), fx.arrays["injector/out"]) <= PARITY_RTOL


def test_audio_length_must_match_the_latent_frames():
    fx = Fixture("b")
    model = fx.model()
    args = ours_layout(fx.inputs("full"))
    args["audio"] = args["audio"][:, :4]  # 4 + 9 frames give 1 latent frame of audio, the latents have 2
    with pytest.raises(ValueError, match="latent frames"):
        run(model, args, False)


class _MetaSource:
    """The official full-size state dict's keys and shapes, as `plan_component` reads a checkpoint."""

    def __init__(self, shapes: dict):
        self.shapes, self.what, self.orphans = shapes, "the official S2V state dict", []

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return tuple(self.shapes[key])


def test_full_size_official_keys_map_onto_the_published_model():
    """s2v_14b_keys.json was recorded from the official `WanModel_S2V` built with the published config
    (wan/configs/wan_s2v_14B.py) on torch's meta device. Every key must map onto a parameter of our lazily built
    full-size model with the converted shape, and every parameter must be covered."""
    shapes = json.loads((FIXTURES / "s2v_14b_keys.json").read_text())
    assert len(shapes) == 1260
    model = WanS2VTransformer(WAN_S2V_14B)  # lazy: nothing is materialised
    comp = ComponentPlan("transformer", _MetaSource(shapes), OFFICIAL_S2V_TRANSFORMER, WAN_S2V_14B.to_dict(), model)
    plan_component(comp)
    assert len(comp.tensors) == len(shapes) == len(tree_flatten(model.parameters()))
    assert comp.tensors["audio_encoder.conv1_local.conv.weight"][1:] == ((5120, 3, 1024), "conv1d_channels_last")
    assert comp.tensors["frame_packer.proj_4x.weight"][1] == (5120, 4 * 8 * 8 * 16)


def test_config_round_trip_and_published_numbers():
    cfg = WanS2VConfig.from_dict(json.loads(json.dumps(WAN_S2V_14B.to_dict())))
    assert cfg == WAN_S2V_14B
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim) == (5120, 40, 40, 13824)
    assert cfg.motion_latent_frames == 19 and len(cfg.audio_inject_layers) == 12
