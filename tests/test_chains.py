"""Longer videos (mlx_video.chains): the segment plan, prompts and seeds per segment, a 30-second chain through
`mlxvid generate` read back with PyAV, and proof that a later segment is conditioned on the one before."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from mlx_video.cli import main
from mlx_video.errors import MlxVideoError
from mlx_video.chains import (
    LAST_FRAME, LATENT_OVERLAP, OVERLAP_LATENT_FRAMES, assign_prompts, crossfade, overlap_frames, plan_segments,
)
from support.arrays import rel_err

PROMPT = "a cat walks on the grass"


# ---- the plan (pure) ----

@pytest.mark.parametrize("method", [LATENT_OVERLAP, LAST_FRAME])
@pytest.mark.parametrize("stride", [4, 6])
@pytest.mark.parametrize("total,clip", [(60, 17), (61, 25), (300, 81), (163, 163), (7, 13), (1000, 37)])
def test_plan_covers_every_frame_once(method, stride, total, clip):
    clip = stride * ((clip - 1) // stride) + 1
    repeat = overlap_frames(method, stride)
    middle = total > clip + (clip - repeat)  # a segment between the first and the last
    if clip - repeat < stride or (middle and method == LATENT_OVERLAP and clip - repeat < repeat):
        with pytest.raises(MlxVideoError, match="--segment-frames must be at least"):
            plan_segments(total, clip, stride, method)
        return
    segs = plan_segments(total, clip, stride, method)
    assert segs[0].start == 0 and segs[-1].end == total
    repeat = overlap_frames(method, stride)
    for prev, seg in zip(segs, segs[1:]):
        assert seg.boundary == prev.end  # new frames follow on without a gap
        assert prev.end - prev.boundary >= seg.overlap  # the cross-faded frames are the previous segment's own
        assert seg.overlap == (repeat if method == LATENT_OVERLAP else 0) and seg.start == seg.boundary - seg.overlap
        assert seg.conditioning == method
    for seg in segs:
        assert seg.rendered <= clip and (seg.rendered - 1) % stride == 0
        shared = 0 if seg.index == 0 else repeat
        assert seg.end - seg.boundary <= seg.rendered - shared  # enough rendered frames
        assert seg.rendered - shared - (seg.end - seg.boundary) < stride  # and not a stride's worth wasted
    if total > clip:
        assert len(segs) > 1 and all(s.rendered == clip for s in segs[:-1])


def test_prompts_and_seeds_per_segment():
    segs = plan_segments(60, 17, 4, LATENT_OVERLAP)  # new frames start at 0, 17, 29, 41, 53
    assign_prompts(segs, "p0", ["p1", "p2"], 7, fps=2)
    assert [s.prompt for s in segs] == ["p0", "p1", "p2", "p2", "p2"]
    assert [s.seed for s in segs] == [7, 8, 9, 10, 11]
    assign_prompts(segs, "p0", ["late@20.5", {"at": 0, "prompt": "first", "seed": 99}, "mid@8.5"], 0, fps=2)
    # boundaries at 0, 8.5, 14.5, 20.5, 26.5 s
    assert [s.prompt for s in segs] == ["first", "mid", "mid", "late", "late"]
    assert [s.seed for s in segs] == [99, 1, 2, 3, 4]
    with pytest.raises(MlxVideoError, match="5 --segment-prompt values but 4 segments after the first"):
        assign_prompts(segs, "p0", ["a", "b", "c", "d", "e"], 0, fps=2)
    with pytest.raises(MlxVideoError, match="all timed"):
        assign_prompts(segs, "p0", ["a@1", "b"], 0, fps=2)
    with pytest.raises(MlxVideoError, match="past the end"):
        assign_prompts(segs, "p0", ["a@30"], 0, fps=2)


def test_crossfade_is_linear_and_ends_near_each_side():
    a = np.zeros((5, 2, 2, 3), np.uint8)
    b = np.full((5, 2, 2, 3), 240, np.uint8)
    mixed = crossfade(a, b)
    assert mixed[:, 0, 0, 0].tolist() == [40, 80, 120, 160, 200]


# ---- through the command line ----

def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.average_rate, float(stream.duration * stream.time_base)


def test_thirty_seconds_as_a_chain_of_segments(a14b, tmp_path):
    root, _ = a14b
    out = tmp_path / "long.mp4"
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "1",
          "--duration", "30", "--segment-frames", "17", "--steps", "2", "--seed", "5",
          "--segment-prompt", "a dog runs on the beach@20", "--output", str(out), "--quiet"])
    frames, rate, duration = read_video(out)
    assert frames.shape == (30, 32, 48, 3) and rate == 1 and abs(duration - 30.0) < 1e-6
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert record["frames"] == 30 and record["output_frames"] == 30 and record["output_fps"] == 1
    ext = record["extension"]
    assert ext["method"] == LATENT_OVERLAP and ext["overlap_latent_frames"] == OVERLAP_LATENT_FRAMES
    assert ext["overlap_frames"] == 5 and ext["segments"] == 3 and ext["segment_frames"] == 17
    segs = record["segments"]
    assert [s["frames"] for s in segs] == [[0, 17], [12, 29], [24, 30]]
    assert [s["rendered_frames"] for s in segs] == [17, 17, 9]  # the last renders the fewest that reach 30
    assert [s["seed"] for s in segs] == [5, 6, 7]
    assert [s["prompt"] for s in segs] == [PROMPT] * 2 + ["a dog runs on the beach"]  # its new frames start at 29 s
    assert [s["conditioning"] for s in segs] == ["none"] + [LATENT_OVERLAP] * 2
    assert all(s["timings"]["denoising"] > 0 for s in segs)


@pytest.mark.parametrize("size,render_fps,fps,fit", [((40, 24), 16, 30, "crop"), ((24, 40), 30, 16, "pad"),
                                                     ((48, 32), 8, 8, "crop")])
def test_delivery_frame_by_frame_equals_the_whole_video(size, render_fps, fps, fit):
    """A chain delivers its frames one at a time (run.DeliveryStream): the same frames as `Delivery.apply` on the
    whole video (scaling, the nearest-frame rate change over the whole length, overlays by delivered time)."""
    from mlx_video.overlay import parse_overlay
    from mlx_video.run import Delivery, DeliveryStream

    video = np.random.default_rng(0).integers(0, 256, (23, 32, 48, 3), dtype=np.uint8)
    overlays = [parse_overlay("Hook@0-0.5"), parse_overlay("second line@0.3-"), parse_overlay("end@1.2-")]
    delivery = Delivery(*size, fps, "test", fit, None, overlays, "(c) me", "top-left")
    whole = delivery.apply(video, render_fps)
    stream = DeliveryStream(delivery, len(video), render_fps)
    streamed = [out for frame in video for out in stream.push(frame)]
    assert len(streamed) == len(whole) == round(23 * fps / render_fps)
    np.testing.assert_array_equal(np.stack(streamed), whole)
    plain = Delivery(*size, fps, "test", fit).apply(video, render_fps)
    assert not np.array_equal(whole, plain)  # the overlays and the watermark were drawn


def test_chain_with_a_preset_overlay_and_watermark(a14b, tmp_path, monkeypatch):
    """A chain delivered to a preset: the mp4 has the preset's size, rate and the chain's duration; with overlays
    and a watermark into PNG frames, the chain's frames are its undelivered frames delivered."""
    from mlx_video.overlay import parse_overlay
    from mlx_video.run import Delivery

    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    (tmp_path / "presets.toml").write_text('[tiny-reel]\nwidth = 40\nheight = 64\nfps = 12\nfit = "pad"\n')
    root, _ = a14b
    base = ["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "4",
            "--duration", "5", "--segment-frames", "13", "--steps", "1", "--seed", "3", "--quiet"]
    out = tmp_path / "reel.mp4"
    main(base + ["--preset", "tiny-reel", "--output", str(out)])
    frames, rate, duration = read_video(out)
    assert frames.shape == (60, 64, 40, 3) and rate == 12 and abs(duration - 5.0) < 1e-6
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert record["output_frames"] == 60 and record["output_fps"] == 12 and record["frames"] == 20
    assert record["delivery"]["preset"] == "tiny-reel" and record["extension"]["segments"] == 2

    raw, delivered = tmp_path / "raw", tmp_path / "delivered"
    main(base + ["--output", str(raw)])
    main(base + ["--overlay", "Hook@0-2", "--overlay", "Part two@3-", "--watermark", "@me", "--output",
                 str(delivered)])
    def read_pngs(folder):
        from PIL import Image

        return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))])

    raw_frames, got = read_pngs(raw), read_pngs(delivered)
    assert raw_frames.shape == (20, 32, 48, 3)
    want = Delivery(48, 32, 4, None, "crop", None, [parse_overlay("Hook@0-2"), parse_overlay("Part two@3-")],
                    "@me").apply(raw_frames, 4)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, raw_frames)


def test_an_interrupted_chain_resumes_where_it_stopped(a14b, tmp_path, monkeypatch, capsys):
    """Ctrl-C during segment 3 of 4 keeps segments 1-2 beside the output; the same command then makes only
    segments 3-4, and writes the frames of an uninterrupted run. A changed command starts over."""
    from PIL import Image

    from mlx_video.families.wan.pipeline import WanPipeline

    root, _ = a14b
    calls = []
    generate = WanPipeline.generate

    def counted(self, *a, **k):
        calls.append(k.get("init_latents") is not None)
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt
        return generate(self, *a, **k)

    monkeypatch.setattr(WanPipeline, "generate", counted)
    base = ["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "4",
            "--frames", "30", "--segment-frames", "13", "--steps", "1", "--seed", "2", "--quiet"]

    def pngs(folder):
        return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))])

    stop_at = None
    main(base + ["--output", str(tmp_path / "whole")])
    assert len(calls) == 4
    out, kept = tmp_path / "resumed", tmp_path / ".resumed.segments"
    calls.clear()
    stop_at = 3
    with pytest.raises(SystemExit) as exc:
        main(base + ["--output", str(out)])
    assert exc.value.code == 130 and not out.exists()
    assert "2 of 4 segments are kept in" in capsys.readouterr().err
    assert sorted(p.name for p in kept.iterdir()) == ["chain.json", "segment-000.npz", "segment-001.npz"]
    calls.clear()
    stop_at = None
    main(base + ["--output", str(out)])
    assert len(calls) == 2  # segments 3 and 4 only
    np.testing.assert_array_equal(pngs(out), pngs(tmp_path / "whole"))
    assert not kept.exists()
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert all(s["timings"]["denoising"] > 0 for s in record["segments"])

    # kept segments of another command (another seed) are not used
    calls.clear()
    stop_at = 2
    with pytest.raises(SystemExit):
        main(base + ["--output", str(tmp_path / "other")])
    calls.clear()
    stop_at = None
    main(base[:-3] + ["--seed", "9", "--quiet", "--output", str(tmp_path / "other")])
    assert len(calls) == 4 and not (tmp_path / ".other.segments").exists()


def test_a_chain_previews_each_segment_without_changing_it(a14b, tmp_path, capsys):
    from PIL import Image

    root, _ = a14b
    base = ["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "4",
            "--frames", "20", "--segment-frames", "13", "--steps", "2", "--seed", "4"]
    main(base + ["--quiet", "--output", str(tmp_path / "plain")])
    capsys.readouterr()
    main(base + ["--preview-every", "1", "--output", str(tmp_path / "watched")])
    said = capsys.readouterr().out
    assert said.count("preview: ") == 1 and "segment 2/2" in said  # said once, for the whole chain
    preview = np.asarray(Image.open(tmp_path / "watched.preview.png"))
    assert preview.ndim == 3 and preview.shape[2] == 3 and preview.std() > 0

    def pngs(folder):
        return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))])

    np.testing.assert_array_equal(pngs(tmp_path / "watched"), pngs(tmp_path / "plain"))


def test_chain_options_are_checked_before_any_work(a14b, tmp_path, capsys, monkeypatch):
    from mlx_video import model_folder

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(model_folder.ModelFolder, "weights", boom)
    root, _ = a14b
    base = ["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--fps", "2", "--quiet"]
    cases = [
        (["--duration", "30", "--segment-frames", "17", "--save-latents", str(tmp_path / "x.npy")], "--save-latents"),
        (["--duration", "30", "--segment-frames", "18"], "--segment-frames must be of the form 4n+1"),
        (["--duration", "30", "--segment-frames", "5"], "--segment-frames must be at least 9"),
        # 4 new frames could not hold the next segment's 5 cross-faded ones
        (["--duration", "30", "--segment-frames", "9"], "leaves 4 new frames after the 5 it shares"),
        (["--duration", "4", "--segment-frames", "13", "--segment-prompt", "a", "--segment-prompt", "b"],
         "2 --segment-prompt values but 0 segments after the first"),
        (["--segment-prompt", "a"], "give its length with --duration or --frames"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit):
            main(base + extra + ["--output", str(tmp_path / "o.mp4")])
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


# ---- conditioning ----

def test_latent_overlap_conditions_the_next_segment(a14b, tmp_path):
    from mlx_video.chains import segment_runs
    from mlx_video.pipelines.base import GenerationSettings
    from mlx_video.run import prepare

    root, _ = a14b
    job = prepare({"model": str(root / "mlx"), "prompt": PROMPT, "size": "48x32", "fps": 4, "frames": 29,
                   "segment_frames": 17, "steps": 3, "seed": 11, "output": str(tmp_path / "c.mp4"), "quiet": True})
    assert [s.conditioning for s in job.segments] == ["none", LATENT_OVERLAP]
    (s0, r0, f0), (s1, r1, f1) = list(segment_runs(job))
    k = OVERLAP_LATENT_FRAMES
    # the free run of segment 1: same prompt, seed, frames, settings, no hold
    pipe = job.base.pipe
    s = pipe.resolve(GenerationSettings.from_dict({**job.base.settings.to_dict(), "seed": s1.seed,
                                                   "frames": s1.rendered}))
    free = pipe.generate(s).latents
    # the held latent frames end exactly on the previous segment's last ones; the free run's do not
    np.testing.assert_allclose(r1.latents[:, :, :k], r0.latents[:, :, -k:], rtol=0, atol=1e-5)
    assert rel_err(free[:, :, :k], r0.latents[:, :, -k:]) > 0.1
    # the frames after the held ones are changed by them through attention (about 1% on this tiny random model;
    # without the hold they would equal the free run's exactly)
    assert rel_err(r1.latents[:, :, k:], free[:, :, k:]) > 1e-3
    # Decoded frames are not compared: this tiny random VAE's output depends on its causal context as much as on
    # the latents (the same two latent frames decoded alone and at the end of segment 0 differ by ~32 levels, as
    # much as neighbouring frames), which is what the cross-fade of the overlap is for.
    assert f1.shape[0] == s1.rendered and f0.shape[0] == s0.rendered


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from support.wan import build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("ti2v_extend")
    build_tiny_wan_pipeline(root / "diffusers", two_experts=False, shift=5.0, wan22_vae=True)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root / "mlx"


def test_last_frame_conditions_the_next_segment_on_an_image_model(ti2v, tmp_path):
    import mlx.core as mx

    from mlx_video.chains import segment_runs
    from mlx_video.pipelines.base import GenerationSettings
    from mlx_video.run import prepare

    job = prepare({"model": str(ti2v), "prompt": PROMPT, "size": "64x32", "fps": 3, "frames": 17,
                   "segment_frames": 9, "steps": 2, "seed": 3, "output": str(tmp_path / "i"), "quiet": True})
    assert [s.conditioning for s in job.segments] == ["none", LAST_FRAME]
    runs = []
    for seg, result, frames in segment_runs(job):
        runs.append((seg, result.latents, frames))
    pipe = job.base.pipe
    (_, _, f0), (s1, l1, _) = runs
    s = pipe.resolve(GenerationSettings.from_dict({**job.base.settings.to_dict(), "seed": s1.seed,
                                                   "frames": s1.rendered}))
    # TI2V-5B takes the image as its first latent frame: segment 1's is the encoding of segment 0's last frame
    image = pipe.encode_image(f0[-1].astype(np.float32) / 127.5 - 1.0, s)
    expected = np.array(image.transpose(0, 4, 1, 2, 3).astype(mx.float32))[:, :, 0]
    np.testing.assert_allclose(l1[:, :, 0], expected, rtol=0, atol=1e-5)
    free = pipe.generate(s).latents
    assert rel_err(free[:, :, 0], expected) > 0.1
    # and through the command line: frame count, the repeated first frames dropped, the sidecar's method
    out = tmp_path / "ti2v.mp4"
    main(["generate", "--model", str(ti2v), "--prompt", PROMPT, "--size", "64x32", "--fps", "3", "--frames", "20",
          "--segment-frames", "9", "--steps", "1", "--output", str(out), "--quiet"])
    frames, rate, _ = read_video(out)
    assert frames.shape[0] == 20 and rate == 3
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert record["extension"]["method"] == LAST_FRAME and record["extension"]["overlap_frames"] == 0
    assert [s["frames"] for s in record["segments"]] == [[0, 9], [9, 17], [17, 20]]


def test_latent_overlap_on_mochi(tmp_path_factory, tmp_path, monkeypatch):
    """The same chain on another family (Mochi: stride 6, 12 latent channels, Euler, its own timestep
    convention): the held latent frames end on the previous segment's, and 7 frames are cross-faded."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from support.mochi import build_tiny_mochi_pipeline

    from mlx_video import chains
    from mlx_video.run import execute, prepare

    root = tmp_path_factory.mktemp("mochi_extend")
    build_tiny_mochi_pipeline(root / "diffusers")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    options = {"model": str(root / "mlx"), "prompt": PROMPT, "size": "48x32", "fps": 6, "frames": 19,
               "segment_frames": 13, "steps": 1, "seed": 1, "output": str(tmp_path / "m.mp4"), "quiet": True}
    job = prepare(options)
    assert [(s.rendered, s.start, s.end, s.overlap) for s in job.segments] == [(13, 0, 13, 0), (13, 6, 19, 7)]
    runs, segment_runs = [], chains.segment_runs

    def recorded(*args, **kwargs):  # the segments the command makes, as they are made (one chain run, not two)
        for run in segment_runs(*args, **kwargs):
            runs.append(run)
            yield run

    monkeypatch.setattr(chains, "segment_runs", recorded)
    execute(job, echo=lambda *a, **kw: None)
    (_, r0, _), (_, r1, _) = runs
    k = OVERLAP_LATENT_FRAMES
    np.testing.assert_allclose(r1.latents[:, :, :k], r0.latents[:, :, -k:], rtol=0, atol=1e-5)
    frames, rate, _ = read_video(tmp_path / "m.mp4")
    assert frames.shape[0] == 19 and rate == 6
