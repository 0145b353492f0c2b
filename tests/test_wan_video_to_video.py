"""Video-to-video (--video, --strength) against diffusers' WanVideoToVideoPipeline at tiny random configs: an
A14B-style pair of experts (4 heads of width 8) and a TI2V-5B-style model (2 heads of width 20), strengths 0.5
and 0.8, --init-latents being the noise before it is mixed with the encoded video; and the refusals.

The reference, as diffusers 0.42.1 leaves it open (read from its sources):
- `WanVideoToVideoPipeline` holds one transformer and no boundary; on A14B ours switches experts per step as
  `WanPipeline` does (t >= boundary_ratio x 1000: the high-noise expert), so the reference here is that
  pipeline with a module making the same switch, one guidance scale for both experts;
- it sizes the latents with 2^len(temperal_downsample) = 8, where the Wan 2.2 VAE compresses 16x: the
  reference for TI2V-5B is given the VAE's real factor, as ours uses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.run import prepare  # noqa: E402
from support.wan import build_tiny_wan_pipeline, decode_like_diffusers, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a watercolour city street at dusk"
NEGATIVE = "blurry"


def write_clip(folder, count, width, height, seed):
    """A PNG folder of `count` smooth frames drifting sideways; returns them as PIL images."""
    folder.mkdir()
    base = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4 + count, 3), dtype=np.uint8)
    wide = np.asarray(PIL.fromarray(base).resize((width + 4 * count, height), PIL.BILINEAR))
    for i in range(count):
        PIL.fromarray(np.ascontiguousarray(wide[:, 4 * i:4 * i + width])).save(folder / f"frame_{i:05d}.png")
    return [PIL.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


class ExpertSwitch(torch.nn.Module):
    """WanPipeline's per-step expert choice, for a pipeline that calls one transformer."""

    def __init__(self, high, low, boundary_t):
        super().__init__()
        self.high, self.low, self.boundary_t = high, low, boundary_t

    @property
    def dtype(self):
        return self.high.dtype

    @property
    def device(self):
        return self.high.device

    @property
    def config(self):
        return self.high.config

    def forward(self, hidden_states, timestep, **kwargs):
        model = self.high if float(timestep[0]) >= self.boundary_t else self.low
        return model(hidden_states=hidden_states, timestep=timestep, **kwargs)


def reference_pipeline(pipe):
    from diffusers import WanVideoToVideoPipeline
    from diffusers.video_processor import VideoProcessor

    transformer = pipe.transformer
    if pipe.transformer_2 is not None:
        transformer = ExpertSwitch(pipe.transformer, pipe.transformer_2, pipe.config.boundary_ratio * 1000)
    ref = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=transformer,
                                  vae=pipe.vae, scheduler=pipe.scheduler)
    factor = getattr(pipe.vae.config, "scale_factor_spatial", None) or ref.vae_scale_factor_spatial
    ref.vae_scale_factor_spatial = factor  # the VAE's real stride (16 for the Wan 2.2 VAE)
    ref.video_processor = VideoProcessor(vae_scale_factor=factor)
    use_official_sigmas(ref)
    return ref


def run_both(monkeypatch, tmp_path, root, ref, clip, noise, width, height, frames, strength, guidance, extra=()):
    import diffusers.pipelines.wan.pipeline_wan_video2video as v2v

    monkeypatch.setattr(v2v, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    with torch.no_grad():
        expected = ref(video=clip[:frames], prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                       num_inference_steps=5, guidance_scale=guidance, strength=strength, output_type="latent",
                       max_sequence_length=512).frames.numpy()
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / f"out-{strength}.npy"
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--video", str(root / "clip"), "--strength", str(strength), "--size", f"{width}x{height}", "--steps", "5",
          "--guidance", str(guidance), "--init-latents", str(tmp_path / "noise.npy"), "--save-latents", str(out),
          "--quiet", *extra])
    record = json.loads(out.with_suffix(".json").read_text())["settings"]
    return np.load(out), expected, record


def frames_error(ref, expected_latents, frames_folder) -> float:
    """Mean absolute difference, in 8-bit levels, of our written frames from the reference's decoding."""
    expected = np.round(decode_like_diffusers(ref, torch.from_numpy(expected_latents)) * 255)
    ours = np.stack([np.asarray(PIL.open(p)) for p in sorted(frames_folder.glob("*.png"))])
    assert ours.shape == expected.shape
    assert expected.std() > 10 and len(np.unique(expected)) > 100  # a real picture, not a saturated one
    return float(np.abs(ours.astype(np.float64) - expected).mean())


@pytest.fixture(scope="module")
def a14b_v2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2v-a14b")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=True, shift=12.0, heads=4, head_dim=8)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    clip = write_clip(root / "clip", 11, 64, 48, 5)  # 11 frames: the run takes 9, the model's 4n+1 form
    return root, reference_pipeline(pipe), clip


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_a14b_video_to_video_matches_diffusers(a14b_v2v, monkeypatch, tmp_path, strength):
    root, ref, clip = a14b_v2v
    noise = np.random.default_rng(11).standard_normal((1, 4, 3, 6, 8)).astype(np.float32)
    frames = tmp_path / "frames"
    ours, expected, record = run_both(monkeypatch, tmp_path, root, ref, clip, noise, 64, 48, 9, strength, 3.0,
                                      ("--guidance-2", "3", "--output", str(frames)))
    err, pixel_err = rel_err(ours, expected), frames_error(ref, expected, frames)
    print(f"video-to-video, A14B-style, strength {strength}: relative error {err:.2e}, experts {record['experts']}, "
          f"frames mean abs {pixel_err:.3f}/255")
    assert err < 1e-3 and pixel_err < 1.0
    assert record["frames"] == 9 and record["strength"] == strength
    assert len(record["experts"]) == int(5 * strength)
    assert set(record["experts"]) == {"transformer", "transformer_2"}  # the boundary (t 875) falls inside the run
    assert record["input_files"]["video"]["name"] == "clip" and len(record["input_files"]["video"]["sha256"]) == 64
    assert record["options"]["video"].endswith("clip")
    if strength == 0.5:  # --from-sidecar repeats the run: the same video, strength and noise
        out = tmp_path / f"out-{strength}.npy"
        main(["generate", "--from-sidecar", str(out.with_suffix(".json")), "--save-latents",
              str(tmp_path / "replay.npy"), "--quiet"])
        np.testing.assert_array_equal(np.load(tmp_path / "replay.npy"), ours)


@pytest.fixture(scope="module")
def ti2v_v2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2v-ti2v")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=False, shift=5.0, wan22_vae=True, heads=2,
                                   head_dim=20)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    clip = write_clip(root / "clip", 5, 96, 64, 6)
    return root, reference_pipeline(pipe), clip


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_ti2v_video_to_video_matches_diffusers(ti2v_v2v, monkeypatch, tmp_path, strength):
    root, ref, clip = ti2v_v2v
    noise = np.random.default_rng(12).standard_normal((1, 6, 2, 4, 6)).astype(np.float32)
    frames = tmp_path / "frames"
    ours, expected, record = run_both(monkeypatch, tmp_path, root, ref, clip, noise, 96, 64, 5, strength, 4.0,
                                      ("--output", str(frames)))
    err, pixel_err = rel_err(ours, expected), frames_error(ref, expected, frames)
    print(f"video-to-video, TI2V-5B-style, strength {strength}: relative error {err:.2e}, "
          f"frames mean abs {pixel_err:.3f}/255")
    assert err < 1e-3 and pixel_err < 1.0
    assert record["frames"] == 5 and len(record["experts"]) == int(5 * strength)


def refusal(model, tmp_path, **options) -> str:
    base = {"model": str(model), "prompt": PROMPT, "save_latents": str(tmp_path / "x.npy")}
    with pytest.raises(MlxVideoError) as info:
        prepare({**base, **options}, check_memory=False)
    return str(info.value)


def test_video_to_video_refusals(a14b_v2v, tmp_path):
    from mlx_video.io.video import write_video

    root, _, _ = a14b_v2v
    model, clip = root / "mlx", str(root / "clip")
    assert "--strength must be positive, got 0" in refusal(model, tmp_path, video=clip, strength=0)
    assert "--strength must be at most 1" in refusal(model, tmp_path, video=clip, strength="1.5")
    assert "give the --video too" in refusal(model, tmp_path, strength=0.5, size="64x48", frames=9)
    assert "keeps no step" in refusal(model, tmp_path, video=clip, strength=0.1, steps=5, size="64x48")
    assert "has 11 frames; --frames 13 needs at least 13" in refusal(model, tmp_path, video=clip, frames=13)
    assert "no such file or folder" in refusal(model, tmp_path, video=str(tmp_path / "missing.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert "bad.mp4" in refusal(model, tmp_path, video=str(tmp_path / "bad.mp4"))
    assert "does not run with --video" in refusal(model, tmp_path, video=clip, cache="easycache", size="64x48")
    image = tmp_path / "image.png"
    PIL.new("RGB", (64, 48)).save(image)
    assert "not both" in refusal(model, tmp_path, video=clip, image=str(image), size="64x48")
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    manifest = json.loads((model / "mlxvid.json").read_text())
    (i2v / "mlxvid.json").write_text(json.dumps({**manifest, "model": "wan2.2-i2v-a14b", "task": "i2v"}))
    for entry in model.iterdir():
        if entry.name != "mlxvid.json":
            (i2v / entry.name).symlink_to(entry)
    message = refusal(i2v, tmp_path, video=clip, image=str(image))
    assert "--video: for video-to-video and VACE models (wan2.2-t2v-a14b, wan2.2-ti2v-5b, wan2.1-vace-1.3b" in message
    # an mp4 of 12 frames: the run takes the 9 of the model's form, resized (a 80x60 clip to 64x48)
    write_video(np.random.default_rng(0).integers(0, 256, (12, 60, 80, 3), dtype=np.uint8), tmp_path / "in.mp4",
                fps=16)
    job = prepare({"model": str(model), "prompt": PROMPT, "video": str(tmp_path / "in.mp4"), "size": "64x48",
                   "save_latents": str(tmp_path / "x.npy")}, check_memory=False)
    assert job.settings.frames == 9 and job.settings.strength == 0.8
    assert job.inputs["video"].shape == (9, 48, 64, 3)


def test_server_takes_the_video_and_the_last_image_as_uploads(tmp_path):
    """The server's request bodies get both options as uploads (never as paths)."""
    from mlx_video.server.bodies import Upload, check_upload, from_fields

    (tmp_path / "in.mp4").write_bytes(b"")
    (tmp_path / "last.png").write_bytes(b"")
    options = from_fields({"prompt": PROMPT, "strength": "0.6"},
                          [Upload("video", "clip.mp4", tmp_path / "in.mp4"),
                           Upload("last_image", "end.png", tmp_path / "last.png")], "wan2.2-t2v-a14b")
    assert options["video"] == tmp_path / "in.mp4" and options["last_image"] == tmp_path / "last.png"
    assert options["strength"] == 0.6
    assert check_upload("video", "clip.MOV") == ".mov"
    with pytest.raises(MlxVideoError, match="takes an uploaded file"):
        from_fields({"prompt": PROMPT, "video": "/etc/passwd"}, [], "wan2.2-t2v-a14b")
    with pytest.raises(MlxVideoError, match="not one of"):
        check_upload("video", "clip.png")
