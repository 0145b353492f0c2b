"""Production layer: presets, quality profiles, durations, overlays, previews, batch manifests with resume,
replay from a sidecar, and the CLI fixes (default output, unwritable outputs, option ranges)."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
from PIL import Image

from mlx_video.cli import main
from mlx_video.errors import MlxVideoError
from mlx_video.registry import MODELS
from support.cli import gen, run_error

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A tiny TI2V-5B-style pipeline (Wan 2.2 VAE, one transformer), converted to fp32."""
    from support.wan_checkpoints import converted_tiny_ti2v

    return converted_tiny_ti2v(tmp_path_factory.mktemp("ti2v"))


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), stream.average_rate


# ---- presets, profiles, durations (pure) ----

def test_render_size_follows_aspect_and_quality():
    from mlx_video.presets import BUILTIN_PRESETS, pick_render_size

    a14b, ti2v = MODELS["wan2.2-t2v-a14b"], MODELS["wan2.2-ti2v-5b"]
    wide, short, square = (BUILTIN_PRESETS[n] for n in ("linkedin-wide", "youtube-short", "linkedin-square"))
    assert pick_render_size(a14b, wide.width, wide.height, "high") == ((1280, 720), True)
    assert pick_render_size(a14b, short.width, short.height, "high") == ((720, 1280), True)
    assert pick_render_size(a14b, short.width, short.height, "medium") == ((480, 832), False)  # 9:15.6, cropped
    assert pick_render_size(ti2v, wide.width, wide.height, "high") == ((1280, 704), False)
    size, exact = pick_render_size(a14b, square.width, square.height, "high")
    assert not exact and size in ((1280, 720), (720, 1280))


def test_quality_profiles_and_duration_rule():
    from mlx_video.presets import frames_for_duration, quality_profiles

    for spec in MODELS.values():
        q = quality_profiles(spec)
        assert q["high"]["steps"] == spec.steps and q["low"]["steps"] < q["medium"]["steps"] < q["high"]["steps"]
        area = lambda s: s[0] * s[1]  # noqa: E731
        assert min(map(area, q["high"]["sizes"])) >= max(map(area, q["medium"]["sizes"]))
        if spec.frame_offset == 0:  # clips of a chain whose length follows its input (S2V: the audio)
            continue
        fps, stride, longest = spec.fps, spec.frame_stride, spec.frames
        for seconds in (0.3, 1.0, 2.0, 2.5, longest / fps):
            frames = frames_for_duration(spec, seconds, fps)
            allowed = [stride * n + 1 for n in range(1, longest // stride + 1) if stride * n + 1 <= longest]
            best = min(abs(f - seconds * fps) for f in allowed)
            assert (frames - 1) % stride == 0 and abs(frames - seconds * fps) == best
        with pytest.raises(MlxVideoError, match=f"at most {longest} frames"):
            frames_for_duration(spec, longest / fps + 1, fps)
        with pytest.raises(MlxVideoError, match="--duration"):
            frames_for_duration(spec, math.nan, fps)


def test_retime_picks_the_nearest_frame_in_time():
    from mlx_video.presets import retime_indices

    for count, src, dst in ((81, 16, 24), (121, 24, 30), (129, 24, 24), (17, 30, 24)):
        idx = retime_indices(count, src, dst)
        assert len(idx) == round(count * dst / src)
        for j, i in enumerate(idx):
            times = np.abs(np.arange(count) / src - j / dst)
            assert times[i] <= times.min() + 1e-9


def test_fit_frames_crops_or_pads():
    from mlx_video.presets import fit_frames

    frames = np.full((2, 32, 64, 3), 200, np.uint8)
    frames[:, :, :16] = 0  # a dark left quarter: a centre crop to a square removes it
    cropped = fit_frames(frames, 40, 40, "crop")
    assert cropped.shape == (2, 40, 40, 3) and cropped.min() > 150
    padded = fit_frames(frames, 40, 40, "pad")
    assert padded.shape == (2, 40, 40, 3)
    assert padded[:, :8].max() == 0 and padded[:, -8:].max() == 0  # letterbox bars
    assert padded[:, 20, 30:].min() > 150


def test_user_presets_from_toml(tmp_path, monkeypatch):
    from mlx_video.presets import get_preset

    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    (tmp_path / "presets.toml").write_text('[reel]\nwidth = 720\nheight = 1280\nfps = 25\nfit = "pad"\n'
                                           'margins = { bottom = 0.3 }\n')
    reel = get_preset("reel")
    assert (reel.width, reel.height, reel.fps, reel.fit, reel.margins["bottom"], reel.margins["top"]) == \
        (720, 1280, 25.0, "pad", 0.3, 0.05)
    assert get_preset("youtube-short").fps == 30
    with pytest.raises(MlxVideoError, match="unknown preset 'nope'.*reel"):
        get_preset("nope")
    (tmp_path / "presets.toml").write_text("[bad]\nwidth = 721\nheight = 1280\nfps = 25\n")
    with pytest.raises(MlxVideoError, match="even"):
        get_preset("bad")


# ---- overlays and watermarks ----

def test_overlay_parsing():
    from mlx_video.overlay import parse_overlay

    o = parse_overlay("Watch this@0-2.5")
    assert (o.text, o.start, o.end) == ("Watch this", 0.0, 2.5)
    assert o == type(o)("Watch this", 0.0, 2.5) and parse_overlay("Watch this") == type(o)("Watch this", 0.0, math.inf)
    assert parse_overlay("Closing@-1.5") == type(o)("Closing", 0.0, 1.5)
    o = parse_overlay("Follow @mlxvid@3-")
    assert (o.text, o.start, o.end) == ("Follow @mlxvid", 3.0, math.inf)
    assert parse_overlay("me@example.com").text == "me@example.com"
    with pytest.raises(MlxVideoError, match="after the start"):
        parse_overlay("x@3-1")


def test_overlay_is_drawn_in_its_box_and_time_window():
    from mlx_video.overlay import burn, overlay_box, parse_overlay

    rng = np.random.default_rng(0)
    frames = (rng.random((6, 180, 320, 3)) * 80 + 60).astype(np.uint8)
    out = burn(frames, 2.0, [parse_overlay("Hello LinkedIn@1-2")])
    x0, y0, x1, y1 = overlay_box(320, 180, "Hello LinkedIn")
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 180
    for i in range(6):
        inside = np.abs(out[i, y0:y1, x0:x1].astype(int) - frames[i, y0:y1, x0:x1]).sum()
        outside = out[i].copy()
        outside[y0:y1, x0:x1] = frames[i, y0:y1, x0:x1]
        assert np.array_equal(outside, frames[i])  # nothing drawn outside the box
        assert (inside > 0) == (1.0 <= i / 2.0 < 2.0)  # shown at frames 2 and 3 only
    assert y0 >= round(0.05 * 180) - 2  # inside the top safe margin (outline included)


@pytest.mark.parametrize("name", ["linkedin-square", "linkedin-wide", "youtube-short"])
def test_watermark_corner_per_preset(name, tmp_path):
    from mlx_video.overlay import burn
    from mlx_video.presets import BUILTIN_PRESETS

    p = BUILTIN_PRESETS[name]
    frame = np.zeros((1, p.height, p.width, 3), np.uint8)
    logo = tmp_path / "logo.png"
    Image.new("RGB", (60, 30), (255, 255, 255)).save(logo)
    for mark in ("@mlxvid", str(logo)):
        out = burn(frame, p.fps, watermark=mark, corner=p.watermark_corner, margins=p.margins)
        ys, xs = np.nonzero(out[0].max(axis=2))
        left, top = round(p.width * p.margins["left"]), round(p.height * p.margins["top"])
        right, bottom = p.width - round(p.width * p.margins["right"]), p.height - round(p.height * p.margins["bottom"])
        assert xs.min() >= left and xs.max() < right and ys.min() >= top and ys.max() < bottom
        horizontal = xs.min() - left if p.watermark_corner.endswith("left") else right - 1 - xs.max()
        vertical = ys.min() - top if p.watermark_corner.startswith("top") else bottom - 1 - ys.max()
        slack = 0.01 * min(p.width, p.height)  # glyph side bearings
        assert horizontal <= slack and vertical <= slack, (mark, horizontal, vertical)  # against the corner
    if name == "youtube-short":
        assert p.watermark_corner.startswith("top") and p.margins["bottom"] >= 0.2  # the Shorts UI covers the bottom


# ---- previews ----

def test_latent_rgb_fit_recovers_a_linear_map():
    from mlx_video.preview import fit_latent_rgb, latent_to_rgb

    rng = np.random.default_rng(1)
    latents = rng.standard_normal((3, 4, 6, 5)).astype(np.float32)
    weights = rng.standard_normal((5, 3)).astype(np.float32) * 0.03  # no clipping at 0 or 1
    bias = np.array([0.5, 0.4, 0.6], np.float32)
    rgb = latent_to_rgb(latents, weights, bias)
    # decoded frames: every latent pixel is a 2x2 block, frames 0, 2, 4 of 5 decoded ones
    frames = np.repeat(np.repeat(np.repeat(rgb, 2, axis=0)[:5], 2, axis=1), 2, axis=2)
    w, b = fit_latent_rgb(latents, frames)
    assert np.abs(w - weights).max() < 0.005 and np.abs(b - bias).max() < 0.005  # uint8 rounding only
    pca = latent_to_rgb(latents)
    assert pca.shape == (3, 4, 6, 3) and pca.dtype == np.uint8 and pca.std() > 20


def test_published_latent_rgb_factors_by_family_and_channels():
    from types import SimpleNamespace

    from mlx_video.families.wan.latent_rgb import WAN21_BIAS, WAN21_WEIGHTS
    from mlx_video.preview import latent_to_rgb, projection_for

    def fake(family, channels):
        return SimpleNamespace(spec=SimpleNamespace(family=family), latent_channels=channels)

    for family, channels in (("wan", 16), ("wan", 48), ("hunyuan", 16)):
        weights, bias = projection_for(fake(family, channels))
        assert weights.shape == (channels, 3) and bias.shape == (3,)
    assert projection_for(fake("wan", 4)) == (None, None) and projection_for(fake("nope", 16)) == (None, None)
    # published in [-1, 1]: zero latents give the bias's colour
    weights, bias = projection_for(fake("wan", 16))
    zero = latent_to_rgb(np.zeros((1, 1, 1, 16), np.float32), weights, bias)[0, 0, 0]
    np.testing.assert_allclose(zero, np.round((np.clip(WAN21_BIAS, -1, 1) + 1) / 2 * 255), atol=1)
    assert np.allclose(weights * 2, WAN21_WEIGHTS)


def test_preview_is_written_while_denoising(a14b, tmp_path, capsys):
    root, _ = a14b
    out = tmp_path / "v.mp4"
    main(["generate", "--model", str(root / "mlx"), "--prompt", "a cat", "--size", "48x32", "--frames", "5",
          "--steps", "3", "--preview-every", "2", "--output", str(out)])
    preview = tmp_path / "v.preview.png"
    assert preview.is_file() and "approximate" in capsys.readouterr().out
    image = np.asarray(Image.open(preview))
    assert image.shape[0] == 128 and image.shape[2] == 3


# ---- CLI fixes ----

def test_default_output_named_from_prompt_and_seed_never_clobbers(a14b, tmp_path, monkeypatch):
    root, _ = a14b
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model", str(root / "mlx"), "--prompt", "A Cat, on the moon!", "--size", "48x32",
            "--frames", "5", "--steps", "1", "--seed", "3", "--quiet"]
    main(args)
    first = tmp_path / "a-cat-on-the-moon-seed3.mp4"
    assert first.is_file() and first.with_suffix(".json").is_file()
    before = first.read_bytes()
    main(args)
    assert (tmp_path / "a-cat-on-the-moon-seed3-2.mp4").is_file() and first.read_bytes() == before


def test_unwritable_output_is_refused_before_any_work(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    err = run_error(capsys, gen(root / "mlx", "--output", "/proc/nope/x.mp4"))
    assert "cannot write --output /proc/nope/x.mp4" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = run_error(capsys, gen(root / "mlx", "--save-latents", str(blocker / "x.npy")))
    assert "cannot write --save-latents" in err


def test_failed_final_write_keeps_the_latents_and_says_how_to_decode(a14b, tmp_path, capsys, monkeypatch):
    from mlx_video.io import video as video_io

    root, _ = a14b
    real = video_io.write_video

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video_io, "write_video", disk_full)
    out = tmp_path / "v.mp4"
    err = run_error(capsys, gen(root / "mlx", "--size", "48x32", "--frames", "5", "--steps", "1", "--output", str(out),
                                "--seed", "4"))
    kept = tmp_path / "v.latents.npy"
    assert "No space left" in err and f"mlxvid decode {kept} --output {out}" in err and kept.is_file()
    monkeypatch.setattr(video_io, "write_video", real)
    main(["decode", str(kept), "--output", str(out), "--quiet"])
    decoded, rate = read_video(out)
    assert decoded.shape == (5, 32, 48, 3) and rate == 16
    # the same frames as a run that writes its video directly
    main(gen(root / "mlx", "--size", "48x32", "--frames", "5", "--steps", "1", "--output", str(tmp_path / "w.mp4"),
             "--seed", "4"))
    np.testing.assert_array_equal(read_video(tmp_path / "w.mp4")[0], decoded)


@pytest.mark.parametrize("args,needle", [
    (["--seed", "-5"], "--seed must be a whole number from 0 to 18446744073709551615, got -5"),
    (["--seed", str(2**64)], "--seed must be"),
    (["--guidance", "nan"], "--guidance must be"),
    (["--guidance-2", "inf"], "--guidance-2 must be"),
    (["--shift", "nan"], "--shift must be"),
    (["--max-memory", "nan"], "--max-memory must be"),
    (["--duration", "0"], "--duration must be"),
    # longer than one clip is a chain of clips (mlx_video.chains), whose own limits are checked as early
    (["--duration", "60", "--init-latents", "x.npy"], "--init-latents is not supported with a video longer than one clip"),
    (["--duration", "2", "--frames", "9"], "--duration or --frames"),
    (["--preview-every", "0"], "--preview-every must be"),
    (["--preset", "tiktok"], "unknown preset 'tiktok'"),
    (["--watermark", "missing.png"], "no such image"),
])
def test_numbers_and_names_are_validated_with_the_option(capsys, a14b, heavy_work_forbidden, tmp_path, args, needle):
    root, _ = a14b
    err = run_error(capsys, gen(root / "mlx", "--output", str(tmp_path / "v.mp4"), *args))
    assert needle in err and "Invoked with" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_memory_figures_below_a_gib_are_in_mib():
    from mlx_video.pipelines.base import format_bytes

    assert format_bytes(300 * 2**20) == "300 MiB" and format_bytes(3 * 2**30) == "3.0 GiB"


# ---- replay ----

def test_from_sidecar_reproduces_the_latents(a14b, tmp_path):
    root, _ = a14b
    first = tmp_path / "a.npy"
    main(gen(root / "mlx", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "7", "--guidance", "3.5",
             "--shift", "7", "--negative-prompt", "blurry", "--save-latents", str(first)))
    again = tmp_path / "b.npy"
    main(["generate", "--from-sidecar", str(tmp_path / "a.json"), "--save-latents", str(again), "--quiet"])
    np.testing.assert_array_equal(np.load(first), np.load(again))
    record = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert (record["guidance"], record["shift"], record["negative_prompt"], record["seed"]) == (3.5, 7.0, "blurry", 7)
    # an option given on top overrides the record
    other = tmp_path / "c.npy"
    main(["generate", "--from-sidecar", str(tmp_path / "a.json"), "--seed", "8", "--save-latents", str(other), "-q"])
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["seed"] == 8
    assert not np.array_equal(np.load(first), np.load(other))


# ---- batch ----

def test_batch_manifest_validates_orders_resumes(a14b, ti2v, tmp_path, monkeypatch):
    from mlx_video import batch as batch_module, model_folder, run as run_module

    root, _ = a14b
    events = []
    real_weights = model_folder.ModelFolder.weights

    def weights(self, component):
        events.append(("weights", component))
        return real_weights(self, component)

    monkeypatch.setattr(model_folder.ModelFolder, "weights", weights)
    jobs = [
        {"prompt": "a cat on a roof", "model": str(root / "mlx"), "preset": "linkedin-square", "size": "48x32",
         "frames": 5, "steps": 2, "seed": 1, "overlay": ["Hook@0-0.1"], "output": "square.mp4"},
        {"prompt": "bad", "model": str(ti2v), "seed": -5, "stepz": 3},
        {"prompt": "a dog running", "model": str(ti2v), "preset": "youtube-short", "size": "64x96", "duration": 0.2,
         "steps": 2, "seed": 2, "watermark": "@me", "output": "short.mp4"},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")

    def echo(message="", err=False):
        events.append(("echo", message))

    def stop_after_first(job):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch_module.run_batch(manifest, echo=echo, after_job=stop_after_first)
    texts = [m for kind, m in events if kind == "echo"]
    first_load = next(i for i, e in enumerate(events) if e[0] == "weights")
    bad = next(i for i, e in enumerate(events) if e[0] == "echo" and "job 2 (line 2)" in e[1])
    assert bad < first_load  # the bad entry is reported before any weights are read
    report = next(m for m in texts if "job 2 (line 2)" in m)
    assert "unknown key 'stepz'" in report
    assert (tmp_path / "square.mp4").is_file() and not (tmp_path / "short.mp4").exists()
    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["done", "invalid", "pending"]

    # the re-run does the remaining job only
    ran = []
    real_execute = run_module.execute

    def counting_execute(job, *a, **k):
        ran.append(job.options["prompt"])
        return real_execute(job, *a, **k)

    monkeypatch.setattr(run_module, "execute", counting_execute)
    square_before = (tmp_path / "square.mp4").stat().st_mtime_ns
    result = batch_module.run_batch(manifest, echo=echo)
    assert ran == ["a dog running"] and [j.status for j in result] == ["skipped", "invalid", "done"]
    assert (tmp_path / "square.mp4").stat().st_mtime_ns == square_before
    assert "denoising" in result[2].timings and "total" in result[2].timings

    for name, preset, render, frames, fps in (("square", "linkedin-square", [48, 32], 5, 16),
                                               ("short", "youtube-short", [64, 96], 5, 24)):
        video, rate = read_video(tmp_path / f"{name}.mp4")
        from mlx_video.presets import BUILTIN_PRESETS

        p = BUILTIN_PRESETS[preset]
        assert video.shape[1:3] == (p.height, p.width) and rate == p.fps
        assert video.shape[0] == round(frames * p.fps / fps)
        record = json.loads((tmp_path / f"{name}.json").read_text())["settings"]
        assert record["render_size"] == render and record["delivery_size"] == [p.width, p.height]
        assert record["delivery"]["fps"] == p.fps and record["fps"] == fps

    # the CLI reports the bad entry and fails; everything else is already done
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(manifest)])
    assert exc.value.code == 1


def test_batch_orders_by_model_and_isolates_failures(a14b, ti2v, tmp_path, monkeypatch):
    """A JSON-list manifest: lines are reported per entry; jobs run grouped by model, each model's pipeline is set
    up once, and a job that fails at run time does not stop the next."""
    from mlx_video import batch as batch_module, run as run_module
    from mlx_video.pipelines.base import Pipeline

    root, _ = a14b
    a, t = str(root / "mlx"), str(ti2v)
    common = {"size": "48x32", "frames": 5, "steps": 1}
    manifest = tmp_path / "list.json"
    manifest.write_text("[\n" + ",\n".join([
        json.dumps({"prompt": "one", "model": a, **common, "output": "1.mp4"}),
        json.dumps({"prompt": "two", "model": t, **common, "size": "64x32", "output": "2.mp4"}),
        '{"prompt": "three",\n "model": "%s", "size": "48x32", "frames": 5, "steps": 1, "output": "3.mp4"}' % a,
        json.dumps({"prompt": "four", "model": t, **common, "size": "64x32", "frames": 6, "output": "4.mp4"}),
        json.dumps({"prompt": "five", "model": t, **common, "size": "64x32", "output": "3.mp4"}),
    ]) + "\n]\n")
    made, ran = [], []
    real = Pipeline.from_pretrained.__func__

    def counting(cls, model):
        made.append(model)
        return real(cls, model)

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(counting))

    def fake_execute(job, echo=None, hooks=()):
        ran.append(job.options["prompt"])
        if job.options["prompt"] == "one":
            raise RuntimeError("out of memory")
        return {"timings": {"denoising": 0.5}}

    monkeypatch.setattr(run_module, "execute", fake_execute)
    messages = []
    jobs = batch_module.run_batch(manifest, echo=lambda m="", err=False: messages.append(m))
    assert ran == ["one", "three", "two"] and sorted(made) == sorted([a, t])
    assert [(j.line, j.status) for j in jobs] == [(2, "failed"), (3, "done"), (4, "done"), (6, "invalid"), (7, "invalid")]
    assert "4n+1" in jobs[3].error and "out of memory" in jobs[0].error and "as job 3 does" in jobs[4].error
    summary = json.loads((tmp_path / "list.summary.json").read_text())
    assert summary["counts"] == {"failed": 1, "done": 2, "invalid": 2}
    assert any("job 4 (line 6)" in m for m in messages)


def test_models_lists_profiles_conversion_and_memory(a14b, tmp_path, monkeypatch, capsys):
    root, _ = a14b
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "wan2.2-t2v-a14b").symlink_to(root / "mlx")
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    main(["models"])
    out = capsys.readouterr().out
    block = out.split("wan2.2-i2v-a14b")[0]
    assert "quality: high 1280x720/720x1280, 40 steps; medium 832x480/480x832, 24 steps" in block
    assert f"converted here: {tmp_path / 'models' / 'wan2.2-t2v-a14b'}" in block and "float32" in block
    assert "default run: estimated peak" in block and "not converted here (mlxvid download wan2.2-ti2v-5b)" in out
    main(["models", "--json"])
    listing = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    here = listing["wan2.2-t2v-a14b"]["converted"]
    assert here["dtype"] == "float32" and here["bytes"] > 0 and here["quantization"] is None
    assert listing["hunyuanvideo-t2v"]["quality"]["medium"]["sizes"][0] == [960, 544]
    assert all(m["estimated_peak_bytes"] > 2**30 for m in listing.values())
