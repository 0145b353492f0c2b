"""Every family that declares benchmark cases (`Family.bench`, mlx_video/bench_case.py) runs through the shared
harness (benchmarks/harness.py): its one-step case builds and runs at a tiny size (its GPU_CHECK "dry" sizes),
each declared step variant too, its VAE case is well formed, and a family without cases is refused by name."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import pytest

import mlx_video.families as families
from mlx_video.registry import MODELS, get_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness as bench  # noqa: E402

BENCH_FAMILIES = [name for name, family in families.FAMILIES.items() if family.bench]


def _quiet(*_args, **_kwargs):
    pass


def test_the_families_with_cases_are_found():
    assert BENCH_FAMILIES and set(BENCH_FAMILIES) <= set(families.FAMILIES)
    assert bench.DEFAULT_MODEL in bench.bench_models()
    assert {MODELS[m].family for m in bench.bench_models()} == set(BENCH_FAMILIES)


@pytest.mark.parametrize("family", BENCH_FAMILIES)
def test_each_family_builds_its_step_at_a_tiny_size(family, tmp_path):
    module = families.bench_module(family)
    model = next(m for m, spec in MODELS.items() if spec.family == family)
    if not hasattr(module, "step_case"):  # a VAE-only family: the step harness says so by name
        assert hasattr(module, "vae_case"), f"{family} declares a bench module with neither a step nor a VAE case"
        with pytest.raises(click.BadParameter, match="no step benchmark case"):
            bench.step_case(model)
        return
    s = module.GPU_CHECK["dry"]["step"]  # the family's tiny widths
    assert get_spec(s["model"]).family == family
    r = bench.run_step(s["model"], tuple(s["size"]), s["frames"], s.get("depth"), "fp32", repeats=1, warmup=1,
                       width=s.get("width"), peak_probe=0, json_path=tmp_path / "step.json", echo=_quiet)
    assert r["model"] == s["model"] and r["depth"] == {**module.DEPTH, **s.get("depth", {})}
    assert r["tokens"] > 0 and r["flops_per_step"] > 0 and r["full_depth_flops_per_step"] > r["flops_per_step"]
    assert r["peak_memory_bytes"] > r["weights_bytes"] > 0 and r["seconds_per_step"] > 0
    assert r["full_layers"] > r["layers"] and r["full_depth_seconds_per_step"] > r["seconds_per_step"]
    assert r["system"]["command"]


def _variants():
    for family in BENCH_FAMILIES:
        for model, names in getattr(families.bench_module(family), "VARIANTS", {}).items():
            yield from ((model, name) for name in names)


@pytest.mark.parametrize("model, variant", list(_variants()))
def test_each_declared_variant_runs(model, variant):
    """Variants of one model's step (Wan S2V: with and without the audio injections, and its plain backbone):
    each runs at a tiny width; the S2V step adds its reference and motion tokens to the video's."""
    width = {"dim": 32, "ffn_dim": 48, "freq_dim": 16, "text_dim": 24, "num_heads": 2}
    r = bench.run_step(model, (64, 64), 8, 1, "fp32", repeats=1, warmup=0, width=width, peak_probe=0, variant=variant,
                       echo=_quiet)
    assert r["variant"] == variant and r["seconds_per_step"] > 0 and r["peak_memory_bytes"] > r["weights_bytes"]
    video = r["info"].get("video_tokens", r["tokens"])
    assert (r["tokens"] > video) == (variant != "backbone")
    with pytest.raises(click.BadParameter, match="unknown variant"):
        bench.step_case(model, (64, 64), 8, 1, width=width, variant="warp")


@pytest.mark.parametrize("family", BENCH_FAMILIES)
def test_each_vae_case_is_well_formed(family):
    """The VAE case builds without evaluating its weights (MLX initialises lazily), and its estimate is positive
    for a clip of two latent frames."""
    module = families.bench_module(family)
    if not hasattr(module, "vae_case"):
        pytest.skip(f"{family} declares no VAE case")
    model = next(m for m, spec in MODELS.items() if spec.family == family)
    case = bench.vae_case(model)
    w = h = 4 * case.spatial
    estimate = case.estimate(w, h, 1 + case.temporal)
    assert case.latent_channels > 0 and (estimate["total"] if isinstance(estimate, dict) else estimate) > 0


def test_a_family_without_cases_is_refused_by_name(monkeypatch):
    family = BENCH_FAMILIES[0]
    monkeypatch.setitem(families.FAMILIES, family, replace(families.FAMILIES[family], bench=None))
    model = next(m for m, spec in MODELS.items() if spec.family == family)
    with pytest.raises(click.BadParameter, match=f"its family \\({family}\\) declares no benchmark cases"):
        bench.step_case(model)


@pytest.mark.parametrize("layers, depth", [(None, {"double": 1, "single": 1}), (3, {"double": 3, "single": 1}),
                                           ("single=2", {"double": 1, "single": 2}),
                                           ("double=2,single=0", {"double": 2, "single": 0})])
def test_depth_parsing(layers, depth):
    assert bench.parse_depth({"double": 1, "single": 1}, layers) == depth


def test_depth_parsing_refuses_unknown_kinds():
    with pytest.raises(click.BadParameter, match="unknown depth kind"):
        bench.parse_depth({"layers": 2}, "double=1")
    with pytest.raises(click.BadParameter, match="KIND=N"):
        bench.parse_depth({"layers": 2}, "layers:2")


@pytest.mark.parametrize("family", BENCH_FAMILIES)
def test_a_prepared_step_equals_the_plain_one(family):
    """Where a step case prepares the per-video context once (benchmarks/speed.py's variants), its step gives the
    plain step's output on the same weights and inputs."""
    import mlx.core as mx
    import numpy as np

    from mlx_video.bench_case import as_mx

    module = families.bench_module(family)
    if not hasattr(module, "step_case"):
        pytest.skip(f"{family} declares no step case")
    s = module.GPU_CHECK["dry"]["step"]
    case = bench.step_case(s["model"], tuple(s["size"]), s["frames"], s.get("depth"), "fp32", s.get("width"))
    if case.prepared_forward is None:
        pytest.skip(f"{family}'s step case prepares nothing once")
    model = case.model("fp32")
    inputs = as_mx(case.inputs, "fp32", case.uncast)
    plain = np.asarray(case.forward(model, inputs))
    prepared = np.asarray(case.prepared_forward(model, inputs)(inputs))
    assert np.abs(plain).max() > 0
    np.testing.assert_allclose(prepared, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    mx.clear_cache()


def test_variants_side_by_side(tmp_path):
    """Several variants of one model in one run, alternating: each timed every repeat, the first the unit."""
    declared = [item for f in BENCH_FAMILIES for item in getattr(families.bench_module(f), "VARIANTS", {}).items()]
    if not declared:
        pytest.skip("no family declares step variants")
    model, names = declared[0]
    width = {"dim": 32, "ffn_dim": 48, "freq_dim": 16, "text_dim": 24, "num_heads": 2}
    r = bench.run_step_variants(model, list(names), (64, 64), 8, 1, "fp32", repeats=2, width=width,
                                json_path=tmp_path / "variants.json", echo=_quiet)
    assert list(r["variants"]) == list(names) and r["variants"][names[0]]["ratio_to_first"] == 1.0
    assert all(len(v["times_s"]) == 2 and v["activation_peak_bytes"] > 0 for v in r["variants"].values())


def test_vae_decode_and_encode_through_the_harness(tmp_path):
    """The VAE harness on a family case with an encoder too (HunyuanVideo 1.5's, narrowed to 4 latent channels
    and widths 8-32): decode and encode records with the family's estimates, frame counts the case's rule."""
    family = next((f for f in BENCH_FAMILIES if getattr(families.bench_module(f), "vae_case", None)
                   and bench.vae_case(next(m for m, s in MODELS.items() if s.family == f)).encode), None)
    if family is None:
        pytest.skip("no family's VAE case has an encoder")
    model = next(m for m, s in MODELS.items() if s.family == family)
    tiny = {"block_out_channels": [8, 16, 16, 32, 32], "latent_channels": 4, "layers_per_block": 1}
    decoded = bench.run_vae(model, ((32, 32),), (1, 5), width=tiny, json_path=tmp_path / "d.json", echo=_quiet)
    encoded = bench.run_vae(model, ((32, 32),), (1, 5), width=tiny, encode=True, json_path=tmp_path / "e.json",
                            echo=_quiet)
    assert [r["frames"] for r in decoded["results"]] == [1, 5] == [r["frames"] for r in encoded["results"]]
    for r in decoded["results"] + encoded["results"]:
        assert r["peak_memory_bytes"] > 0 and r["activation_bytes_estimated"] > 0 and r["seconds"] > 0
    assert encoded["harness"] == "vae-encode" and 0 < encoded["weights_bytes"] and 0 < decoded["weights_bytes"]
    with pytest.raises(click.BadParameter, match="frame counts must be"):
        bench.run_vae(model, ((32, 32),), (2,), width=tiny, echo=_quiet)
