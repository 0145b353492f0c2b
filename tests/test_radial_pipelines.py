"""End to end, `--attention radial`: a tiny Wan (A14B-style, two experts), HunyuanVideo, HunyuanVideo 1.5 (T2V and
the step-distilled I2V) and Mochi pipeline against the diffusers pipeline whose self-attention applies the
reference repository's mask (a processor that masks every score outside the kept tiles of `gen_log_mask_shrinked`,
transcribed in tests/support/reference/radial_mask.py), dense for the first steps (counted over the whole run) and
blocks (counted within each transformer).

The tiny models have 16 or 24 tokens per latent frame, so the test gives each family 8-token tiles (the published
64 / 128 would make one tile, i.e. dense attention): the family's decay and first-frame rule are kept."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from support.reference.radial_mask import gen_log_mask_shrinked  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"
BLOCK = 8


class ReferenceRadial:
    """The reference's radial attention on a diffusers pipeline: the step index (set by the pipeline's step-end
    callback), and the token mask of a sequence of `tokens` (video first, then text, kept whole)."""

    def __init__(self, frames, tokens_per_frame, decay, wan, dense_steps, dense_blocks):
        self.frames, self.per_frame, self.decay, self.wan = frames, tokens_per_frame, decay, wan
        self.dense_steps, self.dense_blocks = dense_steps, dense_blocks
        self.step, self.sparse_calls = 0, 0
        self.masks = {}

    def token_mask(self, tokens: int) -> torch.Tensor:
        if tokens not in self.masks:
            self.masks[tokens] = self.build_token_mask(tokens)
        return self.masks[tokens]

    def build_token_mask(self, tokens: int) -> torch.Tensor:
        video = self.frames * self.per_frame
        assert video % BLOCK == 0  # where the reference is defined
        tiles = gen_log_mask_shrinked(tokens, video, self.frames, block_size=BLOCK, sparse_type="radial",
                                      decay_factor=self.decay, model_type="wan" if self.wan else "hunyuan")
        n = tiles.shape[0] * BLOCK
        mask = torch.ones((tokens, tokens), dtype=torch.bool)
        mask[:n, :n] = tiles.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        return mask

    def on_step_end(self, pipe, i, t, kwargs):
        self.step = i + 1
        return {}


class MaskedProcessor:
    """Wraps a diffusers attention processor: while it runs, torch's attention masks the scores outside the
    reference's kept tiles (combined with the processor's own mask, e.g. text padding)."""

    def __init__(self, inner, radial: ReferenceRadial, layer: int):
        self.inner, self.radial, self.layer = inner, radial, layer

    def __call__(self, attn, *args, **kwargs):
        r = self.radial
        if r.step < r.dense_steps or self.layer < r.dense_blocks:
            return self.inner(attn, *args, **kwargs)
        original = torch.nn.functional.scaled_dot_product_attention

        def masked(query, key, value, attn_mask=None, **kw):
            tokens = key.shape[-2]
            keep = r.token_mask(tokens)[: query.shape[-2]]  # the queries are the sequence's first tokens
            if attn_mask is None:
                attn_mask = keep
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & keep
            else:
                attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
            r.sparse_calls += 1
            return original(query, key, value, attn_mask=attn_mask, **kw)

        torch.nn.functional.scaled_dot_product_attention = masked
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = original


def masked_processor(inner, radial: ReferenceRadial, layer: int) -> MaskedProcessor:
    """A MaskedProcessor whose call signature is the inner processor's (diffusers drops keyword arguments the
    processor's signature does not name)."""

    def call(self, *args, **kwargs):
        return MaskedProcessor.__call__(self, *args, **kwargs)

    call.__signature__ = inspect.signature(type(inner).__call__)
    cls = type(f"Masked{type(inner).__name__}", (MaskedProcessor,), {"__call__": call})
    return cls(inner, radial, layer)


@contextlib.contextmanager
def reference_radial(attention_modules, radial):
    """Install MaskedProcessor on `attention_modules` (lists of (layer index, Attention)) for the block."""
    saved = [(m, m.processor) for _, m in attention_modules]
    for layer, m in attention_modules:
        m.processor = masked_processor(m.processor, radial, layer)
    try:
        yield radial
    finally:
        for m, processor in saved:
            m.processor = processor


@pytest.fixture
def small_tiles(monkeypatch):
    """Each family's radial defaults with 8-token tiles (tiny models have 24 tokens per frame)."""
    from mlx_video.families.hunyuan.pipeline import HunyuanPipeline
    from mlx_video.families.mochi.pipeline import MochiPipeline
    from mlx_video.families.wan.pipeline import WanPipeline

    for cls in (WanPipeline, HunyuanPipeline, MochiPipeline):
        monkeypatch.setattr(cls, "radial_defaults", dataclasses.replace(cls.radial_defaults, block=BLOCK))


def _ours(root, model, tag, init, size, frames, steps, guidance, extra):
    np.save(root / f"init_{tag}.npy", init)
    out = root / f"out_{tag}.npy"
    main(["generate", "--model", str(model), "--prompt", PROMPT, "--size", size, "--frames", str(frames),
          "--steps", str(steps), "--guidance", str(guidance), "--init-latents", str(root / f"init_{tag}.npy"),
          "--save-latents", str(out), "--quiet", "--overwrite", *extra])
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def _check(name, ours, ref, dense, sidecar, radial, dense_steps, dense_blocks):
    err = rel_err(ours, ref)
    print(f"{name} radial end to end: relative error {err:.2e} (radial vs dense: {rel_err(ref, dense):.2e})")
    assert err < 1e-3
    assert rel_err(ref, dense) > 1e-2  # the mask changed the result
    assert radial.sparse_calls > 0
    stats = sidecar["settings"]
    assert stats["attention"] == f"radial:{dense_steps}:{dense_blocks}"
    assert stats["attention_dense_steps"] == dense_steps and stats["attention_dense_blocks"] == dense_blocks
    assert 0 < stats["attention_score_fraction"] < 1


def _check_memory_estimate(folder, size, frames):
    """The memory preflight follows --attention where attention is not fused (MLX on CPU): with every step and
    block sparse (radial:0:0) the denoising stage counts the sparse calls' scores and gathered keys
    (tests/test_radial.py checks that figure against the calls), less than the dense scores at this size; with a
    dense step or a dense block the dense scores count again."""
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    pipe = Pipeline.from_pretrained(str(folder))
    width, height = (int(v) for v in size.split("x"))

    def denoising(attention):
        s = pipe.resolve(GenerationSettings(prompt="x", width=width, height=height, frames=frames, attention=attention))
        return pipe.estimate_memory(s)["stages"]["denoising"]

    dense = denoising(None)
    assert denoising("radial:0:0") < dense
    assert denoising("radial:1:0") == denoising("radial:0:1") == denoising("dense") == dense


def test_wan_a14b_radial_matches_diffusers_with_the_reference_mask(a14b, small_tiles):
    from support.wan import use_official_sigmas

    from mlx_video.families.wan.config import RADIAL_DEFAULTS

    root, pipe = a14b
    width, height, frames, steps = 96, 64, 17, 4  # latent 5 x 8 x 12: 5 frames of 4 x 6 tokens
    init = np.random.default_rng(7).standard_normal((1, 4, 5, 8, 12)).astype(np.float32)
    use_official_sigmas(pipe)
    radial = ReferenceRadial(5, 24, RADIAL_DEFAULTS.decay, True, dense_steps=1, dense_blocks=1)
    modules = [(i, b.attn1) for t in (pipe.transformer, pipe.transformer_2) for i, b in enumerate(t.blocks)]
    with reference_radial(modules, radial), torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0,
                   latents=torch.from_numpy(init), output_type="latent", max_sequence_length=512,
                   callback_on_step_end=radial.on_step_end).frames.numpy()
    common = (init, f"{width}x{height}", frames, steps, 4.0)
    extra = ["--negative-prompt", NEGATIVE, "--guidance-2", "3.0", "--shift", "12"]
    ours, sidecar = _ours(root, root / "mlx", "radial", *common, [*extra, "--attention", "radial:1:1"])
    dense, _ = _ours(root, root / "mlx", "dense", *common, extra)
    _check_memory_estimate(root / "mlx", f"{width}x{height}", frames)
    assert set(sidecar["settings"]["experts"]) == {"transformer", "transformer_2"}  # steps counted across both
    _check("Wan A14B", ours, ref, dense, sidecar, radial, 1, 1)


def test_hunyuan_radial_matches_diffusers_with_the_reference_mask(tmp_path, small_tiles):
    from support.hunyuan import build_tiny_hunyuan_pipeline

    from mlx_video.families.hunyuan.config import RADIAL_DEFAULTS

    pipe = build_tiny_hunyuan_pipeline(tmp_path / "diffusers")
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    width, height, frames, steps = 96, 64, 17, 3
    init = np.random.default_rng(3).standard_normal((1, 6, 5, 8, 12)).astype(np.float32)
    radial = ReferenceRadial(5, 24, RADIAL_DEFAULTS.decay, False, dense_steps=1, dense_blocks=1)
    t = pipe.transformer
    modules = [(i, b.attn) for i, b in enumerate(t.transformer_blocks)]
    modules += [(len(t.transformer_blocks) + i, b.attn) for i, b in enumerate(t.single_transformer_blocks)]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1].numpy()
    with reference_radial(modules, radial), torch.no_grad():
        ref = pipe(prompt=PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                   guidance_scale=6.0, latents=torch.from_numpy(init), output_type="latent", sigmas=sigmas,
                   max_sequence_length=256, callback_on_step_end=radial.on_step_end).frames.numpy()
    common = (init, f"{width}x{height}", frames, steps, 6.0)
    ours, sidecar = _ours(tmp_path, tmp_path / "mlx", "radial", *common, ["--attention", "radial:1:1"])
    dense, _ = _ours(tmp_path, tmp_path / "mlx", "dense", *common, [])
    _check_memory_estimate(tmp_path / "mlx", f"{width}x{height}", frames)
    _check("HunyuanVideo", ours, ref, dense, sidecar, radial, 1, 1)


def test_mochi_radial_matches_diffusers_with_the_reference_mask(tmp_path, small_tiles):
    from support.mochi import build_tiny_mochi_pipeline

    from mlx_video.families.mochi.config import RADIAL_DEFAULTS

    pipe = build_tiny_mochi_pipeline(tmp_path / "diffusers")
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    width, height, frames, steps = 96, 64, 25, 3  # latent 5 x 8 x 12
    init = np.random.default_rng(5).standard_normal((1, 12, 5, 8, 12)).astype(np.float32)
    radial = ReferenceRadial(5, 24, RADIAL_DEFAULTS.decay, False, dense_steps=1, dense_blocks=0)
    modules = [(i, b.attn1) for i, b in enumerate(pipe.transformer.transformer_blocks)]
    with reference_radial(modules, radial), torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=4.5, latents=torch.from_numpy(init),
                   output_type="latent", max_sequence_length=256,
                   callback_on_step_end=radial.on_step_end).frames.numpy()
    common = (init, f"{width}x{height}", frames, steps, 4.5)
    extra = ["--negative-prompt", NEGATIVE]
    ours, sidecar = _ours(tmp_path, tmp_path / "mlx", "radial", *common, [*extra, "--attention", "radial:1:0"])
    dense, _ = _ours(tmp_path, tmp_path / "mlx", "dense", *common, extra)
    _check_memory_estimate(tmp_path / "mlx", f"{width}x{height}", frames)
    _check("Mochi", ours, ref, dense, sidecar, radial, 1, 0)


@pytest.fixture
def small_tiles_hunyuan15(monkeypatch):
    """HunyuanVideo 1.5's radial defaults (a property of the model) with 8-token tiles."""
    from mlx_video.families.hunyuan15.config import radial_defaults
    from mlx_video.families.hunyuan15.pipeline import Hunyuan15Pipeline

    small = property(lambda self: dataclasses.replace(radial_defaults(self.spec), block=BLOCK))
    monkeypatch.setattr(Hunyuan15Pipeline, "radial_defaults", small)


def counting_steps(scheduler, radial: ReferenceRadial):
    """`scheduler.step` that advances the reference's step index (for pipelines without a step-end callback)."""
    step = scheduler.step

    def advance(*args, **kwargs):
        out = step(*args, **kwargs)
        radial.step += 1
        return out

    return advance


@pytest.mark.usefixtures("small_tiles_hunyuan15")
def test_hunyuan15_radial_matches_diffusers_with_the_reference_mask(tmp_path, monkeypatch):
    """T2V with CFG and a quoted glyph string: the joint sequence is [video; glyph tokens; Qwen tokens] here, and
    diffusers' [video; image slots; glyph slots; Qwen slots] (padding masked): every non-video token kept whole."""
    from support.hunyuan15 import build_tiny_t2v_pipeline

    from mlx_video.families.hunyuan15.config import RADIAL_HUNYUAN

    pipe = build_tiny_t2v_pipeline(tmp_path / "diffusers")
    for name, value in (("tokenizer_max_length", 40), ("tokenizer_2_max_length", 32), ("vision_num_semantic_tokens", 4)):
        setattr(pipe, name, value)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    width, height, frames, steps = 96, 64, 17, 3  # latent 5 x 4 x 6: 5 frames of 24 tokens (16x VAE, patch 1)
    prompt = 'a neon sign that reads "OPEN" at sunset'
    init = np.random.default_rng(4).standard_normal((1, 4, 5, 4, 6)).astype(np.float32)
    radial = ReferenceRadial(5, 24, RADIAL_HUNYUAN.decay, False, dense_steps=1, dense_blocks=1)
    modules = [(i, b.attn) for i, b in enumerate(pipe.transformer.transformer_blocks)]
    monkeypatch.setattr(pipe.scheduler, "step", counting_steps(pipe.scheduler, radial))
    with reference_radial(modules, radial), torch.no_grad():
        ref = pipe(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                   latents=torch.from_numpy(init), output_type="latent").frames.numpy()
    assert radial.step == steps
    run = ["generate", "--model", str(tmp_path / "mlx"), "--prompt", prompt, "--size", f"{width}x{height}",
           "--frames", str(frames), "--steps", str(steps), "--guidance", "6", "--init-latents",
           str(tmp_path / "init.npy"), "--quiet", "--overwrite"]
    np.save(tmp_path / "init.npy", init)
    main([*run, "--save-latents", str(tmp_path / "radial.npy"), "--attention", "radial:1:1"])
    main([*run, "--save-latents", str(tmp_path / "dense.npy")])
    ours, dense = np.load(tmp_path / "radial.npy"), np.load(tmp_path / "dense.npy")
    sidecar = json.loads((tmp_path / "radial.json").read_text())
    _check_memory_estimate(tmp_path / "mlx", f"{width}x{height}", frames)
    _check("HunyuanVideo 1.5", ours, ref, dense, sidecar, radial, 1, 1)


@pytest.mark.usefixtures("small_tiles_hunyuan15")
def test_hunyuan15_i2v_radial_matches_diffusers_with_the_reference_mask(tmp_path, monkeypatch):
    """The step-distilled I2V model (guidance 1, MeanFlow) from an image file: the SigLIP image tokens come first
    in the joint text sequence, after the video, and are kept whole; its bucket gives 4 x 4 tokens a frame, so
    that, under the reference's thinning, each latent frame attends only to itself and the text."""
    from PIL import Image
    from support.hunyuan15 import build_tiny_i2v_pipeline

    from mlx_video.families.hunyuan15.config import RADIAL_HUNYUAN

    pipe = build_tiny_i2v_pipeline(tmp_path / "diffusers")
    for name, value in (("tokenizer_max_length", 40), ("tokenizer_2_max_length", 32)):
        setattr(pipe, name, value)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    assert pipe.video_processor.calculate_default_height_width(64, 64, 64) == (64, 64)
    pixels = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    frames, steps = 17, 3
    init = np.random.default_rng(9).standard_normal((1, 4, 5, 4, 4)).astype(np.float32)
    radial = ReferenceRadial(5, 16, RADIAL_HUNYUAN.decay, False, dense_steps=1, dense_blocks=1)
    modules = [(i, b.attn) for i, b in enumerate(pipe.transformer.transformer_blocks)]
    monkeypatch.setattr(pipe.scheduler, "step", counting_steps(pipe.scheduler, radial))
    with reference_radial(modules, radial), torch.no_grad():
        ref = pipe(image=Image.open(tmp_path / "image.png"), prompt=PROMPT, num_frames=frames,
                   num_inference_steps=steps, latents=torch.from_numpy(init), output_type="latent").frames.numpy()
    np.save(tmp_path / "init.npy", init)
    run = ["generate", "--model", str(tmp_path / "mlx"), "--prompt", PROMPT, "--image", str(tmp_path / "image.png"),
           "--frames", str(frames), "--steps", str(steps), "--init-latents", str(tmp_path / "init.npy"), "--quiet",
           "--overwrite"]
    main([*run, "--save-latents", str(tmp_path / "radial.npy"), "--attention", "radial:1:1"])
    main([*run, "--save-latents", str(tmp_path / "dense.npy")])
    ours, dense = np.load(tmp_path / "radial.npy"), np.load(tmp_path / "dense.npy")
    sidecar = json.loads((tmp_path / "radial.json").read_text())
    _check("HunyuanVideo 1.5 I2V", ours, ref, dense, sidecar, radial, 1, 1)


def test_hunyuan15_radial_defaults_per_model():
    """HunyuanVideo 1.0's parameters with 12 of 50 dense steps, the same share of a shorter default run (the
    8-step model: 2); the super-resolution models have none, so --attention radial is refused for them before
    any weights are read."""
    from mlx_video.errors import MlxVideoError
    from mlx_video.families.hunyuan.config import RADIAL_DEFAULTS as HUNYUAN
    from mlx_video.families.hunyuan15.config import radial_defaults
    from mlx_video.pipelines.attention_mode import check_attention
    from mlx_video.registry import MODELS

    family = [spec for spec in MODELS.values() if spec.family == "hunyuan15"]
    for spec in family:
        found = radial_defaults(spec)
        if spec.task == "sr":
            assert found is None
            with pytest.raises(MlxVideoError, match="no radial attention parameters"):
                check_attention("radial", found, spec.id)
            continue
        assert dataclasses.replace(found, dense_steps=12, source="") == dataclasses.replace(HUNYUAN, source="")
        assert found.dense_steps == (12 if spec.steps == 50 else 2), spec.id
    assert {spec.task for spec in family} == {"t2v", "i2v", "sr"} and any(s.steps == 8 for s in family)


def test_attention_option_is_checked_before_any_weights_are_read(a14b, capsys):
    from mlx_video.errors import MlxVideoError
    from mlx_video.pipelines.attention_mode import parse_attention

    assert parse_attention("radial:12:3").dense_steps == 12 and parse_attention("radial").dense_steps is None
    for bad, words in (("sparse", "unknown mode"), ("radial:x", "DENSE_STEPS"), ("radial:1:2:3", "expected"),
                       ("dense:4", "expected"), ("radial:-1", "DENSE_STEPS")):
        with pytest.raises(MlxVideoError, match=words):
            parse_attention(bad)
    root, _ = a14b
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--frames", "5",
              "--steps", "1", "--attention", "radial:two", "--output", str(root / "never.mp4"), "--quiet"])
    assert e.value.code == 1 and "DENSE_STEPS must be a whole number" in capsys.readouterr().err
    assert not (root / "never.mp4").exists()
