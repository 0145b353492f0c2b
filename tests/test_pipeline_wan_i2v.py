"""Image-to-video end to end against diffusers' WanImageToVideoPipeline, at tiny random configs."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

from mlx_video.cli import main  # noqa: E402
from support.wan import build_tiny_wan_pipeline, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "the camera pans over snowy mountains"
NEGATIVE = "blurry"


def make_image(path, width, height):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    PIL.fromarray(rgb.astype(np.uint8)).save(path)
    return PIL.open(path).convert("RGB")


def run_both(tmp_path, pipe, image, init, width, height, frames, steps, guidance, guidance_2, shift, extra=()):
    use_official_sigmas(pipe)
    kwargs = dict(guidance_scale_2=guidance_2) if guidance_2 is not None else {}
    with torch.no_grad():
        ref = pipe(
            image=image, prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(init),
            output_type="latent", max_sequence_length=512, **kwargs,
        ).frames.numpy()
    np.save(tmp_path / "init.npy", init)
    args = [
        "generate", "--model", str(tmp_path / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--image", str(tmp_path / "image.png"), "--size", f"{width}x{height}", "--frames", str(frames),
        "--steps", str(steps), "--guidance", str(guidance), "--shift", str(shift),
        "--init-latents", str(tmp_path / "init.npy"), "--save-latents", str(tmp_path / "out.npy"), "--quiet",
        "--overwrite", *extra,
    ]
    if guidance_2 is not None:
        args += ["--guidance-2", str(guidance_2)]
    main(args)
    return np.load(tmp_path / "out.npy"), ref


def test_i2v_a14b_style_matches_diffusers(tmp_path):
    pipe = build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=True, shift=5.0, image_to_video=True)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    assert json.loads((tmp_path / "mlx" / "mlxvid.json").read_text())["model"] == "wan2.2-i2v-a14b"
    width, height, frames = 48, 32, 9
    image = make_image(tmp_path / "image.png", width, height)  # the video size: no resize on either side
    init = np.random.default_rng(1).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    ours, ref = run_both(tmp_path, pipe, image, init, width, height, frames, 5, 3.5, 2.0, 5.0)
    err = rel_err(ours, ref)
    print(f"I2V-A14B-style end to end: relative error {err:.2e}")
    assert err < 1e-3
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert set(sidecar["settings"]["experts"]) == {"transformer", "transformer_2"}
    assert sidecar["settings"]["image"].endswith("image.png")


def test_ti2v_5b_image_mode_matches_diffusers(tmp_path):
    pipe = build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=False, shift=5.0, wan22_vae=True,
                                   image_to_video=True)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    width, height, frames = 96, 64, 9
    image = make_image(tmp_path / "image.png", width, height)
    init = np.random.default_rng(2).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    ours, ref = run_both(tmp_path, pipe, image, init, width, height, frames, 4, 5.0, None, 5.0)
    err = rel_err(ours, ref)
    print(f"TI2V-5B image mode end to end: relative error {err:.2e}")
    assert err < 1e-3
    # the first latent frame is the image's own latent, untouched by the sampler
    assert rel_err(ours[:, :, 1:], init[:, :, 1:]) > 0.05


def test_image_is_stretched_like_diffusers_when_asked(tmp_path):
    """A 60x20 image onto a 48x32 video: with --image-fit stretch both sides resize it the same way."""
    pipe = build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=True, shift=5.0, image_to_video=True)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    image = make_image(tmp_path / "image.png", 60, 20)
    init = np.random.default_rng(3).standard_normal((1, 4, 2, 4, 6)).astype(np.float32)
    ours, ref = run_both(tmp_path, pipe, image, init, 48, 32, 5, 3, 3.5, 2.0, 5.0, extra=("--image-fit", "stretch"))
    assert rel_err(ours, ref) < 1e-3
    # the default (cover, then centre-crop) conditions on other pixels, so the result differs
    crop, _ = run_both(tmp_path, pipe, image, init, 48, 32, 5, 3, 3.5, 2.0, 5.0)
    assert rel_err(crop, ref) > 1e-3


def test_image_rules(capsys, a14b, tmp_path):
    root, _ = a14b
    make_image(tmp_path / "image.png", 48, 32)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root / "mlx"), "--prompt", "x", "--image", str(tmp_path / "image.png"),
              "--save-latents", str(tmp_path / "x.npy"), "--quiet"])
    assert "text-to-video model" in capsys.readouterr().err
