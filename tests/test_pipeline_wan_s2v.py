"""Wan2.2-S2V end to end: the official release layout converted, two chained clips against the official pipeline,
the CLI with a voice track muxed into the mp4, and the refusals that come before any weights are read.

The reference is recorded: the official `WanS2V.generate` (Wan-Video/Wan2.2, not on PyPI) was run once on CPU
torch on a tiny random model by `tests/fixtures/s2v/make_pipeline_reference.py`, which saved the model, the
inputs its encoders produced and what it computed (see that file). Here the saved official checkpoint is laid
out as the release lays it out, converted with `mlxvid convert`, and run with the same encoder outputs and noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mlx_video.errors import MlxVideoError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from support.wan_s2v import S2V_FIXTURE as FIXTURE, build_s2v_release, s2v_reference, write_wav  # noqa: E402

# The official preprocessing from files (portraits not at the video size, a pose video): make_portrait_reference.py
PORTRAITS = FIXTURE.parent / "portrait_reference.safetensors"


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference():
    return s2v_reference()


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """The recorded official checkpoint in the release layout (plus a tiny UMT5, tokenizer and wav2vec2), converted."""
    return build_s2v_release(tmp_path_factory.mktemp("s2v"), reference)


@pytest.fixture(scope="module")
def pipe(converted):
    from mlx_video.pipelines.base import Pipeline

    return Pipeline.from_pretrained(str(converted / "mlx"))


def test_conversion_writes_a_self_describing_s2v_folder(converted, pipe):
    manifest = json.loads((converted / "mlx" / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-s2v-14b" and manifest["task"] == "s2v"
    assert set(manifest["components"]) >= {"transformer", "text_encoder", "vae", "audio_encoder"}
    assert manifest["size_multiple"] == 64 and manifest["frame_offset"] == 0
    assert type(pipe).__name__ == "WanS2VPipeline"
    assert pipe.transformer_config.motion_frames == 13 and pipe.transformer_config.audio_layers == 5


def use_recorded_encoders(pipe, reference, monkeypatch, noise: dict) -> None:
    """The recorded text and audio encoder outputs and per-clip noise (`noise[R]`, official layout) in place of
    the pipeline's own."""
    from mlx_video.audio.features import FrameAudioFeatures

    tensors, config, st, _ = reference
    text_len = config["text_len"]

    def encode_text(prompts, progress=False):
        out = np.zeros((len(prompts), text_len, config["text_dim"]), np.float32)
        for i, p in enumerate(prompts):
            ctx = tensors["context" if p == "prompt" else "context_null"]
            out[i, : len(ctx)] = ctx
        return mx.array(out)

    audio = tensors["audio"][0].transpose(2, 0, 1)  # [layers, dim, frames] -> (frames, layers, dim)
    monkeypatch.setattr(pipe, "encode_text", encode_text)
    monkeypatch.setattr(pipe, "encode_audio", lambda s, progress=False: FrameAudioFeatures(
        mx.array(audio), st["clips"], st["frames"], audio.shape[0]))
    monkeypatch.setattr(pipe, "clip_noise", lambda s, r: mx.array(noise[r]).transpose(1, 2, 3, 0)[None])


def run_like_official(pipe, reference, monkeypatch, tmp_path, pose_video=None, **options):
    """Our pipeline with the recorded encoder outputs and per-clip noise in place of its own."""
    from mlx_video.io.image import fit_image
    from mlx_video.pipelines.base import GenerationSettings

    tensors, _, st, _ = reference
    use_recorded_encoders(pipe, reference, monkeypatch, {r: tensors[f"noise.{r}"] for r in range(st["clips"])})
    voice = write_wav(tmp_path / "voice.wav", 2.0)
    settings = GenerationSettings(
        prompt="prompt", negative_prompt="negative", width=st["width"], height=st["height"], frames=st["frames"],
        steps=st["steps"], shift=st["shift"], guidance=st["guidance"], seed=st["seed"], fps=st["fps"],
        audio=str(voice), clips=st["clips"], image="portrait.png", pose_video=pose_video, **options,
    )
    return pipe.generate(settings, image=fit_image(tensors["image"], st["width"], st["height"]))


@pytest.fixture(scope="module")
def plain(reference, pipe, tmp_path_factory):
    """The default chain run like the official pipeline, once for the tests that compare against it (each run
    loads its weights afresh, so what ran before does not change it)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_like_official(pipe, reference, monkeypatch, tmp_path_factory.mktemp("plain"))


def clip_errors(result, tensors, st, prefix="") -> tuple[float, float]:
    per_clip = st["frames"] // 4
    ours = result.latents[0]  # (C, clips * per_clip, h, w)
    first = tensors[prefix + "decode_in.0"][:, 1:]  # after the reference latent
    second = tensors[prefix + "decode_in.1"][:, -per_clip:]  # after the motion latents
    return rel(ours[:, :per_clip], first), rel(ours[:, per_clip:], second)


def test_two_chained_clips_match_the_official_pipeline(reference, plain):
    """Same encoder outputs and per-clip noise: every clip's latents within 1e-3 of the official ones (the
    second clip's motion context comes from the first clip's decoded pixels, encoded again), and the video."""
    tensors, _, st, _ = reference
    result = plain
    e0, e1 = clip_errors(result, tensors, st)
    print(f"clip latents vs official: {e0:.2e}, {e1:.2e}")
    assert e0 < 1e-3 and e1 < 1e-3, (e0, e1)

    official = tensors["video"]  # (frames, H, W, 3) uint8
    assert result.video.shape == official.shape == (st["frames"] - 3 + st["frames"], st["height"], st["width"], 3)
    diff = np.abs(result.video.astype(np.int32) - official.astype(np.int32))
    print(f"video vs official (8-bit levels): max {diff.max()}, differing {(diff > 0).mean():.2%}")
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # two clips of 3 steps, each step a conditional and an unconditional evaluation
    assert result.stats["clips"] == 2 and result.stats["transformer_evals"] == 2 * st["steps"] * 2


def test_a_pose_video_is_followed_like_the_official_pipeline(reference, pipe, tmp_path, monkeypatch):
    """The recorded pose frames (fewer than the chain needs: the rest is black) as a PNG folder."""
    from PIL import Image

    tensors, _, st, _ = reference
    frames = np.random.RandomState(7).randint(0, 256, size=(st["pose_frames"], st["height"], st["width"], 3))
    folder = tmp_path / "pose"
    folder.mkdir()
    for i, frame in enumerate(frames.astype(np.uint8)):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    result = run_like_official(pipe, reference, monkeypatch, tmp_path, pose_video=str(folder))
    e0, e1 = clip_errors(result, tensors, st, prefix="pose.")
    print(f"clip latents with a pose video vs official: {e0:.2e}, {e1:.2e}")
    assert e0 < 1e-3 and e1 < 1e-3, (e0, e1)
    plain = clip_errors(result, tensors, st)
    assert min(plain) > 1e-2  # the pose changed the result: the comparison above is not vacuous


@pytest.fixture(scope="module")
def portraits():
    with safe_open(str(PORTRAITS), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_pose_video(path: Path, blocks: np.ndarray, block: int, fps: int) -> Path:
    """`blocks` (frames, rows, cols, 3) with every value a block x block square, losslessly (FFV1) at `fps`."""
    import av

    frames = np.repeat(np.repeat(blocks, block, axis=1), block, axis=2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("case", ["pad", "crop"])
def test_from_the_portrait_file_through_the_cli_like_the_official_pipeline(case, reference, portraits, converted, pipe,
                                                                           tmp_path, monkeypatch):
    """The CLI path (`run.prepare` / `run.execute`) from a portrait file, the size from the max-area rule, the
    official fit (no --image-fit): "pad", a 100x60 portrait for a 128x64 video (11 black rows above and below);
    "crop", a 50x120 portrait for a 64x128 video (cut from column 12) following a 150x200 pose video at 30 fps
    (every 2nd frame read, 18 of the 24 the chain needs). The fitted portrait and each clip's latents against the
    official pipeline with the real torchvision transforms."""
    from PIL import Image

    from mlx_video.run import execute, prepare

    _, _, st, _ = reference
    tensors, meta = portraits
    expected = json.loads(meta["cases"])[case]
    use_recorded_encoders(pipe, reference, monkeypatch, {r: tensors[f"{case}.noise.{r}"] for r in range(st["clips"])})
    Image.fromarray(tensors[f"{case}.portrait"]).save(tmp_path / "face.png")
    options = dict(model=str(converted / "mlx"), prompt="prompt", negative_prompt="negative",
                   image=str(tmp_path / "face.png"), audio=str(write_wav(tmp_path / "voice.wav", 2.0)),
                   frames=st["frames"], steps=st["steps"], shift=st["shift"], guidance=st["guidance"], seed=st["seed"],
                   clips=st["clips"], output=str(tmp_path / "talk.mp4"), quiet=True)
    if case == "crop":
        options["pose_video"] = str(write_pose_video(tmp_path / "pose.mkv", tensors["pose_blocks"],
                                                     int(meta["pose_block"]), int(meta["pose_fps"])))
    job = prepare(options, pipe=pipe)
    assert (job.settings.height, job.settings.width) == (expected["height"], expected["width"])
    diff = np.abs(np.round((job.pixels + 1.0) * 127.5).astype(np.int32) - tensors[f"{case}.fitted"].astype(np.int32))
    out = execute(job, echo=lambda *a: None)
    per_clip = st["frames"] // 4
    ours = out["latents"][0]
    errors = [rel(ours[:, r * per_clip:(r + 1) * per_clip], tensors[f"{case}.latents.{r}"]) for r in range(st["clips"])]
    print(f"{case}: fitted portrait vs official max {diff.max()} mean {diff.mean():.3f} levels; clip latents "
          + ", ".join(f"{e:.2e}" for e in errors))
    assert diff.max() <= 1, diff.max()
    assert max(errors) < 1e-5, errors
    assert out["record"]["image_fit"] == "short-side"
    if case == "crop":  # the pose video changed the result: the comparison above is not vacuous
        plain = [rel(ours[:, r * per_clip:(r + 1) * per_clip], tensors[f"{case}.plain_latents.{r}"])
                 for r in range(st["clips"])]
        assert min(plain) > 1e-2, plain


def test_cli_writes_the_voice_into_the_mp4(converted, reference, tmp_path):
    """The whole command: the real (tiny) encoders, two clips, the audio muxed in; read back with PyAV."""
    import av
    from PIL import Image

    from mlx_video.cli import main

    tensors, _, st, _ = reference
    Image.fromarray(tensors["image"]).save(tmp_path / "face.png")
    voice = write_wav(tmp_path / "voice.wav", 3.0)
    out = tmp_path / "talk.mp4"
    main(["generate", "--model", str(converted / "mlx"), "--image", str(tmp_path / "face.png"), "--audio", str(voice),
          "--prompt", "a person talks", "--steps", "2", "--clips", "2", "--frames", "12", "--output", str(out),
          "--quiet"])
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video))
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(sound.duration * sound.time_base)
    assert frames == 12 - 3 + 12 and (video.height, video.width) == (st["height"], st["width"])
    assert abs(audio_seconds - video_seconds) <= 1 / 16, (audio_seconds, video_seconds)
    from mlx_video.io.sidecar import sidecar_path

    record = json.loads(sidecar_path(out).read_text())["settings"]
    print({k: record[k] for k in ("audio", "clips", "transformer_evals", "audio_track") if k in record})
    assert record["audio"] == str(voice) and record["audio_track"]["codec"] == "aac"


def test_size_follows_the_portrait():
    from mlx_video.families.wan.s2v_pipeline import size_for_image

    # a 1080x1920 portrait at the 1024x704 area: the largest multiple-of-64 size with its aspect ratio that fits
    h, w = size_for_image(1920, 1080, 1024 * 704)
    assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 704 and h > w
    assert abs(h / w - 1920 / 1080) < 0.15
    assert size_for_image(64, 128, 64 * 128) == (64, 128)  # small enough: kept (only rounded up to 64)


def test_bad_audio_input_is_refused_before_weights_are_read(pipe, tmp_path, reference):
    from mlx_video.pipelines.base import GenerationSettings

    _, _, st, _ = reference
    base = dict(prompt="p", width=st["width"], height=st["height"], image="face.png")
    with pytest.raises(MlxVideoError, match="--audio"):
        pipe.resolve(GenerationSettings(**base))
    with pytest.raises(MlxVideoError, match="no such file"):
        pipe.resolve(GenerationSettings(**base, audio=str(tmp_path / "missing.wav")))
    silent = write_wav(tmp_path / "silent.wav", 1.0, amplitude=0.0)
    with pytest.raises(MlxVideoError, match="silent"):
        pipe.resolve(GenerationSettings(**base, audio=str(silent)))
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(MlxVideoError, match="junk.wav"):
        pipe.resolve(GenerationSettings(**base, audio=str(tmp_path / "junk.wav")))
    tiny = write_wav(tmp_path / "blip.wav", 0.01)
    with pytest.raises(MlxVideoError, match="at least"):
        pipe.resolve(GenerationSettings(**base, audio=str(tiny)))
    voice = write_wav(tmp_path / "voice.wav", 1.0)
    with pytest.raises(MlxVideoError, match="4n"):
        pipe.resolve(GenerationSettings(**base, audio=str(voice), frames=81))
    with pytest.raises(MlxVideoError, match="--clips"):
        pipe.resolve(GenerationSettings(**base, audio=str(voice), clips=0))
    s = pipe.resolve(GenerationSettings(**base, audio=str(voice), frames=12))
    # 1 s of audio at 16 fps is 16 frames: one whole 12-frame clip and the start of a second
    assert pipe.clip_count(s) == 2 and pipe.output_frames(s) == 12 - 3 + 12


def test_audio_options_are_refused_for_models_without_audio(a14b, tmp_path):
    from mlx_video.run import prepare

    root, _ = a14b
    voice = write_wav(tmp_path / "voice.wav", 1.0)
    with pytest.raises(MlxVideoError, match="--audio: for audio-driven models"):
        prepare({"model": str(root / "mlx"), "prompt": "p", "audio": str(voice), "output": str(tmp_path / "x.mp4")})


def test_cli_refusals_for_s2v(converted, tmp_path, reference):
    from mlx_video.run import prepare

    tensors, _, _, _ = reference
    from PIL import Image

    Image.fromarray(tensors["image"]).save(tmp_path / "face.png")
    voice = write_wav(tmp_path / "voice.wav", 1.0)
    common = {"model": str(converted / "mlx"), "prompt": "p", "image": str(tmp_path / "face.png"), "audio": str(voice),
              "output": str(tmp_path / "x.mp4")}
    with pytest.raises(MlxVideoError, match="--duration is not supported"):
        prepare({**common, "duration": 4})
    with pytest.raises(MlxVideoError, match="--save-latents is not supported"):
        prepare({**common, "save_latents": str(tmp_path / "x.npy")})
    with pytest.raises(MlxVideoError, match="portrait"):
        prepare({k: v for k, v in common.items() if k != "image"})
    job = prepare({**common, "frames": 12})
    assert (job.settings.width, job.settings.height) == (128, 64)  # from the portrait's size
    assert job.record()["image_fit"] == "short-side"  # the official fit by default; another only when asked
    assert prepare({**common, "frames": 12, "image_fit": "crop"}).record()["image_fit"] == "crop"
    assert not math.isnan(job.estimate["peak_bytes"])


def test_step_caches_per_clip(reference, pipe, plain, tmp_path, monkeypatch):
    """Threshold 0 is the uncached run bit for bit; a large threshold reuses steps in each clip (fresh state per
    clip), with transformer_evals counting what ran; magcache has no published S2V table and is refused."""
    tensors, _, st, _ = reference
    for method in ("easycache", "fbcache"):
        exact = run_like_official(pipe, reference, monkeypatch, tmp_path, cache=f"{method}:0")
        assert np.array_equal(exact.latents, plain.latents) and exact.stats["reused_steps"] == [[], []]
    cached = run_like_official(pipe, reference, monkeypatch, tmp_path, cache="fbcache:10")
    assert cached.stats["transformer_evals"] < cached.stats["transformer_evals_uncached"] == 2 * st["steps"] * 2
    assert all(steps for steps in cached.stats["reused_steps"])  # each clip reused a step
    print(f"fbcache:10 evals {cached.stats['transformer_evals']}/{cached.stats['transformer_evals_uncached']}, "
          f"deviation {rel(cached.latents, plain.latents):.2e}")
    from mlx_video.pipelines.base import GenerationSettings

    with pytest.raises(MlxVideoError, match="magcache"):
        pipe.resolve(GenerationSettings(prompt="p", width=st["width"], height=st["height"], image="x.png",
                                        audio=str(write_wav(tmp_path / "v.wav", 1.0)), cache="magcache"))


def test_taylorseer_runs_each_clip_as_a_run_of_its_own(reference, pipe, tmp_path, monkeypatch):
    """TaylorSeer (lite mode) on S2V. diffusers has no S2V pipeline to compare with (its TaylorSeer parity is in
    tests/test_cache_taylorseer.py, on Wan, HunyuanVideo and Mochi); here its rule is applied to each clip as a
    denoising run of its own (fresh state per clip, as a diffusers hook's state is per run): with 2 warm-up
    steps and interval 2 each clip computes steps 0 and 1 of both guidance branches and forecasts step 2 as the
    first-order Taylor series of those two outputs (out1 + (out1 - out0)), float32 factors."""
    from mlx_video.pipelines.cache import StepCache, taylorseer_evaluations

    tensors, _, st, _ = reference
    assert st["steps"] == 3 and st["clips"] == 2
    outputs, real = [], StepCache.__call__

    def recording(self, model, x, t, context):
        out = real(self, model, x, t, context)
        outputs.append((id(self), self.step, self._calls - 1, np.array(out.astype(mx.float32))))
        return out

    monkeypatch.setattr(StepCache, "__call__", recording)
    option = "taylorseer:disable_cache_before_step=2,cache_interval=2,max_order=1,taylor_factors_dtype=float32"
    forecast = run_like_official(pipe, reference, monkeypatch, tmp_path, cache=option)
    stats = forecast.stats
    per_clip = 2 * taylorseer_evaluations(3, disable_cache_before_step=2, cache_interval=2)  # two branches
    assert stats["transformer_evals"] == st["clips"] * per_clip == 8 < stats["transformer_evals_uncached"] == 12
    assert stats["forecast_steps"] == [[2], [2]] and stats["cache_config"]["taylor_factors_dtype"] == "float32"
    caches = list(dict.fromkeys(c for c, *_ in outputs))
    assert len(caches) == st["clips"]  # a fresh cache per clip
    for cache in caches:
        out = {(step, call): o for c, step, call, o in outputs if c == cache}
        calls = sorted({call for _, call in out})  # one batched call (both branches) or one per branch
        assert sorted(out) == [(i, c) for i in range(3) for c in calls]
        assert sum(out[0, c].shape[0] for c in calls) == 2  # the conditional and the unconditional branch
        for c in calls:
            expected = out[1, c] + (out[1, c] - out[0, c])
            np.testing.assert_allclose(out[2, c], expected, rtol=1e-6, atol=1e-6)
            assert np.abs(out[2, c] - out[1, c]).max() > 1e-3  # a forecast, not the last output reused


def test_lora_fused_at_load_equals_merged_weights(reference, pipe, plain, converted, tmp_path, monkeypatch):
    """A ComfyUI-named LoRA on backbone and S2V-only layers (audio injector, FramePack) at strength 0.6 gives the
    run of a conversion whose official weights had the LoRA merged in beforehand (W += 0.6 * alpha/rank * up @ down)."""
    import shutil

    from mlx_video.cli import main
    from mlx_video.pipelines.base import Pipeline

    tensors, _, _, _ = reference
    rng = np.random.default_rng(3)
    targets = ["blocks.0.self_attn.q", "blocks.2.ffn.2", "audio_injector.injector.1.k", "text_embedding.0"]
    lora, merged = {}, {k[len("model."):]: v.astype(np.float32) for k, v in tensors.items() if k.startswith("model.")}
    rank, alpha, strength = 3, 6.0, 0.6
    for name in targets:
        out_dim, in_dim = merged[name + ".weight"].shape
        down = rng.normal(0, 0.3, (rank, in_dim)).astype(np.float32)
        up = rng.normal(0, 0.3, (out_dim, rank)).astype(np.float32)
        lora[f"diffusion_model.{name}.lora_down.weight"] = down
        lora[f"diffusion_model.{name}.lora_up.weight"] = up
        lora[f"diffusion_model.{name}.alpha"] = np.array(alpha, np.float32)
        merged[name + ".weight"] += strength * alpha / rank * (up @ down)
    lora_path = tmp_path / "s2v_lora.safetensors"
    save_file(lora, str(lora_path))

    src = tmp_path / "merged_release"
    shutil.copytree(converted / "Wan2.2-S2V-14B", src)
    save_file(merged, str(src / "diffusion_pytorch_model.safetensors"))
    main(["convert", str(src), str(tmp_path / "merged_mlx"), "--dtype", "fp32"])
    merged_pipe = Pipeline.from_pretrained(str(tmp_path / "merged_mlx"))

    fused = run_like_official(pipe, reference, monkeypatch, tmp_path,
                              loras=[{"path": str(lora_path), "scale": strength}])
    expected = run_like_official(merged_pipe, reference, monkeypatch, tmp_path)
    err = rel(fused.latents, expected.latents)
    print(f"S2V LoRA fused vs merged: {err:.2e} (the LoRA moves the result by {rel(plain.latents, expected.latents):.2f})")
    assert err < 1e-5 and rel(plain.latents, expected.latents) > 1e-2


def test_start_from_the_portrait_like_the_official_pipeline(reference, pipe, tmp_path, monkeypatch):
    """--start-from-portrait is the official init_first_frame (--start_from_ref): the portrait as the last 6 frames
    of the first motion buffer, the first clip's motion tokens kept and all of its frames."""
    tensors, _, st, _ = reference
    result = run_like_official(pipe, reference, monkeypatch, tmp_path, start_from_image=True)
    per_clip = st["frames"] // 4
    errors = [rel(result.latents[0][:, r * per_clip:(r + 1) * per_clip],
                  tensors[f"start_from_ref.decode_in.{r}"][:, -per_clip:]) for r in range(st["clips"])]
    print("clip latents starting from the portrait vs official: " + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < 1e-3, errors
    assert result.video.shape[0] == 2 * st["frames"]  # nothing dropped from the first clip
    assert min(clip_errors(result, tensors, st)) > 1e-2  # not the default chain's result
