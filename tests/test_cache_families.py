"""Step caching for HunyuanVideo, HunyuanVideo 1.5 and Mochi (the shared wrapper of mlx_video.pipelines.cache over their split
forward): the split forward is the forward; threshold 0 reproduces the uncached run bit for bit; a positive
threshold skips evaluations on a 20-step run, the same ones with batched and sequential guidance, and the result
and the sidecar record them; MagCache, which needs a published table, is refused with the methods that work."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_video.errors import MlxVideoError
from mlx_video.families import FAMILIES
from support.arrays import rel_err

# every registered family but Wan, whose own tests are tests/test_lora.py and tests/test_cache.py; a new family
# fails here (no tiny model or run of it below) until it has one
OTHER_FAMILIES = [name for name in FAMILIES if name != "wan"]
PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"
STEPS = 20


# ---- the split forward ----


def test_hunyuan_split_forward_is_the_forward():
    """embed, blocks in any two ranges (double/single boundary included), unembed: the very numbers of the
    forward, with a text mask that needs the key mask (batch 2, different lengths)."""
    from mlx_video.families.hunyuan.config import HunyuanTransformerConfig
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    cfg = HunyuanTransformerConfig(num_heads=3, head_dim=20, mlp_ratio=2.0, num_double_blocks=2, num_single_blocks=3,
                                   num_refiner_blocks=1, rope_axes=(4, 8, 8), patch_size=(1, 2, 2), in_channels=4,
                                   out_channels=4, text_dim=28, pooled_dim=12, guidance_embed=True)
    model = HunyuanTransformer(cfg, dtype=mx.float32)
    mx.eval(model.parameters())
    keys = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((2, 2, 4, 6, 4), key=keys[0])
    text = mx.random.normal((2, 7, 28), key=keys[1])
    mask = mx.array([[1] * 7, [1] * 4 + [0] * 3])
    pooled = mx.random.normal((2, 12), key=keys[2])
    t, g = mx.array([700.0, 700.0]), mx.array([6000.0])
    full = np.array(model(x, t, text, mask, pooled, guidance=g))
    for k in range(model.num_blocks + 1):
        state = model.embed(x, t, text, mask, pooled, guidance=g)
        state = model.run_blocks(model.run_blocks(state, 0, k), k)
        assert np.array_equal(np.array(model.unembed(state)), full), k
    state = model.embed(x, t, text, mask, pooled, guidance=g)
    assert state.hidden is state.img and state.hidden.shape == (2, 12, cfg.hidden_size)


def test_mochi_split_forward_is_the_forward():
    from mlx_video.families.mochi.config import MochiTransformerConfig
    from mlx_video.families.mochi.transformer import MochiTransformer

    cfg = MochiTransformerConfig.with_widths(num_layers=3, num_heads=2, head_dim=24, text_dim=20, in_channels=6,
                                             out_channels=6, t5_dim=32, pool_heads=4, freq_dim=16)
    model = MochiTransformer(cfg)
    mx.eval(model.parameters())
    keys = mx.random.split(mx.random.key(1), 2)
    x = mx.random.normal((2, 2, 4, 6, 6), key=keys[0])
    text = mx.random.normal((2, 5, 32), key=keys[1])
    mask = mx.array([[1] * 5, [1] * 3 + [0] * 2])
    t = mx.array([250.0, 250.0])
    full = np.array(model(x, t, text, mask))
    for k in range(cfg.num_layers + 1):
        state = model.run_blocks(model.run_blocks(model.embed(x, t, text, mask), 0, k), k)
        assert np.array_equal(np.array(model.unembed(state)), full), k


# ---- whole runs on the tiny converted pipelines ----


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from support.hunyuan import build_tiny_hunyuan_pipeline
    from support.hunyuan15 import build_tiny_t2v_pipeline
    from support.mochi import build_tiny_mochi_pipeline

    from mlx_video.cli import main

    root = tmp_path_factory.mktemp("cache_families")
    build_tiny_hunyuan_pipeline(root / "hunyuan_diffusers", seed=7)
    main(["convert", str(root / "hunyuan_diffusers"), str(root / "hunyuan"), "--dtype", "fp32"])
    build_tiny_mochi_pipeline(root / "mochi_diffusers", seed=8)
    main(["convert", str(root / "mochi_diffusers"), str(root / "mochi"), "--dtype", "fp32"])
    build_tiny_t2v_pipeline(root / "hunyuan15_diffusers")
    main(["convert", str(root / "hunyuan15_diffusers"), str(root / "hunyuan15"), "--dtype", "fp32"])
    return root


# HunyuanVideo with true CFG (two passes a step, so that batched and sequential guidance can be compared);
# Mochi and HunyuanVideo 1.5 with their classifier-free guidance.
RUNS = {
    "hunyuan": (dict(frames=9, guidance=6.0, true_cfg=3.0), (1, 6, 3, 4, 6)),
    "mochi": (dict(frames=7, guidance=4.5), (1, 12, 2, 4, 6)),
    "hunyuan15": (dict(frames=5, guidance=6.0), (1, 4, 2, 2, 3)),
}


@pytest.fixture(scope="module")
def run(folders):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    pipes, done = {}, {}

    def generate(family, cache=None, mode="batched"):
        key = (family, cache, mode)
        if key not in done:
            if family not in pipes:
                pipes[family] = Pipeline.from_pretrained(str(folders / family))
            extra, shape = RUNS[family]
            init = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
            s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, width=48, height=32, steps=STEPS,
                                   cache=cache, guidance_mode=mode, **extra)
            done[key] = pipes[family].generate(s, init_latents=init)
        return done[key]

    return generate


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("method", ["easycache", "fbcache"])
def test_threshold_zero_is_the_uncached_run(run, family, method):
    base, cached = run(family), run(family, f"{method}:0")
    assert base.stats["transformer_evals"] == 2 * STEPS and base.stats["cache"] is None
    assert np.array_equal(base.latents, cached.latents)
    assert cached.stats["reused_steps"] == [] and cached.stats["transformer_evals"] == 2 * STEPS
    assert cached.stats["cache"] == method


# The tiny random models change far faster from step to step than trained ones: the thresholds that reuse
# anything here are larger than the published defaults.
THRESHOLDS = {"easycache": 1.0, "fbcache": 0.5, ("hunyuan15", "fbcache"): 0.7}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("method", ["easycache", "fbcache"])
def test_positive_threshold_skips_evaluations(run, family, method):
    base = run(family)
    option = f"{method}:{THRESHOLDS.get((family, method), THRESHOLDS[method])}"
    a, b = run(family, option), run(family, option, mode="sequential")
    reused = a.stats["reused_steps"]
    evals = a.stats["transformer_evals"]
    dev = rel_err(a.latents, base.latents)
    print(f"{family} {option}: {evals}/{2 * STEPS} transformer evaluations, reused steps {reused}, latent deviation "
          f"{dev:.2e}")
    assert reused and evals == 2 * (STEPS - len(reused)) and a.stats["transformer_evals_uncached"] == 2 * STEPS
    if method == "easycache":
        assert min(reused) >= 10 and STEPS - 1 not in reused  # warm-up steps and the last step compute
    assert 0.0 < dev < 0.5
    assert b.stats["reused_steps"] == reused  # the conditional pass decides, whatever the guidance mode
    assert rel_err(b.latents, a.latents) < 1e-5


def test_cli_sidecar_records_the_evaluations(folders):
    from mlx_video.cli import main

    init = np.random.default_rng(4).standard_normal(RUNS["mochi"][1]).astype(np.float32)
    np.save(folders / "init.npy", init)
    out = folders / "cached.npy"
    main(["generate", "--model", str(folders / "mochi"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--size", "48x32", "--frames", "7", "--steps", str(STEPS), "--guidance", "4.5", "--cache", "fbcache:0.5",
          "--init-latents", str(folders / "init.npy"), "--save-latents", str(out), "--quiet", "--overwrite"])
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert record["cache"] == "fbcache" and record["cache_threshold"] == 0.5
    assert record["reused_steps"] and record["transformer_evals"] == 2 * (STEPS - len(record["reused_steps"]))
    assert record["transformer_evals_uncached"] == 2 * STEPS


def test_hunyuan15_taylorseer_defaults_to_the_release_schedule(folders):
    """`--cache taylorseer` on a HunyuanVideo 1.5 model starts from the release's cache schedule (computed steps
    0-10, one in 4 after, every step from 45; second order): on 20 steps, 0-10, 12 and 16 run (diffusers' defaults
    would run 0-2, 4, 9, 14 and 19); keys given override it one by one."""
    from mlx_video.cli import main
    from mlx_video.families.hunyuan15 import TAYLORCACHE
    from mlx_video.pipelines.cache import TaylorSeerConfig, parse_cache

    init = np.random.default_rng(6).standard_normal(RUNS["hunyuan15"][1]).astype(np.float32)
    np.save(folders / "init15.npy", init)
    out = folders / "taylor15.npy"
    main(["generate", "--model", str(folders / "hunyuan15"), "--prompt", PROMPT, "--size", "48x32", "--frames", "5",
          "--steps", str(STEPS), "--guidance", "6", "--cache", "taylorseer", "--init-latents",
          str(folders / "init15.npy"), "--save-latents", str(out), "--quiet", "--overwrite"])
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert record["cache_config"] == TaylorSeerConfig(**TAYLORCACHE).to_dict()
    assert record["cache_config"]["max_order"] == 2 and record["cache_config"]["cache_interval"] == 4
    assert record["forecast_steps"] == [11, 13, 14, 15, 17, 18, 19]
    assert record["transformer_evals"] == 2 * 13 and record["transformer_evals_uncached"] == 2 * STEPS
    model = json.loads((folders / "hunyuan15" / "mlxvid.json").read_text())["model"]
    config = parse_cache("taylorseer:cache_interval=2", model)[1]
    assert (config.cache_interval, config.disable_cache_before_step, config.max_order) == (2, 11, 2)
    assert parse_cache("taylorseer", "hunyuanvideo-1.5-480p-i2v-step-distilled")[1] == TaylorSeerConfig()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_magcache_needs_a_published_table(folders, family):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    pipe = Pipeline.from_pretrained(str(folders / family))
    extra, _ = RUNS[family]
    with pytest.raises(MlxVideoError) as e:
        pipe.resolve(GenerationSettings(prompt=PROMPT, width=48, height=32, steps=4, cache="magcache", **extra))
    message = str(e.value)
    assert pipe.spec.id in message and "easycache" in message and "fbcache" in message
