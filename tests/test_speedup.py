"""The per-video FLOP and time table (mlx_video.speedup, printed by `mlxvid bench estimate`): its arithmetic against
the Wan cost model's closed forms with a stand-in radial score fraction, the step caches' counts against
`taylorseer_evaluations` and the pipeline's expert rule, and the table without radial attention."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_video import speedup
from mlx_video.families.wan import config as wan_config
from mlx_video.families.wan import cost_model as wan_cost
from mlx_video.pipelines.cache import taylorseer_evaluations
from mlx_video.registry import get_spec

A14B = get_spec("wan2.2-t2v-a14b")
STAND_IN = SimpleNamespace(block=64, decay=0.5, dense_steps=7, dense_blocks=2, first_frame_dense=True)


@pytest.fixture
def stand_in_radial(monkeypatch):
    """A stand-in `mlx_video.nn.radial` whose fraction shrinks with the grid, and stand-in defaults in the module
    of the Wan transformer's configuration; records the calls."""
    calls = []

    def radial_score_fraction(latent_frames, height_tokens, width_tokens, *, block, decay, text_tokens=0,
                              first_frame_dense=True):
        calls.append((latent_frames, height_tokens, width_tokens, block, decay, text_tokens, first_frame_dense))
        return 3.0 / latent_frames

    module = types.ModuleType("mlx_video.nn.radial")
    module.radial_score_fraction = radial_score_fraction
    monkeypatch.setitem(sys.modules, "mlx_video.nn.radial", module)
    monkeypatch.setattr(wan_config, "RADIAL_DEFAULTS", STAND_IN, raising=False)
    return calls


def test_expert_segments_follow_the_pipeline_rule():
    from mlx_video.families.wan.pipeline import WanPipeline
    from mlx_video.recipes import all_recipes
    from mlx_video.samplers import make_sampler

    for steps in (8, 40):
        timesteps = make_sampler("unipc", steps, 12.0).timesteps
        names = WanPipeline.expert_schedule(SimpleNamespace(two_experts=True, boundary=0.875), timesteps)
        assert speedup.expert_segments(A14B, steps) == [names.count(n) for n in dict.fromkeys(names)]
    sigmas = all_recipes()["lightning"].settings["sigmas"]
    assert speedup.expert_segments(A14B, sigmas=sigmas) == [2, 2]  # high, high, low, low (recipes.py)
    assert speedup.expert_segments(get_spec("wan2.2-ti2v-5b"), 12) == [12]


def test_cache_steps_replayed_through_the_hook():
    segments = speedup.expert_segments(A14B, 40)
    computed = speedup.cache_computed_steps("taylorseer:cache_interval=3", A14B, segments)
    assert sum(computed) == sum(taylorseer_evaluations(n, cache_interval=3) for n in segments)
    start = 0
    for n in segments:  # every expert starts with its own warm-up
        assert computed[start:start + 3] == (True, True, True)
        start += n
    name, steps = speedup.fastest_cache(A14B, segments)
    magcache = speedup.cache_computed_steps("magcache", A14B, segments)
    assert name == "taylorseer" and sum(steps) == sum(taylorseer_evaluations(n) for n in segments) < sum(magcache)
    with pytest.raises(ValueError, match="without the model's outputs"):
        speedup.cache_computed_steps("fbcache", A14B, segments)


def test_table_arithmetic_with_a_stand_in_fraction(stand_in_radial):
    width, height, frames = 1280, 720, 81
    table = speedup.speedup_table(A14B, width, height, frames, chips=("m3-ultra", "m2-max"))
    assert stand_in_radial[0] == (21, 45, 80, 64, 0.5, 0, True)
    f = 3.0 / 21
    rows = {r["plan"]: r for r in table["rows"]}
    n, d, layers = 75_600, A14B.transformer.dim, A14B.transformer.num_layers
    step = 2 * wan_cost.forward_flops(A14B.transformer, n).total  # CFG: two forwards
    text = wan_cost.text_encoder_flops(2)
    saving = (layers - STAND_IN.dense_blocks) * 2 * 4 * n * n * d * (1 - f)  # one sparse step, both passes
    assert rows["dense"]["total"] == pytest.approx(40 * step + text, rel=1e-12)
    assert rows["radial"]["total"] == pytest.approx(40 * step - (40 - 7) * saving + text, rel=1e-12)
    segments = speedup.expert_segments(A14B, 40)
    evals = sum(taylorseer_evaluations(k) for k in segments)
    computed = speedup.cache_computed_steps("taylorseer", A14B, segments)
    sparse_computed = sum(computed[7:])
    both = rows["radial + taylorseer"]
    assert both["evaluations"] == 2 * evals
    assert both["total"] == pytest.approx(evals * step - sparse_computed * saving + text, rel=1e-12)
    # Lightning: 4 steps without CFG; TaylorSeer's 3 warm-up steps cover each expert's 2, radial's 7 dense steps
    # cover all 4 at the defaults, and ceil(7 x 4 / 40) = 1 when scaled
    one = wan_cost.forward_flops(A14B.transformer, n).total
    few_text = wan_cost.text_encoder_flops(1)
    assert rows["lightning"]["total"] == pytest.approx(4 * one + few_text, rel=1e-12)
    assert rows["lightning + radial + taylorseer"]["total"] == pytest.approx(4 * one + few_text, rel=1e-12)
    scaled = rows["lightning + radial + taylorseer (1 dense steps)"]
    assert scaled["dense_steps"] == 1
    assert scaled["total"] == pytest.approx(4 * one - 3 * saving / 2 + few_text, rel=1e-12)
    for r in table["rows"]:
        assert r["fewer_flops"] == pytest.approx(rows["dense"]["total"] / r["total"])
        peak = 28.4e12 * 0.5
        assert r["minutes"]["m3-ultra"] == pytest.approx(r["total"] / peak / 60)
        assert r["minutes"]["m2-max"] > r["minutes"]["m3-ultra"]


def test_table_without_radial_attention(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_video.nn.radial", None)  # import fails
    table = speedup.speedup_table(A14B, 832, 480, 81)
    assert "radial_score_fraction is not available" in table["radial_missing"]
    for r in table["rows"]:
        assert (r["total"] is None) == ("radial" in r["plan"])
    rows = {r["plan"]: r for r in table["rows"]}
    assert rows["taylorseer"]["fewer_flops"] > 2.5 and rows["lightning"]["fewer_flops"] > 19


def test_bench_estimate_prints_the_table(stand_in_radial):
    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness

    res = CliRunner().invoke(harness.bench, ["estimate", "--chip", "m3-ultra", "--size", "1280x720"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "Per video (75600 tokens; radial attention: 0.143 of the scores" in out
    for label in ("dense", "radial + taylorseer", "lightning + radial + taylorseer (1 dense steps)"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), label
    dense = next(line for line in out.splitlines() if line.startswith("dense "))
    assert dense.split()[1:5] == ["80", "-", "521.9", "1.00x"]  # evaluations, dense steps, PFLOP, ratio


def test_issue_targets_with_the_real_radial_attention():
    """720p x 81 A14B against the dense 40-step CFG run: radial + the fastest cache at their defaults >= 3x fewer
    FLOPs, and >= 20x with Lightning as well (radial's dense steps scaled to the 4-step run)."""
    radial, fraction_fn, missing = speedup.radial_parameters(A14B)
    if radial is None:
        pytest.skip(f"radial attention is not in this tree: {missing}")
    table = speedup.speedup_table(A14B, 1280, 720, 81)
    rows = {r["plan"]: r for r in table["rows"]}
    assert 0 < table["radial_fraction"] < 1
    assert rows["radial"]["dense_steps"] == radial.dense_steps
    assert rows["radial + taylorseer"]["fewer_flops"] >= 3
    scaled = [r for r in table["rows"] if r["plan"].startswith("lightning + radial") and "dense steps" in r["plan"]]
    assert scaled and scaled[0]["fewer_flops"] >= 20
