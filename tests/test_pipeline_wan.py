"""End to end: a tiny random diffusers WanPipeline, converted with `mlxvid convert`, run with `mlxvid generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from support.wan import build_tiny_wan_pipeline, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset"
NEGATIVE = "static, blurry"


# (guidance 1, guidance_2 > 1) is left out on purpose: diffusers then skips guidance for both experts, while the
# official code (and mlxvid) still guides the low-noise expert.
@pytest.mark.parametrize("steps,guidance,guidance_2", [(6, 4.0, 3.0), (3, 2.5, 1.0), (3, 1.0, 1.0)])
def test_a14b_latents_match_diffusers(a14b, steps, guidance, guidance_2):
    root, pipe = a14b
    width, height, frames = 48, 32, 9  # latent 3 x 4 x 6
    init = np.random.default_rng(steps).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(root / "init.npy", init)

    use_official_sigmas(pipe)
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
            latents=torch.from_numpy(init), output_type="latent", max_sequence_length=512,
        ).frames.numpy()

    out = root / f"out_{steps}.npy"
    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--size", f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", str(guidance),
        "--guidance-2", str(guidance_2), "--shift", "12", "--init-latents", str(root / "init.npy"),
        "--save-latents", str(out), "--quiet", "--overwrite",
    ])
    ours = np.load(out)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"A14B-style end to end, {steps} steps: relative error {err:.2e}")
    assert err < 1e-3
    # the run actually moved away from the start, and both experts ran
    assert rel_err(init, ref) > 0.05
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["steps"] == steps
    assert set(sidecar["settings"]["experts"]) == {"transformer", "transformer_2"}


def _reference_frames(pipe, init, steps, guidance, guidance_2, width, height, frames, shift):
    use_official_sigmas(pipe)
    kwargs = dict(guidance_scale_2=guidance_2) if guidance_2 is not None else {}
    with torch.no_grad():
        out = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(init), output_type="np",
            max_sequence_length=512, **kwargs,
        ).frames
    return np.asarray(out[0], dtype=np.float32)  # (F, H, W, 3) in [0, 1]


def _read_png_frames(folder):
    from PIL import Image

    files = sorted(folder.glob("frame_*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0


def test_a14b_decoded_frames_match_diffusers(a14b):
    root, pipe = a14b
    width, height, frames, steps = 48, 32, 9, 4
    init = np.random.default_rng(11).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(root / "init_video.npy", init)
    ref = _reference_frames(pipe, init, steps, 4.0, 3.0, width, height, frames, 12.0)
    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--size", f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", "4",
        "--guidance-2", "3", "--shift", "12", "--init-latents", str(root / "init_video.npy"),
        "--output", str(root / "frames"), "--quiet", "--overwrite",
    ])
    ours = _read_png_frames(root / "frames")
    assert ours.shape == ref.shape == (frames, height, width, 3)
    mad = float(np.abs(ours - ref).mean())
    print(f"A14B-style decoded frames: mean |difference| {mad * 255:.3f}/255")
    assert mad < 1 / 255
    assert ref.std() > 0.02  # not a flat image
    sidecar = json.loads((root / "frames.json").read_text())
    assert sidecar["settings"]["vae_peak_memory_bytes"] > 0

    # the same run written as H.264: right frame count and fps, close to the lossless frames
    import av

    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--size", f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", "4",
        "--guidance-2", "3", "--shift", "12", "--init-latents", str(root / "init_video.npy"),
        "--output", str(root / "video.mp4"), "--fps", "16", "--quiet", "--overwrite",
    ])
    with av.open(str(root / "video.mp4")) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 16
    assert len(decoded) == frames


def test_ti2v_5b_style_latents_and_frames_match_diffusers(tmp_path):
    pipe = build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=False, shift=5.0, wan22_vae=True)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    manifest = json.loads((tmp_path / "mlx" / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-ti2v-5b" and manifest["vae_stride"] == [4, 16, 16]

    width, height, frames, steps = 96, 64, 5, 4  # latent 2 x 4 x 6
    init = np.random.default_rng(5).standard_normal((1, 6, 2, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    use_official_sigmas(pipe)
    with torch.no_grad():
        ref_latents = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=5.0, latents=torch.from_numpy(init), output_type="latent",
            max_sequence_length=512,
        ).frames.numpy()
    ref_frames = _reference_frames(pipe, init, steps, 5.0, None, width, height, frames, 5.0)
    main([
        "generate", "--model", str(tmp_path / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--size", f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", "5",
        "--shift", "5", "--init-latents", str(tmp_path / "init.npy"), "--save-latents", str(tmp_path / "out.npy"),
        "--output", str(tmp_path / "frames"), "--quiet",
    ])
    ours = np.load(tmp_path / "out.npy")
    err = rel_err(ours, ref_latents)
    mad = float(np.abs(_read_png_frames(tmp_path / "frames") - ref_frames).mean())
    print(f"TI2V-5B-style end to end: latents relative error {err:.2e}, frames mean |difference| {mad * 255:.3f}/255")
    assert err < 1e-3
    assert mad < 1 / 255
