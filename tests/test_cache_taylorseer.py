"""TaylorSeer (`--cache taylorseer[:KEY=VALUE,...]`) against diffusers' `TaylorSeerCacheConfig` in lite mode: the
same final latents and the same number of transformer evaluations (counted on the diffusers side with a forward
hook inside the first block, which runs only when the blocks are not skipped) on tiny Wan A14B-style (two experts,
CFG), HunyuanVideo (true CFG) and Mochi (batched CFG) pipelines; `taylorseer_evaluations` against the real
counts; the option's parsing and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_video.errors import MlxVideoError
from mlx_video.pipelines.cache import TaylorSeerConfig, parse_cache, taylorseer_evaluations
from support.arrays import rel_err

PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"


# ---- the option ----


def test_defaults_are_diffusers_but_lite_mode():
    torch = pytest.importorskip("torch")
    from diffusers import TaylorSeerCacheConfig

    ref = TaylorSeerCacheConfig()
    ours = parse_cache("taylorseer")[1]
    assert ours.use_lite_mode and not ref.use_lite_mode  # the one deliberate difference
    for key in ("cache_interval", "disable_cache_before_step", "disable_cache_after_step", "max_order"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert getattr(torch, ours.taylor_factors_dtype) == ref.taylor_factors_dtype


def test_keys_and_values_are_parsed():
    name, config = parse_cache("taylorseer:use_lite_mode=true,max_order=2,cache_interval=2,"
                               "taylor_factors_dtype=float32,disable_cache_after_step=9")
    assert name == "taylorseer"
    assert config == TaylorSeerConfig(cache_interval=2, max_order=2, taylor_factors_dtype="float32",
                                      disable_cache_after_step=9)
    assert parse_cache("taylorseer:disable_cache_after_step=none")[1].disable_cache_after_step is None


@pytest.mark.parametrize("option,words", [
    ("taylorseer:interval=2", "valid keys: cache_interval, disable_cache_before_step"),
    ("taylorseer:max_order", "not KEY=VALUE"),
    ("taylorseer:max_order=two", "max_order='two' is not valid; max_order must be an integer >= 0"),
    ("taylorseer:cache_interval=0", "integer >= 1"),
    ("taylorseer:disable_cache_before_step=0", "the first step must compute"),
    ("taylorseer:taylor_factors_dtype=float8", "one of float32, bfloat16, float16"),
    ("taylorseer:use_lite_mode=false", "not implemented"),
    ("taylorseer:use_lite_mode=maybe", "true or false"),
    ("taylorseer:cache_identifiers=proj_out", "not supported.*valid keys"),
    ("taylorseers", "unknown method.*taylorseer"),
])
def test_bad_options_are_refused(option, words):
    with pytest.raises(MlxVideoError, match=words):
        parse_cache(option)


def test_evaluations_closed_form_against_the_schedule():
    """The closed form against the step-by-step rule (diffusers' `_measure_should_compute`, as written in
    `TaylorSeerConfig.computes`) over many configurations and lengths."""
    for interval in (1, 2, 3, 5):
        for before in (1, 2, 3, 7):
            for after in (None, 0, 2, 6, 30):
                config = dict(cache_interval=interval, disable_cache_before_step=before,
                              disable_cache_after_step=after)
                rule = TaylorSeerConfig(**config)
                for steps in (0, 1, 3, 4, 9, 20, 40):
                    expected = sum(rule.computes(s) for s in range(steps))
                    assert taylorseer_evaluations(steps, **config) == expected, (config, steps)
    assert taylorseer_evaluations(40) == 11  # steps 0, 1, 2, then 4, 9, ..., 39
    with pytest.raises(TypeError):
        taylorseer_evaluations(10, interval=2)
    with pytest.raises(ValueError, match="cache_interval >= 1"):
        taylorseer_evaluations(10, cache_interval=0)


# ---- parity with diffusers ----


def _count_block_evaluations(transformers):
    """Forward hooks inside block 0's first attention: it runs only on a computed step (lite mode replaces the
    block's forward on forecast steps). Counts samples (a batched CFG call counts 2)."""
    counter = {"evals": 0}

    def hook(module, args, kwargs, output):
        counter["evals"] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    handles = []
    for transformer in transformers:
        block = (transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks)[0]
        handles.append(block.attn1.register_forward_hook(hook, with_kwargs=True)
                       if hasattr(block, "attn1") else block.attn.register_forward_hook(hook, with_kwargs=True))
    return counter, handles


def _diffusers_taylorseer(pipe, config: dict, run):
    """`run()` with `TaylorSeerCacheConfig(**config)` enabled on every transformer of `pipe`; (result, evals)."""
    import torch
    from diffusers import TaylorSeerCacheConfig

    transformers = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    kwargs = {**config, "taylor_factors_dtype": getattr(torch, config.get("taylor_factors_dtype", "bfloat16"))}
    counter, handles = _count_block_evaluations(transformers)
    for m in transformers:
        m.enable_cache(TaylorSeerCacheConfig(**kwargs))
    try:
        with torch.no_grad():
            out = run()
    finally:
        for m in transformers:
            m.disable_cache()
        for h in handles:
            h.remove()
    return out, counter["evals"]


def _option(config: dict) -> str:
    return "taylorseer:" + ",".join(f"{k}={v}" for k, v in config.items())


def _wan_reference(pipe, init, steps, config):
    import torch

    from support.wan import use_official_sigmas

    use_official_sigmas(pipe)
    return _diffusers_taylorseer(pipe, config, lambda: pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=9, num_inference_steps=steps,
        guidance_scale=4.0, guidance_scale_2=3.0, latents=torch.from_numpy(init), output_type="latent",
        max_sequence_length=512).frames.numpy())


STEPS = 6  # 4 steps of the high-noise expert, 2 of the low-noise one


def test_wan_a14b_matches_diffusers_through_the_cli(a14b):
    """diffusers' defaults (interval 5, 3 warm-up steps, order 1) in lite mode: float32 factors through
    `mlxvid generate` and its sidecar, and bfloat16 factors (diffusers' default dtype), which round the same way."""
    pytest.importorskip("torch")
    from mlx_video.cli import main
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, pipe = a14b
    config = dict(use_lite_mode=True, taylor_factors_dtype="float32")
    init = np.random.default_rng(5).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    ref, ref_evals = _wan_reference(pipe, init, STEPS, config)
    np.save(root / "ts_init.npy", init)
    out = root / "ts_out.npy"
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--size", "48x32", "--frames", "9", "--steps", str(STEPS), "--guidance", "4", "--guidance-2", "3",
          "--shift", "12", "--cache", _option(config), "--init-latents", str(root / "ts_init.npy"),
          "--save-latents", str(out), "--quiet", "--overwrite"])
    ours = np.load(out)
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    segments = [record["experts"].count("transformer"), record["experts"].count("transformer_2")]
    err = rel_err(ours, ref)
    print(f"Wan A14B TaylorSeer {config}: relative error {err:.2e}, evaluations {record['transformer_evals']} "
          f"(diffusers {ref_evals}, uncached {2 * STEPS}), experts {segments}, forecast {record['forecast_steps']}")
    assert err < 1e-3 and min(segments) > 0  # both experts ran, each with its own warm-up
    assert record["transformer_evals"] == ref_evals == 2 * sum(taylorseer_evaluations(n) for n in segments)
    assert record["forecast_steps"] == [3] and record["reused_steps"] == []
    assert record["cache"] == "taylorseer" and record["cache_config"] == {**TaylorSeerConfig().to_dict(), **config}

    bf16 = dict(use_lite_mode=True)
    ref16, ref16_evals = _wan_reference(pipe, init, STEPS, bf16)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, width=48, height=32, frames=9, steps=STEPS,
                           guidance=4.0, guidance_2=3.0, shift=12.0, cache=_option(bf16))
    ours16 = Pipeline.from_pretrained(str(root / "mlx")).generate(s, init_latents=init)
    err16, rounding = rel_err(ours16.latents, ref16), rel_err(ours16.latents, ours)
    print(f"bfloat16 factors: relative error {err16:.2e} (bfloat16 against float32 factors: {rounding:.2e})")
    assert ours16.stats["transformer_evals"] == ref16_evals and err16 < 1e-3 and rounding > err16


def test_wan_a14b_second_order_matches_diffusers(a14b):
    """Order 2, interval 2, 2 warm-up steps and a cool-down, over 9 steps (6 + 3): forecasts in each expert, the
    second one of the high-noise expert from three orders."""
    pytest.importorskip("torch")
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, pipe = a14b
    config = dict(use_lite_mode=True, max_order=2, cache_interval=2, disable_cache_before_step=2,
                  disable_cache_after_step=5, taylor_factors_dtype="float32")
    init = np.random.default_rng(6).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    ref, ref_evals = _wan_reference(pipe, init, 9, config)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, width=48, height=32, frames=9, steps=9,
                           guidance=4.0, guidance_2=3.0, shift=12.0, cache=_option(config))
    result = Pipeline.from_pretrained(str(root / "mlx")).generate(s, init_latents=init)
    err = rel_err(result.latents, ref)
    print(f"Wan A14B TaylorSeer {config}: relative error {err:.2e}, evaluations {result.stats['transformer_evals']} "
          f"(diffusers {ref_evals}), forecast {result.stats['forecast_steps']}")
    assert err < 1e-3
    assert result.stats["transformer_evals"] == ref_evals == 2 * (9 - 3)
    assert result.stats["forecast_steps"] == [2, 4, 8]  # steps 2 and 4 of the first expert, 2 of the second


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from support.hunyuan import build_tiny_hunyuan_pipeline
    from support.mochi import build_tiny_mochi_pipeline

    from mlx_video.cli import main

    root = tmp_path_factory.mktemp("taylorseer_families")
    pipes = {"hunyuan": build_tiny_hunyuan_pipeline(root / "hunyuan_diffusers", seed=5),
             "mochi": build_tiny_mochi_pipeline(root / "mochi_diffusers", seed=6)}
    for family in pipes:
        main(["convert", str(root / f"{family}_diffusers"), str(root / family), "--dtype", "fp32"])
    return root, pipes


# HunyuanVideo with true CFG (two passes a step, each its own diffusers cache context); Mochi with its batched CFG
# (one pass of batch 2). (frames, latent shape, reference keywords, our keywords)
FAMILY_RUNS = {
    "hunyuan": (9, (1, 6, 3, 4, 6), dict(guidance_scale=6.0, true_cfg_scale=3.0), dict(guidance=6.0, true_cfg=3.0)),
    "mochi": (7, (1, 12, 2, 4, 6), dict(guidance_scale=4.5), dict(guidance=4.5)),
}


@pytest.mark.parametrize("family", ["hunyuan", "mochi"])
def test_hunyuan_and_mochi_match_diffusers(families, family):
    import torch

    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, pipes = families
    pipe = pipes[family]
    frames, shape, ref_kwargs, our_kwargs = FAMILY_RUNS[family]
    steps = 5
    config = dict(use_lite_mode=True, max_order=2, cache_interval=3, disable_cache_before_step=2,
                  taylor_factors_dtype="float32")
    init = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    official_grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1].numpy()  # HunyuanVideo's sigmas
    extra = {"sigmas": official_grid} if family == "hunyuan" else {}
    ref, ref_evals = _diffusers_taylorseer(pipe, config, lambda: pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=frames, num_inference_steps=steps,
        latents=torch.from_numpy(init), output_type="latent", max_sequence_length=256, **ref_kwargs,
        **extra).frames.numpy())
    ours = Pipeline.from_pretrained(str(root / family))
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, width=48, height=32, frames=frames, steps=steps,
                           cache=_option(config), **our_kwargs)
    result = ours.generate(s, init_latents=init)
    err = rel_err(result.latents, ref)
    evals = result.stats["transformer_evals"]
    print(f"{family} TaylorSeer {config}: relative error {err:.2e}, evaluations {evals} (diffusers {ref_evals}, "
          f"uncached {2 * steps}), forecast {result.stats['forecast_steps']}")
    assert err < 1e-3
    assert evals == ref_evals == 2 * taylorseer_evaluations(steps, cache_interval=3, disable_cache_before_step=2)
    assert result.stats["forecast_steps"] == [2, 4] and result.stats["reused_steps"] == []


def test_a_chain_records_each_segments_evaluations(a14b, tmp_path):
    """A chain of clips runs each segment with a fresh step cache; its sidecar records each segment's transformer
    evaluations and forecast steps, and their sums."""
    from mlx_video.cli import main
    from mlx_video.registry import get_spec
    from mlx_video.speedup import expert_segments

    root, _ = a14b
    option = "taylorseer:disable_cache_before_step=1,cache_interval=2"
    out = tmp_path / "chain"  # a PNG folder
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "4",
          "--frames", "21", "--segment-frames", "13", "--steps", "3", "--guidance", "1", "--guidance-2", "1",
          "--cache", option, "--output", str(out), "--quiet"])
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    segments = record["segments"]
    per_segment = sum(taylorseer_evaluations(n, disable_cache_before_step=1, cache_interval=2)
                      for n in expert_segments(get_spec("wan2.2-t2v-a14b"), 3))
    assert len(segments) == 2 and [s["transformer_evals"] for s in segments] == [per_segment] * 2 < [3] * 2
    assert all(s["forecast_steps"] and s["transformer_evals_uncached"] == 3 for s in segments)
    assert record["transformer_evals"] == 2 * per_segment and record["transformer_evals_uncached"] == 6
