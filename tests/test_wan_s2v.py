"""Wan2.2-S2V transformer: parity with the official `WanModel_S2V` and the official checkpoint's keys.

The official code (Wan2.2 wan/modules/s2v) is not installable, so its outputs were recorded by
tests/fixtures/s2v/make_reference.py: two tiny random configs (2 heads of 24 / 3 heads of 20, 73 / 9 motion
frames), run on CPU torch in float32 with its flash_attention replaced by exact SDPA. Each file holds the official
state dict under the official key names, the inputs and the outputs of each case.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_video.convert.convert import ComponentPlan, plan_component
from mlx_video.convert.rules import convert_weights
from mlx_video.families.wan.s2v_keys import OFFICIAL_S2V_TRANSFORMER, s2v_config_from_official
from mlx_video.families.wan.s2v_model import WAN_S2V_14B, WanS2VConfig, WanS2VTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "s2v"
# ||ours - official|| / ||official|| in float32; measured up to ~4e-7.
PARITY_RTOL = 1e-5


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


class Fixture:
    def __init__(self, name: str):
        arrays, meta = mx.load(str(FIXTURES / f"s2v_{name}.safetensors"), return_metadata=True)
        self.arrays = arrays
        self.official_config = json.loads(meta["config"])
        self.cases = json.loads(meta["cases"])
        scales = json.loads(meta["scales"])
        state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
        self.state = {k: v.astype(mx.float32) * scales[k] for k, v in state.items()}

    def inputs(self, case: str) -> dict:
        """The case's inputs in the official layouts (its own, else those of the case it was derived from)."""
        spec = self.cases[case]
        base = {} if spec["inputs_from"] is None else self.inputs(spec["inputs_from"])
        prefix = f"{case}/in/"
        own = {k[len(prefix):]: v.astype(mx.float32) for k, v in self.arrays.items() if k.startswith(prefix)}
        return {**base, **own}

    def model(self) -> WanS2VTransformer:
        config = s2v_config_from_official(self.official_config)
        model = WanS2VTransformer(config)
        weights = convert_weights(OFFICIAL_S2V_TRANSFORMER, self.state)
        expected = dict(tree_flatten(model.parameters()))
        assert set(weights) == set(expected)
        assert all(weights[k].shape == expected[k].shape for k in weights)
        model.update(tree_unflatten(list(weights.items())))
        return model


def ours_layout(inputs: dict) -> dict:
    """Official channels-first tensors -> our keyword arguments (channels-last, audio (B, F, layers, dim))."""
    to_last = lambda a: a.transpose(0, 2, 3, 4, 1)  # noqa: E731
    return dict(
        x=to_last(inputs["x"]), timestep=inputs["t"], context=inputs["context"],
        ref_latents=to_last(inputs["ref"]), motion_latents=to_last(inputs["motion"]),
        cond_latents=to_last(inputs["cond"]), audio=inputs["audio"].transpose(0, 3, 1, 2),
    )


def run(model, args: dict, drop_motion: bool) -> mx.array:
    args = dict(args)
    out = model(args.pop("x"), args.pop("timestep"), args.pop("context"), drop_motion=drop_motion, **args)
    return out.transpose(0, 4, 1, 2, 3)  # back to (B, C, T, H, W)


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
        err = rel_err(ours, fx.arrays[f"{case}/out"])
        assert err <= PARITY_RTOL, f"{case}: relative error {err:.2e}"


def test_prepared_context_matches_official(fixture):
    fx, model = fixture
    args = ours_layout(fx.inputs("full"))
    args["context"] = model.prepare_context(args["context"])
    assert rel_err(run(model, args, False), fx.arrays["full/out"]) <= PARITY_RTOL


def test_batch_of_two_matches_official_single_calls():
    """CFG batches the conditional and the unconditional pass (other text, audio * 0); rows must not mix."""
    fx = Fixture("a")
    model = fx.model()
    cond, uncond = ours_layout(fx.inputs("full")), ours_layout(fx.inputs("uncond"))
    batched = {k: mx.concatenate([cond[k], uncond[k]], axis=0) for k in cond}
    out = run(model, batched, False)
    assert rel_err(out[:1], fx.arrays["full/out"]) <= PARITY_RTOL
    assert rel_err(out[1:], fx.arrays["uncond/out"]) <= PARITY_RTOL


def test_audio_encoder_and_injector_match_official():
    fx = Fixture("a")
    model = fx.model()
    audio = fx.arrays["audio_encoder/in"].astype(mx.float32).transpose(0, 3, 1, 2)
    local, glob = model.audio_encoder(audio)
    assert rel_err(local, fx.arrays["audio_encoder/local"]) <= PARITY_RTOL
    assert rel_err(glob, fx.arrays["audio_encoder/global"][:, :, 0]) <= PARITY_RTOL
    x, tokens, glob = (fx.arrays[f"injector/{k}"].astype(mx.float32) for k in ("x", "audio", "global"))
    assert rel_err(model.audio_injectors[1](x, tokens, glob), fx.arrays["injector/out"]) <= PARITY_RTOL


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
